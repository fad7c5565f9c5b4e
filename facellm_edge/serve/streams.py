"""From the live loop's threads to HTTP clients: the live state and its server-sent events (:class:`LiveFeed`),
the newest annotated frame as JPEG / MJPEG (:class:`FrameHub`).

The loop's callbacks (frame loop and VLM worker threads) only update a small in-memory state under a lock and hand
each event to the asyncio loop with ``call_soon_threadsafe``; every SSE client has a bounded queue, and a client too
slow to keep up loses events (then gets a fresh ``snapshot``) instead of slowing anything down. Annotated frames are
kept by reference (the newest only) and encoded to JPEG at most once per frame, on demand, whatever the number of
viewers. Nothing here is written anywhere or logged.

SSE events (``id:`` increases by one per event; a client that reconnects with ``Last-Event-ID`` gets what it missed
from the last :data:`EVENT_HISTORY` events, else a snapshot):

==================  ============================================================================================
``snapshot``        ``{"question", "running", "tracks": [track]}`` first, and after a gap; track = ``{"track_id",
                    "box", "question", "text", "done"}``
``tracks``          ``{"frame", "tracks": [{"track_id", "box", "score"}]}`` (throttled by the caller)
``track_appeared``  ``{"frame", "track_id", "box"}``;  ``track_lost``: ``{"frame", "track_id"}``
``token``           ``{"track_id", "question", "text"}`` one streamed piece of an answer
``answer``          the answer's record, as ``run --jsonl`` writes it (track_id, box, question, answer, timings_ms, ...)
``question``        ``{"question"}`` the standing question changed;  ``status``: ``{"running", ...}`` (loop ended)
==================  ============================================================================================
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict, deque
from typing import Any, AsyncIterator

import numpy as np

__all__ = ["FrameHub", "LiveFeed"]

EVENT_HISTORY = 1024  # events kept for clients that reconnect with Last-Event-ID
CLIENT_QUEUE = 256  # events waiting for one SSE client; beyond that it loses events and gets a snapshot
HEARTBEAT_S = 15.0  # an SSE comment when nothing else was sent (keeps proxies open, finds dead clients)
MJPEG_MAX_FPS = 15.0  # per MJPEG viewer
MJPEG_REPEAT_S = 1.0  # with no new frame for this long, a viewer gets the newest frame again (see FrameHub.mjpeg)
JPEG_QUALITY = 80


def _wake(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    """Run ``fn(*args)`` on ``loop`` from any thread (nothing when the loop has closed)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is closed: the server is gone
        pass


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class LiveFeed:
    """The live state (tracks with their answers, the standing question) and the events that change it."""

    def __init__(self, question: str) -> None:
        self._lock = threading.Lock()
        self.question = question
        self.running = False
        self._tracks: dict[int, dict] = {}
        self._lost: OrderedDict[int, None] = OrderedDict()  # recently lost ids: a late answer does not revive them
        self._id = 0
        self._history: deque[tuple[int, bytes]] = deque(maxlen=EVENT_HISTORY)
        self._clients: dict[asyncio.Queue, asyncio.AbstractEventLoop] = {}
        self._closed = False
        self.dropped = 0  # events lost by slow clients

    # -- producer side (any thread) -------------------------------------------------------------------------
    def publish(self, kind: str, payload: dict, *, apply: bool = True) -> None:
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            if apply:
                self._apply(kind, payload)
            self._id += 1
            msg = (self._id, f"id: {self._id}\nevent: {kind}\ndata: {data}\n\n".encode())
            self._history.append(msg)
            loops = set(self._clients.values())
        for loop in loops:
            _wake(loop, self._fanout, loop, msg)

    def update_boxes(self, tracks: list[dict]) -> None:
        with self._lock:
            for t in tracks:
                self._track(t["track_id"])["box"] = t["box"]

    def _track(self, tid: int) -> dict:
        return self._tracks.setdefault(tid, {"track_id": tid, "box": None, "question": None, "text": "",
                                             "done": False})

    def _apply(self, kind: str, p: dict) -> None:
        tid = p.get("track_id")
        if kind == "question":
            self.question = p["question"]
        elif kind == "status":
            self.running = bool(p["running"])
        elif kind == "track_lost":
            self._tracks.pop(tid, None)
            self._lost[tid] = None
            while len(self._lost) > EVENT_HISTORY:
                self._lost.popitem(last=False)
        elif kind == "track_appeared" and tid not in self._lost:
            self._track(tid)["box"] = p["box"]
        elif kind in ("token", "answer") and tid not in self._lost:
            t = self._track(tid)
            if kind == "answer":
                t.update(question=p["question"], text=p["answer"], done=True, box=p.get("box", t["box"]))
            else:
                if t["done"] or t["question"] != p["question"]:  # a new answer starts
                    t.update(question=p["question"], text="", done=False)
                t["text"] += p["text"]

    def tracks(self) -> list[dict]:
        with self._lock:
            return [dict(t) for _, t in sorted(self._tracks.items())]

    def _snapshot_locked(self) -> tuple[int, bytes]:
        data = json.dumps({"question": self.question, "running": self.running,
                           "tracks": [dict(t) for _, t in sorted(self._tracks.items())]},
                          ensure_ascii=False, separators=(",", ":"))
        return self._id, f"id: {self._id}\nevent: snapshot\ndata: {data}\n\n".encode()

    def close(self) -> None:
        """End every client's stream (server shutdown)."""
        with self._lock:
            self._closed = True
            clients = list(self._clients.items())
        for queue, loop in clients:
            _wake(loop, self._end, queue)

    # -- consumer side (the event loop) ---------------------------------------------------------------------
    def _fanout(self, loop: asyncio.AbstractEventLoop, msg: tuple[int, bytes]) -> None:
        with self._lock:
            queues = [q for q, q_loop in self._clients.items() if q_loop is loop]
        for queue in queues:
            try:
                queue.put_nowait(msg)
            except asyncio.QueueFull:
                self.dropped += 1

    @staticmethod
    def _end(queue: asyncio.Queue) -> None:
        while True:
            try:
                queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                queue.get_nowait()

    async def stream(self, last_event_id: int | None = None) -> AsyncIterator[bytes]:
        """One SSE client's body: a snapshot (or the events after ``last_event_id``), then events as they come."""
        queue: asyncio.Queue = asyncio.Queue(CLIENT_QUEUE)
        with self._lock:
            if self._closed:
                return
            self._clients[queue] = asyncio.get_running_loop()
            oldest = self._history[0][0] if self._history else self._id + 1
            if last_event_id is not None and oldest - 1 <= last_event_id <= self._id:
                backlog = [m for m in self._history if m[0] > last_event_id]
            else:
                backlog = [self._snapshot_locked()]
        try:
            yield b"retry: 2000\n\n"
            last = last_event_id or 0
            for msg_id, data in backlog:
                last = msg_id
                yield data
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                except asyncio.TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if msg is None:
                    return
                if msg[0] <= last:  # already sent (in the backlog or a snapshot)
                    continue
                if msg[0] > last + 1:  # this client lost events: start again from the current state
                    with self._lock:
                        msg = self._snapshot_locked()
                last = msg[0]
                yield msg[1]
        finally:
            with self._lock:
                self._clients.pop(queue, None)


