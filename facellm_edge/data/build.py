"""The resumable, concurrent, rate-limited builder of the ShareGPT JSONL.

Unit of work: one (image, prompt family) pair -> one request -> one record. Records are appended to the output with
one ``write`` + ``flush`` + ``fsync`` each, so a crash loses at most the record in flight; on restart a torn last
line is truncated and every id already in the file is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from facellm_edge.data.backends import (
    ChatBackend, FatalBackendError, ImagePayload, TransientBackendError,
)
from facellm_edge.data.labels import FaceLabels
from facellm_edge.data.prompts import SYSTEM_PROMPT, Family, InvalidResponse, build_prompt, parse_response
from facellm_edge.errors import InputError, OutputError, RuntimeStageError, UsageError
from facellm_edge.io import loads_json

log = logging.getLogger(__name__)
_MIME = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


@dataclass(frozen=True)
class BuildConfig:
    workers: int = 4
    rpm: float = 60.0  # requests per minute over all workers; 0 = unlimited
    max_attempts: int = 6  # tries per request on transient errors (429/5xx/connection) before giving up
    backoff_base_s: float = 1.0  # first backoff; doubles each retry (plus jitter), capped at backoff_max_s
    backoff_max_s: float = 60.0
    max_invalid: int = 3  # tries per task when the reply fails validation
    seed: int = 0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise UsageError(f"--workers must be >= 1, got {self.workers}")
        if self.rpm < 0:
            raise UsageError(f"--rpm must be >= 0 (0 = unlimited), got {self.rpm}")
        if self.max_attempts < 1 or self.max_invalid < 1:
            raise UsageError("--max-attempts and --max-invalid must be >= 1")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise UsageError("backoff delays must be >= 0")


class RateLimiter:
    """Token bucket (capacity 1: requests are spread evenly) guarded by a Condition; waits are timed, not polled."""

    def __init__(self, rpm: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = 60.0 / rpm if rpm > 0 else 0.0
        self._clock = clock
        self._next = clock()
        self._cond = threading.Condition()

    def acquire(self, stop: threading.Event) -> bool:
        """Take a token; False when ``stop`` was set while waiting (call :meth:`wake` after setting it)."""
        if self._interval == 0.0:
            return not stop.is_set()
        with self._cond:
            while not stop.is_set():
                now = self._clock()
                if now >= self._next:
                    self._next = max(self._next, now) + self._interval
                    return True
                self._cond.wait(timeout=self._next - now)
            return False

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


# The keys of a record (json.dumps keeps this order, so a record's line starts with RECORD_START).
RECORD_KEYS = ("id", "image", "conversations", "family", "labels", "model")
RECORD_START = b'{"id": "'


def is_record(obj: object) -> bool:
    """Whether ``obj`` is a record this builder writes: exactly its keys, ``id`` = ``image#family``."""
    return (isinstance(obj, dict) and tuple(obj) == RECORD_KEYS and all(isinstance(obj[k], str) for k in
            ("id", "image", "family", "model")) and obj["id"] == f"{obj['image']}#{obj['family']}"
            and isinstance(obj["conversations"], list) and isinstance(obj["labels"], dict))


