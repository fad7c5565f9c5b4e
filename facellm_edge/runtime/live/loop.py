"""The live loop: detect + track + draw every frame; a VLM worker thread answers about each new face.

The frame loop never waits for the language model. It hands the worker the newest frame's faces that have no
answer yet through a drop-oldest queue of size 1; the worker encodes new faces' crops together as soon as they
appear (new tracks before pending answers), then answers them one by one, each in its track's own
:class:`~facellm_edge.runtime.session.FaceSession` (image prefill, then the question), streaming the answer token by
token into a per-track cache that the overlay draws. A track that ends closes its session (the KV slot is freed) and
leaves the cache. Each answer's record says how long after the face's first frame its first token and its full
answer came (``since_seen_ms``): what a person in front of the camera waits.

Shutdown (q/Esc, Ctrl-C or SIGTERM — the CLI turns both into KeyboardInterrupt —, end of a file source) stops
the worker, joins threads with a timeout, releases the source and finalises the outputs: the annotated video is
written to a temporary file that becomes ``--output`` (a playable file of the frames so far) or is removed; JSON lines
are appended and flushed to the disk one by one, so an interrupted run or a power cut keeps every complete line.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from facellm_edge.errors import OutputError
from facellm_edge.runtime.faces import Face
from facellm_edge.io import (check_output_file, clean_stale_temp_files, commit_temp_file, open_line_log,
                             temp_file_beside, write_line)
from facellm_edge.runtime.live.overlay import draw
from facellm_edge.runtime.live.sources import FrameSource
from facellm_edge.runtime.live.tracker import IouTracker, TrackerConfig

if TYPE_CHECKING:
    from facellm_edge.runtime.pipeline import FaceLLM
    from facellm_edge.runtime.session import FaceSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveConfig:
    """The live loop's own settings (how answers are generated is the model's ``RuntimeConfig.generation``)."""

    question: str  # the standing question, asked once about every new face
    display: bool = True
    jsonl: Path | None = None  # one JSON line per answer; an existing file is refused unless ``append``
    output: Path | None = None  # annotated video (mp4v); an existing file is refused unless ``overwrite``
    append: bool = False  # add to an existing ``jsonl`` file instead of refusing it
    overwrite: bool = False  # replace an existing ``output`` video (atomically, once the new one is complete)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    drain_timeout_s: float = 300.0  # file sources: wait this long at the end for answers still being made
    join_timeout_s: float = 5.0
    max_frames: int = 0  # 0 = until the source ends or the user quits
    window: str = "facellm-edge"
    frame_latencies: int = 4096  # per-frame loop latencies kept for LiveStats (the most recent ones)

    def __post_init__(self) -> None:
        from facellm_edge.llm.generator import check_question

        check_question(self.question)


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
    seen: float  # perf_counter of the frame loop's first sight of the track
    text: str = ""
    done: bool = False
    stop_reason: str = ""
    n_tokens: int = 0
    first_token: float | None = None  # perf_counter of the first answer piece
    session: "FaceSession | None" = None


class _Stopped(Exception):
    """Raised from the token callback to abandon an answer at shutdown."""


class VlmWorker(threading.Thread):
    """Answers ``config.question`` once per track with a :class:`~facellm_edge.runtime.pipeline.FaceLLM`, in one
    :class:`~facellm_edge.runtime.session.FaceSession` per track (closed when the track ends)."""

    def __init__(self, model: "FaceLLM", config: LiveConfig, on_answer: Callable[[TrackAnswer], None]) -> None:
        super().__init__(name="vlm-worker", daemon=True)
        self.model = model
        self.config = config
        self.on_answer = on_answer
        self._stop_event = threading.Event()
        self._cond = threading.Condition()  # guards answers, seen, ended, busy and the job slot
        self.jobs = DropOldestSlot(self._cond)
        self._answers: dict[int, TrackAnswer] = {}  # live tracks taken by the worker
        self._seen: dict[int, float] = {}  # live tracks offered but not taken yet -> first sight
        self._ended: set[int] = set()
        self._busy = False
        self.error: BaseException | None = None

    # -- frame-loop side ------------------------------------------------------------------------------------
    def offer(self, frame_index: int, image: np.ndarray, faces: list[Face]) -> None:
        """Hand over the faces of this frame whose track has no answer (started) yet."""
        now = time.perf_counter()
        with self._cond:
            new = [f for f in faces if f.track_id not in self._answers]
            for f in new:
                self._seen.setdefault(f.track_id, now)
        if new:
            self.jobs.put((frame_index, image, new))

    def end_tracks(self, track_ids: list[int]) -> None:
        with self._cond:
            self._ended.update(track_ids)
            for tid in track_ids:
                self._seen.pop(tid, None)
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
                    pending.extend(self._take_new(*job))  # new tracks first
                self._close_ended(pending)
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
            self._close_all()

    def _take_new(self, frame_index: int, image: np.ndarray, faces: list[Face]) -> list[TrackAnswer]:
        """Register the job's new tracks and encode their crops together (answered one by one afterwards)."""
        with self._cond:
            faces = [f for f in faces if f.track_id not in self._answers and f.track_id not in self._ended]
            for f in faces:
                seen = self._seen.pop(f.track_id, time.perf_counter())
                self._answers[f.track_id] = TrackAnswer(f.track_id, frame_index, f, seen)
        if not faces:
            return []
        self.model.encode_faces(image, faces)
        for f in faces:
            f.crop = None  # the embeddings are what the answer needs: no face pixels kept while it waits
        return [self._answers[f.track_id] for f in faces]

    def _close_ended(self, pending: list[TrackAnswer]) -> None:
        """Ended tracks: close their sessions (frees the KV cells) and forget them."""
        with self._cond:
            ended, self._ended = self._ended, set()
            gone = [self._answers.pop(tid) for tid in ended if tid in self._answers]
        for item in gone:
            if item.session is not None:
                item.session.close()
        pending[:] = [p for p in pending if p.track_id not in ended]

    def _close_all(self) -> None:
        with self._cond:
            items = list(self._answers.values())
        for item in items:
            if item.session is not None and not self.model.generator.closed:
                item.session.close()

    def _answer(self, item: TrackAnswer) -> None:
        def on_token(piece: str) -> None:
            if self._stop_event.is_set():
                raise _Stopped
            with self._cond:
                item.text += piece
                if item.first_token is None:
                    item.first_token = time.perf_counter()

        item.session = self.model.open_face(item.face)
        item.face.embeds = None
        ans = item.session.answer_checked(self.config.question, self.model.config.generation, on_token)
        item.face.timings.update(ans.timings)
        with self._cond:
            item.text, item.done, item.stop_reason, item.n_tokens = ans.text, True, ans.stop_reason, ans.n_generated
        self.on_answer(item)