class FrameHub:
    """The newest annotated frame (kept by reference) and its JPEG, encoded once and only when someone asks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._image: np.ndarray | None = None
        self._seq = 0
        self._jpeg: tuple[int, bytes] | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.closed = False

    def put(self, image: np.ndarray) -> None:
        """The frame loop's ``on_frame``: cheap (no copy, no encoding)."""
        with self._lock:
            self._image, self._seq = image, self._seq + 1
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            _wake(loop, _resolve, fut)

    def jpeg(self) -> tuple[int, bytes] | None:
        """(frame number, JPEG bytes) of the newest frame, or None before the first. Blocking: call in a thread."""
        import cv2

        with self._encode_lock:
            with self._lock:
                seq, image = self._seq, self._image
            if image is None:
                return None
            if self._jpeg is None or self._jpeg[0] != seq:
                ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                if not ok:
                    raise RuntimeError("JPEG encoding of the annotated frame failed")
                self._jpeg = (seq, buf.tobytes())
            return self._jpeg

    async def wait_newer(self, after: int, timeout: float) -> bool:
        """Wait until a frame newer than ``after`` is in (True) or ``timeout`` passes (False); True once closed."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._seq > after or self.closed:
                return True
            waiter = (loop, loop.create_future())
            self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter[1], timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            _wake(loop, _resolve, fut)

    async def mjpeg(self) -> AsyncIterator[bytes]:
        """multipart/x-mixed-replace parts (boundary ``frame``), the newest frame each, at most MJPEG_MAX_FPS.

        A browser (Blink) shows a part only when the *next* part's headers arrive, so a viewer of a source that has
        ended or paused would see nothing, or be one frame behind forever. Hence: a new viewer gets the newest frame
        twice, and with no new frame for MJPEG_REPEAT_S the newest frame is sent again (≤ 1 frame/s while idle).
        """
        loop, last, sent_at = asyncio.get_running_loop(), 0, 0.0
        if self.closed:
            return
        while not self.closed:
            newer = await self.wait_newer(last, MJPEG_REPEAT_S)
            if self.closed:
                break
            if newer:
                await asyncio.sleep(max(0.0, sent_at + 1.0 / MJPEG_MAX_FPS - loop.time()))
            got = await asyncio.to_thread(self.jpeg)
            if got is None:  # no frame yet
                continue
            part = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n" % (len(got[1]), got[1])
            yield part + part if last == 0 else part
            last, sent_at = got[0], loop.time()
