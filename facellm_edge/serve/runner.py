"""Model calls off the event loop, one at a time, behind a bounded queue.

Every call on the model blocks (ONNX Runtime, llama.cpp) and the model answers one question at a time (the
generator's lock), so the server runs model work in one worker thread, first come first served. At most
``1 + max_queue`` requests are admitted (the running one and those waiting); one more is refused at once with
:class:`~facellm_edge.serve.errors.Busy` (503 + ``Retry-After``), so a burst never builds an unbounded backlog.

Each admitted request has a deadline (``timeout_s`` from its admission). One that is still waiting when it passes
is dropped from the queue (503: busy); one that is running is cancelled (504): a stream is closed at its next
piece, which ends the generation and frees the model. A client that goes away cancels its request the same way
(the async iterator is closed or its task cancelled).

    answer = await runner.call(model.detect, image)                # one blocking call
    async with runner.stream(session.stream, question) as pieces:  # an iterator, consumed in the worker
        async for piece in pieces: ...
    pieces.result                                                  # the iterator's return value (StopIteration)
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, TypeVar

from facellm_edge.serve.errors import APIError, Busy

if TYPE_CHECKING:
    from facellm_edge.serve.metrics import Metrics

__all__ = ["Busy", "ModelRunner", "ModelStream"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_END = object()
_RETRY_MAX_S = 60


class _Failure:
    def __init__(self, exc: BaseException, wait: bool = True) -> None:
        self.exc = exc
        self.wait = wait  # for the worker to let the request go before the consumer sees it


class _Job:
    """One admitted request: its deadline, whether the worker has started it, and its cancel flag."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.started = threading.Event()
        self.cancel = threading.Event()
        self.retry_after = 1
        self.on_interrupt: Callable[[APIError], None] | None = None  # set by a stream: ends it with the error

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def timeout_error(self) -> APIError:
        if self.started.is_set():
            return APIError(504, f"the answer took longer than the request timeout ({self.timeout_s:g} s) and was "
                            "cancelled; ask for fewer tokens or raise --request-timeout", code="timeout")
        return Busy(f"waited {self.timeout_s:g} s for the model without getting it; retry later", self.retry_after)


class ModelRunner:
    """Runs blocking model work in one worker thread behind a queue of at most ``max_queue`` waiting requests."""

    def __init__(self, max_queue: int, timeout_s: float, metrics: "Metrics | None" = None) -> None:
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._metrics = metrics
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="facellm-model")
        self._lock = threading.Lock()
        self._jobs: set[_Job] = set()  # admitted, not finished
        self._running = 0
        self._avg_s = 1.0  # moving average of a request's time on the model, for Retry-After
        self._closed = False

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def busy(self) -> int:
        """Requests admitted and not finished (running + waiting)."""
        with self._lock:
            return len(self._jobs)

    @property
    def depth(self) -> int:
        """Requests waiting for the model (the queue depth gauge)."""
        with self._lock:
            return len(self._jobs) - self._running

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the average request time times the requests ahead of it."""
        with self._lock:
            ahead = len(self._jobs)
            return max(1, min(_RETRY_MAX_S, math.ceil(self._avg_s * max(1, ahead))))

    # -- calls ----------------------------------------------------------------------------------------------
    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the worker thread; :class:`Busy` when the queue is full."""
        job = self._admit()
        future = self._submit(job, lambda: fn(*args), on_cancel=None)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), job.remaining())
        except asyncio.TimeoutError:
            future.cancel()  # only if it has not started: a running call cannot be interrupted
            raise job.timeout_error() from None
        except asyncio.CancelledError:
            future.cancel()
            raise

    def stream(self, factory: Callable[..., Iterable[T]], *args: Any) -> "ModelStream[T]":
        """An async iterator over ``factory(*args)``, which is called and iterated in the worker thread.
        Admission happens now (:class:`Busy` when the queue is full); use it as ``async with``."""
        return ModelStream(self, self._admit(), factory, args)

    def interrupt(self, error: APIError) -> None:
        """End every admitted stream now with ``error`` as its next item, whatever the worker is doing (the end of
        the shutdown grace: a stream client still gets an error event and its end), and cancel their model work
        (at its next piece). New requests are still admitted; :meth:`close` refuses them."""
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel.set()
            if job.on_interrupt is not None:
                job.on_interrupt(error)

    def close(self, wait: bool = True) -> None:
        """Refuse new requests, drop the waiting ones, cancel the running one (at its next piece), and (``wait``)
        wait for the worker to finish."""
        with self._lock:
            self._closed = True
            for job in self._jobs:
                job.cancel.set()
        self._pool.shutdown(wait=wait, cancel_futures=True)

    # -- internals ------------------------------------------------------------------------------------------
    def _admit(self) -> _Job:
        retry = self.retry_after()
        with self._lock:
            if self._closed:
                raise Busy("the server is shutting down", retry, code="shutting_down")
            if len(self._jobs) >= 1 + self.max_queue:
                raise Busy(f"the model is busy ({len(self._jobs)} requests running or waiting, queue limit "
                           f"{self.max_queue}); retry after {retry} s", retry)
            job = _Job(self.timeout_s)
            job.retry_after = retry
            self._jobs.add(job)
        self._gauge()
        return job

    def _submit(self, job: _Job, work: Callable[[], T], on_cancel: Callable[[], None] | None) -> "cf.Future[T]":
        def run() -> T:
            with self._lock:
                self._running += 1
            self._gauge()
            job.started.set()
            t0 = time.monotonic()
            try:
                return work()
            finally:
                with self._lock:
                    self._running -= 1
                    self._avg_s = 0.8 * self._avg_s + 0.2 * (time.monotonic() - t0)
                    self._jobs.discard(job)  # here, before the future is done: whoever awaits it sees it gone
                self._gauge()

        def finished(future: "cf.Future[T]") -> None:  # also for a job cancelled before it started
            with self._lock:
                self._jobs.discard(job)
            self._gauge()
            if future.cancelled() and on_cancel is not None:
                on_cancel()

        try:
            future = self._pool.submit(run)
        except RuntimeError:  # the pool was shut down between admission and now
            with self._lock:
                self._jobs.discard(job)
            raise Busy("the server is shutting down", 1, code="shutting_down") from None
        future.add_done_callback(finished)
        return future

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self.depth)