class JsonlStore:
    """Append-only JSONL with crash recovery; thread-safe appends."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None

    def recover(self) -> set[str]:
        """Return the ids already written; complete a torn last line (from a crash) or drop it.

        The file is changed only when every line proves it is this builder's output (:func:`is_record`, and a torn
        tail that starts like a record); anything else is refused with the file left byte-identical.
        """
        ids: set[str] = set()
        if not self.path.exists():
            return ids
        if not self.path.is_file():
            raise OutputError(f"--out {self.path} exists and is not a file")
        def not_ours(why: str) -> OutputError:
            return OutputError(f"{self.path} was not written by `facellm-edge data build` ({why}), so it is left "
                               "untouched; choose another --out")

        good_end = 0
        tail = b""
        with open(self.path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.endswith(b"\n"):
                    tail = line  # last line without its newline: the write in flight when the process died
                    break
                if line.strip():
                    try:
                        obj = loads_json(line)
                    except ValueError:
                        obj = None
                    if not is_record(obj):
                        raise not_ours(f"line {lineno} is not one of its records")
                    ids.add(obj["id"])
                good_end += len(line)
        if not tail:
            return ids
        if not tail.startswith(RECORD_START):
            raise not_ours("its last line is not one of its records")
        try:
            obj = loads_json(tail)
        except ValueError:
            obj = None
        if obj is not None and not is_record(obj):
            raise not_ours("its last line is not one of its records")
        with open(self.path, "r+b") as f:
            if obj is not None:  # the record is whole: only its newline is missing
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
                ids.add(obj["id"])
                log.warning("%s: completed the last record (its newline was lost by an interrupted run)", self.path)
            else:
                f.truncate(good_end)
                log.warning("%s: dropped a torn last record (%d bytes) left by an interrupted run", self.path,
                            len(tail))
            f.flush()
            os.fsync(f.fileno())
        return ids

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)  # umask applies
        except OSError as exc:
            raise OutputError(f"cannot open {self.path} for appending: {exc.strerror or exc}") from exc

    def append(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        assert self._fd is not None, "JsonlStore.open() first"
        with self._lock:
            try:
                view = memoryview(data)
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
                os.fsync(self._fd)
            except OSError as exc:
                raise OutputError(f"cannot write to {self.path}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class BuildStats:
    total: int = 0
    skipped: int = 0  # already in the output from an earlier run
    written: int = 0
    failed: int = 0  # gave up after max_invalid invalid replies (or unreadable image); rerun retries them
    requests: int = 0
    retries: int = 0
    invalid: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: list[str] = field(default_factory=list)


def task_id(lab: FaceLabels, family: Family) -> str:
    return f"{Path(lab.file).as_posix()}#{family.name}"


def _load_image(path: Path) -> ImagePayload:
    import cv2

    from facellm_edge.io import read_image

    img = read_image(path)  # decodable, and within the decoded-size bound, before anything is sent
    mime = _MIME.get(path.suffix.lower())
    if mime is not None:
        try:
            return ImagePayload(data=path.read_bytes(), mime=mime)
        except OSError as exc:
            raise InputError(f"cannot read image {path}: {exc.strerror or exc}") from exc
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])  # formats the API may not take -> JPEG
    if not ok:
        raise InputError(f"image {path} cannot be re-encoded as JPEG")
    return ImagePayload(data=buf.tobytes(), mime="image/jpeg")


class _Builder:
    def __init__(self, backend: ChatBackend, store: JsonlStore, images_dir: Path, config: BuildConfig,
                 on_update: Callable[[BuildStats], None] | None) -> None:
        self.backend, self.store, self.images_dir, self.config = backend, store, images_dir, config
        self.stats = BuildStats()
        self.stop = threading.Event()
        self.limiter = RateLimiter(config.rpm)
        self._lock = threading.Lock()
        self._on_update = on_update
        self._rng = random.Random(config.seed)

    def _update(self, **delta: int) -> None:
        with self._lock:
            for k, v in delta.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)
            if self._on_update is not None:  # under the lock: the display never goes backwards
                self._on_update(BuildStats(**{k: getattr(self.stats, k) for k in self.stats.__dataclass_fields__}))

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.config.backoff_max_s)
        with self._lock:
            jitter = self._rng.uniform(0.0, self.config.backoff_base_s)
        return min(self.config.backoff_base_s * 2 ** (attempt - 1) + jitter, self.config.backoff_max_s)

    def run_task(self, lab: FaceLabels, family: Family) -> None:
        if self.stop.is_set():
            return
        try:
            image = _load_image(self.images_dir / lab.file)
        except (InputError, OSError) as exc:
            self._fail(lab, family, str(exc))
            return
        user = build_prompt(lab, family)
        transient, invalid = 0, 0
        while self.limiter.acquire(self.stop):
            self._update(requests=1)
            try:
                reply = self.backend.complete(SYSTEM_PROMPT, user, image)
            except TransientBackendError as exc:
                transient += 1
                if transient >= self.config.max_attempts:
                    self.halt()  # before raising: no worker starts another task
                    raise RuntimeStageError(f"{exc} (gave up after {transient} attempts)") from exc
                delay = self._backoff(transient, exc.retry_after)
                log.info("%s: %s; retrying in %.2fs", task_id(lab, family), exc, delay)
                self._update(retries=1)
                if self.stop.wait(delay):
                    return
                continue
            except FatalBackendError as exc:
                self.halt()
                raise RuntimeStageError(str(exc)) from exc
            self._update(prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)
            try:
                question, answer = parse_response(reply.text, lab, family)
            except InvalidResponse as exc:
                invalid += 1
                self._update(invalid=1)
                log.info("%s: invalid reply (%s), try %d/%d", task_id(lab, family), exc, invalid,
                         self.config.max_invalid)
                if invalid >= self.config.max_invalid:
                    self._fail(lab, family, f"invalid reply: {exc}")
                    return
                continue
            self.store.append({
                "id": task_id(lab, family),
                "image": Path(lab.file).as_posix(),
                "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                  {"from": "gpt", "value": answer}],
                "family": family.name,
                "labels": lab.attrs,
                "model": f"{self.backend.name}:{self.backend.model}",
            })
            self._update(written=1)
            return

    def _fail(self, lab: FaceLabels, family: Family, reason: str) -> None:
        with self._lock:
            self.stats.failures.append(f"{task_id(lab, family)}: {reason}")
        self._update(failed=1)

    def halt(self) -> None:
        self.stop.set()
        self.limiter.wake()


def build_dataset(labels: list[FaceLabels], families: tuple[Family, ...], images_dir: Path, out: Path,
                  backend: ChatBackend, config: BuildConfig,
                  on_update: Callable[[BuildStats], None] | None = None) -> BuildStats:
    """Generate one record per (image, family) not yet in ``out``. Raises RuntimeStageError (progress kept) when
    the endpoint stays unreachable or rejects requests; returns the stats otherwise (check ``stats.failed``)."""
    store = JsonlStore(out)
    done = store.recover()
    todo = [(lab, fam) for lab in labels for fam in families if task_id(lab, fam) not in done]
    builder = _Builder(backend, store, Path(images_dir), config, on_update)
    builder.stats.total = len(labels) * len(families)
    builder.stats.skipped = builder.stats.total - len(todo)
    builder._update()
    if not todo:
        return builder.stats
    store.open()
    pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="datagen")
    window = 2 * config.workers  # tasks queued at once: memory stays flat for FairFace-sized runs
    pending: set = set()
    error: BaseException | None = None
    try:
        for lab, fam in todo:
            if len(pending) >= window:
                done_now, pending = wait(pending, return_when=FIRST_COMPLETED)
                error = next((f.exception() for f in done_now if f.exception() is not None), None)
                if error is not None or builder.stop.is_set():
                    break
            pending.add(pool.submit(builder.run_task, lab, fam))
        if error is None:
            done_now, pending = wait(pending)
            error = next((f.exception() for f in done_now if f.exception() is not None), None)
    except BaseException:  # KeyboardInterrupt included: let in-flight records finish, drop the queue
        builder.halt()
        raise
    finally:
        if error is not None:
            builder.halt()
        pool.shutdown(wait=True, cancel_futures=True)
        store.close()
    if error is None:
        error = next((f.exception() for f in pending if not f.cancelled() and f.exception() is not None), None)
    if isinstance(error, RuntimeStageError):
        raise RuntimeStageError(
            f"backend {backend.name} failed: {error}; progress saved ({builder.stats.written} new records, "
            f"{builder.stats.skipped + builder.stats.written}/{builder.stats.total} in {out}): "
            "rerun the same command to resume"
        ) from error
    if error is not None:
        raise error
    return builder.stats