def check_outputs(config: LiveConfig) -> None:
    """Check the output paths before any work (a folder, an existing file, an unwritable place: one line now, not
    after the whole run). Nothing is created."""
    if config.jsonl is not None:
        check_output_file(config.jsonl, option="--jsonl", exists="append" if config.append else "refuse",
                          fix="pass --append to add to it, or choose another file")
    if config.output is not None:
        if config.jsonl is not None and Path(config.jsonl).resolve() == Path(config.output).resolve():
            raise OutputError(f"--jsonl and --output are the same file ({config.output}); give two paths")
        check_output_file(config.output, option="--output", exists="replace" if config.overwrite else "refuse",
                          fix="pass --force to replace it, or choose another file")


@dataclass
class LiveStats:
    frames: int = 0
    faces: int = 0  # face detections summed over frames
    tracks: int = 0  # distinct tracks (people) seen
    answers: int = 0
    seconds: float = 0.0
    dropped_jobs: int = 0
    skipped: int = 0  # images / frames of the source that could not be read (see FrameSource.skipped)
    interrupted: bool = False  # stopped by Ctrl-C / SIGTERM (KeyboardInterrupt)
    # ms per frame of the loop itself (detect + track + hand-over + draw/write/show), the most recent ones
    frame_ms: deque = field(default_factory=lambda: deque(maxlen=4096))

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def run_live(model: Any, source: FrameSource, config: LiveConfig,
             on_record: Callable[[dict], None] | None = None) -> LiveStats:
    """Run the loop until the source ends, the user quits (q/Esc) or Ctrl-C / SIGTERM. Returns what happened.

    ``on_record`` gets each answered face's record (the JSON line) as soon as it is complete (worker thread)."""
    check_outputs(config)
    stats = LiveStats()
    lock = threading.Lock()
    outputs: _Outputs | None = None
    finished = False
    try:
        outputs = _Outputs(config, source)

        def on_answer(item: TrackAnswer) -> None:
            done = time.perf_counter()
            first = item.first_token if item.first_token is not None else done
            rec = {"frame": item.frame, **item.face.to_dict(), "question": config.question, "answer": item.text,
                   "stop_reason": item.stop_reason, "n_tokens": item.n_tokens,
                   "since_seen_ms": {"first_token": round((first - item.seen) * 1e3, 1),
                                     "answer": round((done - item.seen) * 1e3, 1)}}
            with lock:
                if outputs.closed:  # a late answer from a worker that outlived the join timeout
                    return
                stats.answers += 1  # records go to --jsonl / on_record as they come: none kept in memory
                outputs.record(rec)
            if on_record is not None:
                on_record(rec)

        worker = VlmWorker(model, config, on_answer)
        _loop(model, source, config, stats, worker, outputs)
        finished = True  # the source ended, the user quit, or Ctrl-C / SIGTERM: keep what was made
    finally:
        if outputs is not None:
            with lock:
                outputs.close(keep=finished)
    if stats.interrupted:
        log.info("interrupted; %d frames, %d answers kept", stats.frames, stats.answers)
    return stats


