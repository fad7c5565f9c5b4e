"""The live loop: detect + track + draw every frame; a VLM worker thread answers about each new face.

The frame loop never waits for the language model. It hands the worker the newest frame's faces that have no
answer yet through a drop-oldest queue of size 1; the worker encodes new faces' crops in one batch and prefills
their image prefix as soon as they appear (new tracks before pending answers), then streams each answer token by
token into a per-track cache that the overlay draws. Answers are cached per track; a track that ends frees its KV
slot. Shutdown (q/Esc, Ctrl-C, end of a file source) stops the worker, joins threads with a timeout, releases the
source and finalises the outputs (annotated video, JSON lines) atomically.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from facellm_edge.errors import OutputError
from facellm_edge.faces import Face
from facellm_edge.live.overlay import draw
from facellm_edge.live.sources import FrameSource
from facellm_edge.live.tracker import IouTracker, TrackerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveConfig:
    question: str
    display: bool = True
    jsonl: Path | None = None
    output: Path | None = None  # annotated video (mp4v)
    max_tokens: int | None = None
    temperature: float | None = None
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    drain_timeout_s: float = 300.0  # file sources: wait this long at the end for answers still being made
    join_timeout_s: float = 5.0
    max_frames: int = 0  # 0 = until the source ends or the user quits
    window: str = "facellm-edge"


class DropOldestSlot:
    """A queue of size 1: ``put`` replaces what is waiting; ``get`` waits on a condition (no polling).

    ``cond`` lets an owner share its condition (re-entrant lock) so that taking a job and marking itself busy
    happen atomically."""

    def __init__(self, cond: threading.Condition | None = None) -> None:
        self._cond = cond if cond is not None else threading.Condition()
        self._item: Any = None
        self._closed = False
        self.dropped = 0

    def put(self, item: Any) -> None:
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self._closed, timeout=timeout)
            item, self._item = self._item, None
            return item

    def pending(self) -> bool:
        with self._cond:
            return self._item is not None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass
class TrackAnswer:
    track_id: int
    frame: int
    face: Face
    text: str = ""
    done: bool = False
    stop_reason: str = ""


class _Stopped(Exception):
    """Raised from the token callback to abandon an answer at shutdown."""


class VlmWorker(threading.Thread):
    """Answers ``question`` once per track with a :class:`~facellm_edge.pipeline.FaceLLM`."""

    def __init__(self, model: Any, config: LiveConfig, on_answer: Callable[[TrackAnswer], None]) -> None:
        super().__init__(name="vlm-worker", daemon=True)
        self.model = model
        self.config = config
        self.on_answer = on_answer
        self._stop_event = threading.Event()
        self._cond = threading.Condition()  # guards answers, ended, busy and the job slot
        self.jobs = DropOldestSlot(self._cond)
        self._answers: dict[int, TrackAnswer] = {}
        self._ended: set[int] = set()
        self._busy = False
        self.error: BaseException | None = None

    # -- frame-loop side ------------------------------------------------------------------------------------
    def offer(self, frame_index: int, image: np.ndarray, faces: list[Face]) -> None:
        """Hand over the faces of this frame whose track has no answer (started) yet."""
        with self._cond:
            new = [f for f in faces if f.track_id not in self._answers]
        if new:
            self.jobs.put((frame_index, image, new))

    def end_tracks(self, track_ids: list[int]) -> None:
        with self._cond:
            self._ended.update(track_ids)
            self._cond.notify_all()

    def texts(self) -> dict[int, str]:
        with self._cond:
            return {tid: a.text for tid, a in self._answers.items()}

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no job is waiting and nothing is being answered."""
        with self._cond:
            return self._cond.wait_for(lambda: (not self._busy and not self.jobs.pending()) or not self.is_alive(),
                                       timeout=timeout)

    def stop(self) -> None:
        self._stop_event.set()
        self.jobs.close()

    # -- worker side ---------------------------------------------------------------------------------------
    def run(self) -> None:
        pending: list[TrackAnswer] = []
        try:
            while not self._stop_event.is_set():
                with self._cond:  # take the job and mark busy atomically (wait_idle sees no gap)
                    job = self.jobs.get(timeout=None if not pending else 0)
                    self._busy = job is not None or bool(pending)
                if job is not None:
                    pending.extend(self._prefill_new(*job, pending))  # new tracks first
                self._forget_ended(pending)
                if pending and not self._stop_event.is_set():
                    self._answer(pending.pop(0))
                with self._cond:
                    self._busy = bool(pending)
                    self._cond.notify_all()
        except _Stopped:
            pass
        except BaseException as exc:  # surfaced by the frame loop
            self.error = exc
            log.error("VLM worker stopped: %s", exc)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _prefill_new(self, frame_index: int, image: np.ndarray, faces: list[Face],
                     pending: list[TrackAnswer]) -> list[TrackAnswer]:
        """Encode all new faces in one batch; prefill as many as the KV slots hold (the rest when answered)."""
        with self._cond:
            faces = [f for f in faces if f.track_id not in self._answers and f.track_id not in self._ended]
            for f in faces:
                self._answers[f.track_id] = TrackAnswer(f.track_id, frame_index, f)
        if not faces:
            return []
        self.model.encode_faces(image, faces)
        free = max(0, self.model.config.max_slots - len(pending))
        for f in faces[:free]:
            self.model.prefill(("track", f.track_id), f)
        return [self._answers[f.track_id] for f in faces]

    def _forget_ended(self, pending: list[TrackAnswer]) -> None:
        with self._cond:
            ended, self._ended = self._ended, set()
        for tid in ended:
            self.model.forget(("track", tid))
        pending[:] = [p for p in pending if p.track_id not in ended]

    def _answer(self, item: TrackAnswer) -> None:
        def on_token(piece: str) -> None:
            if self._stop_event.is_set():
                raise _Stopped
            with self._cond:
                item.text += piece

        key = ("track", item.track_id)
        if not self.model.has(key):  # not prefilled yet (more new faces than KV slots) or evicted since
            self.model.prefill(key, item.face)
        item.face.embeds = None
        ans = self.model.answer(key, self.config.question, max_tokens=self.config.max_tokens,
                                temperature=self.config.temperature, on_token=on_token)
        item.face.timings["ttft"] = ans.timings["ttft_ms"]
        item.face.timings["decode"] = ans.timings["decode_ms"]
        with self._cond:
            item.text, item.done, item.stop_reason = ans.text, True, ans.stop_reason
        self.on_answer(item)


