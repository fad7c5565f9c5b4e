"""The live loop: detect + track + draw every frame; a VLM worker thread answers about each new face.

The frame loop never waits for the language model. It hands the worker the newest frame's faces that have no
answer yet through a drop-oldest queue of size 1; the worker encodes new faces' crops together as soon as they
appear (new tracks before pending answers), then answers them together (up to ``max_slots`` at a time: their image
prefixes and every decoding step share llama_decode calls), each in its track's own
:class:`~facellm_edge.runtime.session.FaceSession` (image prefill, then the question), streaming the answers token
by token into a per-track cache that the overlay draws. A track that ends closes its session (the KV slot is freed) and
leaves the cache. Each answer's record says how long after the face's first frame its first token and its full
answer came (``since_seen_ms``): what a person in front of the camera waits.

Shutdown (q/Esc, Ctrl-C or SIGTERM — the CLI turns both into KeyboardInterrupt —, end of a file source, which
first waits for the answers being made, as ``max_frames`` on a file does) stops the worker, joins threads with a
timeout, releases the source and finalises the outputs: the annotated video is written to a temporary file that
becomes ``--output`` (a playable file of every frame so far, checked) or is removed; JSON lines are appended and
flushed to the disk one by one, so an interrupted run or a power cut keeps every complete line.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable


from facellm_edge.runtime.live.control import LiveControl
from facellm_edge.runtime.live.outputs import LiveOutputs, check_output_source, check_outputs
from facellm_edge.runtime.live.overlay import draw
from facellm_edge.runtime.live.sources import FrameSource
from facellm_edge.runtime.live.tracker import DEFAULT_DETECT_EVERY, IouTracker, TrackerConfig, resolve_detect_every
from facellm_edge.runtime.live.worker import TrackAnswer, VlmWorker
from facellm_edge.signals import call_holding_signals

if TYPE_CHECKING:
    from facellm_edge.runtime.pipeline import FaceLLM

log = logging.getLogger(__name__)


# The live default answer length (`run --max-tokens`): every new face in front of a camera gets an answer, and a
# short one comes while the person is still there. ``ask`` keeps GenerationConfig's default.
LIVE_MAX_TOKENS = 64


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
    # Run the detector on every Nth frame of a source (still images: every one); the frames between are drawn with
    # the last detection's boxes. On small CPUs the detector is most of the frame loop's work, and what it does not
    # take goes to the answers (bench's kiosk run measures it). 0 = auto (tracker.resolve_detect_every).
    detect_every: int = DEFAULT_DETECT_EVERY

    def __post_init__(self) -> None:
        from facellm_edge.errors import UsageError
        from facellm_edge.llm.generator import check_question

        check_question(self.question)
        if self.detect_every < 0:
            raise UsageError(f"detect_every {self.detect_every} must be >= 0 (0 = auto, 1 = every frame)")

    @property
    def stride(self) -> int:
        """Frames per detection: ``detect_every``, auto resolved for this machine."""
        return resolve_detect_every(self.detect_every)

    @property
    def busy_stride(self) -> int:
        """Frames per detection while the VLM worker is answering (auto on a small CPU: sparser; else ``stride``)."""
        return resolve_detect_every(self.detect_every, busy=True)


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


def run_live(model: "FaceLLM", source: FrameSource, config: LiveConfig,
             on_record: Callable[[dict], None] | None = None, control: LiveControl | None = None) -> LiveStats:
    """Run the loop until the source ends, the user quits (q/Esc), Ctrl-C / SIGTERM or ``control.stop()``. Returns
    what happened.

    ``on_record`` gets each answered face's record (the JSON line) as soon as it is complete (worker thread).
    ``control`` (:class:`~facellm_edge.runtime.live.control.LiveControl`) streams events and frames out and takes
    the standing question and follow-up questions in, from other threads."""
    check_outputs(config, getattr(source, "files", ()))
    check_output_source(config, source)
    control = control if control is not None else LiveControl()
    stats = LiveStats()
    lock = threading.Lock()
    outputs: LiveOutputs | None = None
    finished = False
    try:
        outputs = LiveOutputs(config, source)

        def on_answer(item: TrackAnswer) -> None:
            done = time.perf_counter()
            first = item.first_token if item.first_token is not None else done
            since = "since_asked_ms" if item.follow_up else "since_seen_ms"  # a follow-up: from its question
            rec = {"source": item.source, "frame": item.frame, **item.face.to_dict(), "question": item.question,
                   "answer": item.text,
                   "stop_reason": item.stop_reason, "n_tokens": item.n_tokens, "follow_up": item.follow_up,
                   since: {"first_token": round((first - item.seen) * 1e3, 1),
                           "answer": round((done - item.seen) * 1e3, 1)}}
            with lock:
                if outputs.closed:  # a late answer from a worker that outlived the join timeout
                    return
                stats.answers += 1  # records go to --jsonl / on_record as they come: none kept in memory
                outputs.record(rec)
            if on_record is not None:
                on_record(rec)
            control.emit("answer", rec)

        def on_piece(item: TrackAnswer, piece: str) -> None:
            control.emit("token", {"source": item.source, "track_id": item.track_id, "question": item.question,
                                   "text": piece})

        worker = VlmWorker(model, config.question, on_answer, on_piece if control.on_event is not None else None)
        control.attach(worker)
        try:
            _loop(model, source, config, stats, worker, outputs, control)
        except KeyboardInterrupt:  # Ctrl-C / SIGTERM as the loop was shutting down (the source had ended)
            log.info("interrupted while shutting down")
            stats.interrupted = True
        finally:
            control.attach(None)
        finished = True  # the source ended, the user quit, or Ctrl-C / SIGTERM: keep what was made
    finally:
        if outputs is not None:
            with lock:
                outputs.close(keep=finished)
    if stats.interrupted:
        log.info("interrupted; %d frames, %d answers kept", stats.frames, stats.answers)
    return stats


def _loop(model: "FaceLLM", source: FrameSource, config: LiveConfig, stats: LiveStats, worker: VlmWorker,
          outputs: "LiveOutputs", control: LiveControl) -> None:
    import cv2

    ids = itertools.count(1)  # track ids unique across sources
    trackers: dict[str, IouTracker] = {}  # one per source (several cameras read in turn)
    seen: dict[str, int] = {}  # per source: index of its latest frame in this run (detect_every counts these)
    stride, busy_stride = config.stride, config.busy_stride
    if stride > 1:
        nth = lambda n: {2: "2nd", 3: "3rd"}.get(n, f"{n}th")  # noqa: E731
        log.info("face detection on every %s frame%s", nth(stride),
                 f" (every {nth(busy_stride)} while answering; auto on this small CPU: --detect-every 1 for every "
                 "frame)" if not config.detect_every else "")
    shown_faces: dict[str, list] = {}  # per source: the last detection's faces (drawn until the next one)
    stats.frame_ms = deque(maxlen=config.frame_latencies)
    t_start = time.perf_counter()
    try:
        worker.start()
        for frame in source:
            if worker.error is not None:
                raise worker.error
            t_frame = time.perf_counter()
            quit_key = False
            name = frame.source or getattr(source, "description", "")
            tracker = trackers.setdefault(name, IouTracker(config.tracker, ids=ids))
            still = source.still_for(frame.source) if frame.source else getattr(source, "still", False)
            seen[name] = seen.get(name, -1) + 1
            if still or seen[name] % (busy_stride if worker.busy else stride) == 0:
                renewed = tracker.end_all() if still else []  # each still image is a new scene
                faces, ended = tracker.update(model.detect(frame.image), frame.index)
                ended = renewed + ended
                if ended:
                    worker.end_tracks(ended)
                worker.offer(frame.index, frame.image, faces, name)
                shown_faces[name] = faces
            else:  # between detections: the last boxes, nothing new for the worker
                faces, ended = shown_faces.get(name, []), []
            if still and faces and not worker.wait_idle(config.drain_timeout_s):  # drawn with its answers
                log.warning("answers for %s still pending after %.0fs", frame.name or frame.index,
                            config.drain_timeout_s)
            stats.faces += len(faces)
            if control.on_event is not None:
                _emit_tracks(control, name, frame.index, faces, ended, stats.tracks)
            stats.tracks = sum(t.started for t in trackers.values())
            if outputs.video is not None or config.display or control.on_frame is not None:
                shown = draw(frame.image, faces, worker.texts(),
                             status=f"{(stats.frames + 1) / max(time.perf_counter() - t_start, 1e-6):.1f} FPS")
                if outputs.video is not None:
                    outputs.write_frame(shown)
                if control.on_frame is not None:
                    control.on_frame(shown)
                if config.display:
                    cv2.imshow(f"{config.window}: {name}" if len(trackers) > 1 or frame.source else config.window,
                               shown)
                    quit_key = cv2.waitKey(1) & 0xFF in (ord("q"), 27)
            stats.frames += 1  # done: drawn and written (a stop inside this frame leaves it out of both)
            stats.frame_ms.append((time.perf_counter() - t_frame) * 1e3)
            if quit_key or control.stopped:
                break
            if config.max_frames and stats.frames >= config.max_frames:
                _end_of_input(source, config, worker, capped=True)
                break
        else:
            _end_of_input(source, config, worker)
    except KeyboardInterrupt:
        log.info("interrupted; shutting down")
        stats.interrupted = True
    finally:
        stats.seconds = time.perf_counter() - t_start
        # A stop request that comes now (the source just ended) waits until the worker is stopped and the source
        # closed, then is raised (run_live keeps what was made).
        call_holding_signals(lambda: _shut_down(worker, source, config, stats))
    if worker.error is not None:
        raise worker.error


def _end_of_input(source: FrameSource, config: LiveConfig, worker: VlmWorker, capped: bool = False) -> None:
    """The source ended, or ``--max-frames`` was reached: a file's last faces are answered before the stop (up to
    ``drain_timeout_s``), whichever ended it; a camera or stream is cut at ``--max-frames``, and says what it drops."""
    if not source.live:
        if not worker.wait_idle(config.drain_timeout_s):
            log.warning("answers still pending after %.0fs; stopping", config.drain_timeout_s)
    elif capped and (dropped := worker.unanswered()):
        log.warning("stopped after --max-frames %d: %d face(s) seen were not answered", config.max_frames, dropped)


def _shut_down(worker: VlmWorker, source: FrameSource, config: LiveConfig, stats: LiveStats) -> None:
    import cv2

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


def _emit_tracks(control: LiveControl, source: str, frame: int, faces: list, ended: list[int],
                 started_before: int) -> None:
    """This frame's track events: lost tracks, new tracks (ids above the ones started before), every box."""
    for tid in ended:
        control.emit("track_lost", {"source": source, "frame": frame, "track_id": tid})
    boxes = [{"track_id": f.track_id, "box": f.box_json(), "score": round(f.score, 4)} for f in faces]
    for b in boxes:
        if b["track_id"] > started_before:
            control.emit("track_appeared", {"source": source, "frame": frame, "track_id": b["track_id"],
                                            "box": b["box"]})
    control.emit("tracks", {"source": source, "frame": frame, "tracks": boxes})