def _loop(model: Any, source: FrameSource, config: LiveConfig, stats: LiveStats, worker: VlmWorker,
          outputs: "_Outputs") -> None:
    import cv2

    tracker = IouTracker(config.tracker)
    stats.frame_ms = deque(maxlen=config.frame_latencies)
    t_start = time.perf_counter()
    try:
        worker.start()
        for frame in source:
            if worker.error is not None:
                raise worker.error
            t_frame = time.perf_counter()
            faces = model.detect(frame.image)
            faces, ended = tracker.update(faces, frame.index)
            if ended:
                worker.end_tracks(ended)
            worker.offer(frame.index, frame.image, faces)
            stats.frames += 1
            stats.faces += len(faces)
            stats.tracks = tracker.started
            if outputs.video is not None or config.display:
                shown = draw(frame.image, faces, worker.texts(),
                             status=f"{stats.frames / max(time.perf_counter() - t_start, 1e-6):.1f} FPS")
                if outputs.video is not None:
                    outputs.write_frame(shown)
                if config.display:
                    cv2.imshow(config.window, shown)
                    if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                        break
            stats.frame_ms.append((time.perf_counter() - t_frame) * 1e3)
            if config.max_frames and stats.frames >= config.max_frames:
                break
        else:
            if not source.live:  # a file ended: let the worker finish what it has
                if not worker.wait_idle(config.drain_timeout_s):
                    log.warning("answers still pending after %.0fs; stopping", config.drain_timeout_s)
    except KeyboardInterrupt:
        log.info("interrupted; shutting down")
        stats.interrupted = True
    finally:
        stats.seconds = time.perf_counter() - t_start
        worker.stop()
        if worker.ident is not None:  # started
            worker.join(timeout=config.join_timeout_s)
        if worker.is_alive():
            log.warning("VLM worker did not stop within %.1fs", config.join_timeout_s)
        source.close()
        stats.dropped_jobs = worker.jobs.dropped
        stats.skipped = getattr(source, "skipped", 0)
        if config.display:
            cv2.destroyAllWindows()
    if worker.error is not None:
        raise worker.error


class _Outputs:
    """The loop's files. JSON lines: opened (created, or appended to) before the first frame, one flushed and
    fsync-ed line per answer. Video: a temporary file beside ``--output`` (stale ones of dead runs removed first)
    that replaces it at the end when frames were written, and is removed otherwise. After an error the video is
    removed too, and so is a JSON lines file this run created and never wrote to; written lines always stay."""

    def __init__(self, config: LiveConfig, source: FrameSource) -> None:
        self.config = config
        self.fps = source.fps if source.fps and source.fps > 0 else 25.0
        self.closed = False
        self.jsonl = None
        self.video: Path | None = None
        self.writer = None
        self.frames = 0
        self.lines = 0
        self.created_jsonl = False
        try:
            if config.jsonl is not None:
                self.created_jsonl = not os.path.lexists(config.jsonl)
                self.jsonl = open_line_log(config.jsonl, append=config.append)
            if config.output is not None:
                clean_stale_temp_files(Path(config.output))
                self.video = temp_file_beside(Path(config.output))
        except BaseException:
            if self.jsonl is not None:
                self.jsonl.close()
                if self.created_jsonl:
                    Path(config.jsonl).unlink(missing_ok=True)
            raise

    def record(self, rec: dict) -> None:
        if self.jsonl is not None:
            write_line(self.jsonl, json.dumps(rec))
            self.lines += 1

    def write_frame(self, image: np.ndarray) -> None:
        import cv2

        if self.writer is None:
            h, w = image.shape[:2]
            self.writer = cv2.VideoWriter(str(self.video), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not self.writer.isOpened():
                raise OutputError(f"cannot write video {self.config.output} (mp4v codec unavailable)")
        self.writer.write(image)
        self.frames += 1

    def close(self, keep: bool) -> None:
        """Finalise: the video becomes ``--output`` when ``keep`` and frames were written; temps always go."""
        self.closed = True
        try:
            if self.jsonl is not None:
                self.jsonl.close()
                if not keep and self.created_jsonl and not self.lines:
                    Path(self.config.jsonl).unlink(missing_ok=True)
        finally:
            if self.video is not None:
                try:
                    if self.writer is not None:
                        self.writer.release()
                    if keep and self.frames:
                        commit_temp_file(self.video, Path(self.config.output))
                finally:
                    Path(self.video).unlink(missing_ok=True)  # no-op once committed