class ModelStream(Generic[T]):
    """The pieces of an iterator run in the model's worker thread, as an async iterator. ``result`` is the
    iterator's return value (``StopIteration.value``) once it is exhausted. Leaving it early (``aclose``, the
    ``async with`` block, a cancelled task, the deadline) closes the iterator in the worker at its next piece."""

    def __init__(self, runner: ModelRunner, job: _Job, factory: Callable[..., Iterable[T]], args: tuple) -> None:
        self._job = job
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._done = False
        self.result: Any = None
        self._future = runner._submit(job, lambda: self._produce(factory, args), on_cancel=self._dropped)
        job.on_interrupt = lambda error: self._put(_Failure(error, wait=False))

    # -- worker side ----------------------------------------------------------------------------------------
    def _produce(self, factory: Callable[..., Iterable[T]], args: tuple) -> None:
        it = None
        try:
            if self._job.cancel.is_set():
                return
            it = iter(factory(*args))
            while not self._job.cancel.is_set():
                try:
                    item = next(it)
                except StopIteration as stop:
                    self.result = stop.value
                    self._put(_END)
                    return
                self._put(item)
        except BaseException as exc:  # handed to the consumer, which maps it to an HTTP error
            self._put(_Failure(exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # a generator closed early runs its finally blocks here: the model is freed

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
            self._job.cancel.set()

    def _dropped(self) -> None:  # cancelled before it started (shutdown): tell the consumer
        self._put(_Failure(Busy("the server is shutting down", 1, code="shutting_down")))

    # -- consumer side --------------------------------------------------------------------------------------
    def __aiter__(self) -> "ModelStream[T]":
        return self

    async def __anext__(self) -> T:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await asyncio.wait_for(self._queue.get(), self._job.remaining())
        except asyncio.TimeoutError:
            self._abandon()
            raise self._job.timeout_error() from None
        except BaseException:  # cancelled: the client went away
            self._abandon()
            raise
        if item is _END or isinstance(item, _Failure):
            self._done = True
            if item is _END or item.wait:
                await self._worker_done()
            else:
                self._abandon()  # interrupted: the worker stops at its next piece, nobody waits for it
            if item is _END:
                raise StopAsyncIteration
            raise item.exc
        return item

    async def _worker_done(self) -> None:
        """Wait (within the deadline) for the worker to close the iterator and let the request go, so that when the
        stream ends the model is free and the request no longer counts as busy."""
        if not self._future.done():
            await asyncio.wait([asyncio.wrap_future(self._future)], timeout=self._job.remaining())

    async def aclose(self) -> None:
        self._abandon()

    async def __aenter__(self) -> "ModelStream[T]":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._abandon()

    def _abandon(self) -> None:
        if not self._done or not self._future.done():
            self._job.cancel.set()
            self._future.cancel()
        self._done = True