class _AtomicFile:
    """A temp file beside ``dest`` that replaces it on ``commit`` (removed on ``discard``)."""

    def __init__(self, dest: Path) -> None:
        self.dest = Path(dest)
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{self.dest.stem}.", suffix=self.dest.suffix, dir=self.dest.parent)
        except OSError as exc:
            raise OutputError(f"cannot write {self.dest}: {exc.strerror or exc}") from exc
        os.close(fd)
        self.tmp = Path(name)

    def commit(self) -> None:
        os.replace(self.tmp, self.dest)

    def discard(self) -> None:
        if self.tmp.exists():
            self.tmp.unlink()


@dataclass
class LiveStats:
    frames: int = 0
    faces: int = 0
    answers: int = 0
    seconds: float = 0.0
    dropped_jobs: int = 0
    records: list[dict] = field(default_factory=list)  # one per answered track (what --jsonl gets)
    track_frames: dict[int, int] = field(default_factory=dict)  # track id -> frames it was seen in

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def run_live(model: Any, source: FrameSource, config: LiveConfig,
             on_record: Callable[[dict], None] | None = None) -> LiveStats:
    """Run the loop until the source ends, the user quits (q/Esc) or Ctrl-C. Returns what happened.

    ``on_record`` gets each answered face's record (the JSON line) as soon as it is complete (worker thread)."""
    import cv2

    stats = LiveStats()
    lock = threading.Lock()
    jsonl = _AtomicFile(config.jsonl) if config.jsonl else None
    jsonl_fh = open(jsonl.tmp, "w", encoding="utf-8") if jsonl else None
    video = _AtomicFile(config.output) if config.output else None
    writer = None

    def on_answer(item: TrackAnswer) -> None:
        rec = {"frame": item.frame, "track_id": item.track_id, "box": item.face.box_list(),
               "score": round(item.face.score, 4), "question": config.question, "answer": item.text,
               "stop_reason": item.stop_reason,
               "timings_ms": {k: round(v, 2) for k, v in item.face.timings.items()}}
        with lock:
            stats.answers += 1
            stats.records.append(rec)
            if jsonl_fh is not None:
                jsonl_fh.write(json.dumps(rec) + "\n")
                jsonl_fh.flush()
        if on_record is not None:
            on_record(rec)

    tracker = IouTracker(config.tracker)
    worker = VlmWorker(model, config, on_answer)
    worker.start()
    t_start = time.perf_counter()
    finished = False
    try:
        for frame in source:
            if worker.error is not None:
                raise worker.error
            faces = model.detect(frame.image)
            faces, ended = tracker.update(faces, frame.index)
            if ended:
                worker.end_tracks(ended)
            worker.offer(frame.index, frame.image, faces)
            stats.frames += 1
            stats.faces += len(faces)
            for f in faces:
                stats.track_frames[f.track_id] = stats.track_frames.get(f.track_id, 0) + 1
            if video is not None or config.display:
                shown = draw(frame.image, faces, worker.texts(),
                             status=f"{stats.frames / max(time.perf_counter() - t_start, 1e-6):.1f} FPS")
                if video is not None:
                    if writer is None:
                        h, w = shown.shape[:2]
                        fps = source.fps if source.fps and source.fps > 0 else 25.0
                        writer = cv2.VideoWriter(str(video.tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                        if not writer.isOpened():
                            raise OutputError(f"cannot write video {config.output} (mp4v codec unavailable)")
                    writer.write(shown)
                if config.display:
                    cv2.imshow(config.window, shown)
                    if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                        break
            if config.max_frames and stats.frames >= config.max_frames:
                break
        else:
            if not source.live:  # a file ended: let the worker finish what it has
                if not worker.wait_idle(config.drain_timeout_s):
                    log.warning("answers still pending after %.0fs; stopping", config.drain_timeout_s)
        finished = True
    except KeyboardInterrupt:
        log.info("interrupted; shutting down")
        finished = True
    finally:
        stats.seconds = time.perf_counter() - t_start
        worker.stop()
        worker.join(timeout=config.join_timeout_s)
        if worker.is_alive():
            log.warning("VLM worker did not stop within %.1fs", config.join_timeout_s)
        source.close()
        stats.dropped_jobs = worker.jobs.dropped
        if writer is not None:
            writer.release()
        if jsonl_fh is not None:
            jsonl_fh.close()
        if config.display:
            cv2.destroyAllWindows()
        for out in (jsonl, video):
            if out is None:
                continue
            if finished and (out is jsonl or writer is not None):
                out.commit()
            else:
                out.discard()
    if worker.error is not None:
        raise worker.error
    return stats
