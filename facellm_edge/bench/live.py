"""Live-loop benchmark: the runtime's own live loop, measured while its VLM worker idles and while it is busy.

Every run is :func:`facellm_edge.runtime.live.loop.run_live` — the function ``facellm-edge run`` calls — headless
(``display=False``, no ``--output``: per frame detect + track + hand-over to the worker, as ``run --no-display``),
with its real :class:`~facellm_edge.runtime.live.worker.VlmWorker` answering the standing question once per new
track in the track's own session. The frames come from an in-memory :class:`ClipSource` (decoded or drawn up
front, so no decoding is timed; a file source: every frame in order, as fast as the loop goes):

* **idle**: one person stays in front of the camera (the photo's largest face, panned a few pixels per frame).
  The clip's first frame is handed out, then the source waits until the worker has answered every face of that
  frame; only the frames after it are measured. The worker is started and waiting, as in ``run`` once everyone
  present has been answered.
* **busy** (one run per llama.cpp thread policy): people keep arriving — every ``segment`` frames another face of
  the photo, on the other side of the frame, so the tracker starts a new track and the previous one ends after
  ``TrackerConfig.max_missed`` frames (its session is closed). The worker keeps answering new tracks.

With ``--video`` the busy clip is the video's frames and the idle clip its first frame, held.

The model is loaded per policy with ``RuntimeConfig.for_live()`` (1 detector thread, 1 ONNX thread) and that many
llama.cpp threads, answers of ``decode_tokens`` tokens (``stop_at_eos=False``); one warm-up answer before the
clips. Per run: FPS over the measured frames (from the first measured frame handed out to the end of the clip; the
wait for answers still pending when a file ends is not counted), per-frame loop latency from ``LiveStats.frame_ms``,
answers (and how many were complete before the clip ended), the decode rate of the answers' records
(tokens after the first / ``decode``) and the kiosk metric ``since_seen_ms``: how long after a person's first frame
the first token and the whole answer came. The winning policy: the highest decode rate among the busy runs that
meet the frame-loop targets (``TARGETS``: >= 25 FPS, p99 < 80 ms); if none meets them, the highest FPS.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from facellm_edge.bench.config import TARGETS
from facellm_edge.bench.stages import summarize
from facellm_edge.errors import InputError
from facellm_edge.runtime.live.sources import Frame, FrameSource

if TYPE_CHECKING:
    from facellm_edge.runtime.pipeline import FaceLLM

log = logging.getLogger(__name__)

CODE_PATH = "facellm_edge.runtime.live.loop.run_live, headless (run --no-display), its VlmWorker answering"
SETTLE_TIMEOUT_S = 300.0  # idle clip: the longest wait for the answers about the first frame's faces
WINNER_RULE = ("highest VLM decode rate among busy policies meeting >= 25 FPS and p99 < 80 ms; else the highest "
               "FPS")


def live_payload(bundle: Path, vision: str, quant: str, image: Path, video: Path | None, frames: int, width: int,
                 height: int, llama_threads: tuple[int, ...], decode_tokens: int, question: str,
                 detector_model: Path | None, cores: int, kiosk: bool = True, runs: int = 1,
                 device: str = "cpu") -> dict[str, Any]:
    return {"bundle": str(bundle), "vision": vision, "quant": quant, "image": str(image),
            "video": str(video) if video else None, "frames": frames, "width": width, "height": height,
            "llama_threads": list(llama_threads), "decode_tokens": decode_tokens, "question": question,
            "detector_model": str(detector_model) if detector_model else None, "cores": cores, "kiosk": kiosk,
            "runs": runs, "device": device}


# -- clips -----------------------------------------------------------------------------------------------------

def person_crops(photo: np.ndarray, boxes: list[np.ndarray], side: int) -> list[np.ndarray]:
    """A ``side`` x ``side`` picture of each face: the square 2.2 face-sizes wide around its box (black beyond the
    photo's edges), resized."""
    import cv2

    out = []
    for x1, y1, x2, y2 in boxes:
        half = 1.1 * max(x2 - x1, y2 - y1)
        cx, cy, pad = (x1 + x2) / 2, (y1 + y2) / 2, int(np.ceil(half)) + 1
        big = cv2.copyMakeBorder(photo, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        a, b = int(round(cx - half)) + pad, int(round(cy - half)) + pad
        size = int(round(2 * half))
        out.append(cv2.resize(big[b:b + size, a:a + size], (side, side), interpolation=cv2.INTER_AREA))
    return out


def place(person: np.ndarray, width: int, height: int, slot: int, i: int) -> np.ndarray:
    """Frame ``i``: ``person`` on black, centred at 30 % (slot 0) or 70 % (slot 1) of the width, panned by up to
    +-8 px so the tracker has motion to follow."""
    frame = np.zeros((height, width, 3), np.uint8)
    h, w = person.shape[:2]
    x0 = int(round((0.3 if slot == 0 else 0.7) * width - w / 2 + 8 * np.sin(2 * np.pi * i / 60)))
    y0 = int(round((height - h) / 2 + 4 * np.cos(2 * np.pi * i / 45)))
    fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + w, width), min(y0 + h, height)
    frame[fy0:fy1, fx0:fx1] = person[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0]
    return frame


def person_side(width: int, height: int) -> int:
    """Side of a person's picture in a ``width`` x ``height`` frame (two fit side by side)."""
    return int(min(0.6 * height, 0.45 * width))


def idle_clip(person: np.ndarray, n: int, width: int, height: int) -> list[np.ndarray]:
    """``n`` frames of one person staying on the left, panned."""
    return [place(person, width, height, 0, i) for i in range(n)]


def arrivals_clip(people: list[np.ndarray], n: int, width: int, height: int, segment: int) -> list[np.ndarray]:
    """``n`` frames in which another person arrives every ``segment`` frames, alternately left and right (the
    boxes of two consecutive people never overlap, so each arrival is a new track)."""
    return [place(people[(i // segment) % len(people)], width, height, (i // segment) % 2, i) for i in range(n)]


def video_frames(path: str, n: int) -> list[np.ndarray]:
    """The first ``n`` frames of a video (through the runtime's ``VideoFile``), repeated when it has fewer."""
    from facellm_edge.runtime.live.sources import VideoFile

    frames: list[np.ndarray] = []
    with VideoFile(Path(path)) as src:
        for frame in src:
            frames.append(frame.image)
            if len(frames) >= n:
                break
    if not frames:
        raise InputError(f"video {path} has no readable frames")
    return [frames[i % len(frames)] for i in range(n)]


class ClipSource(FrameSource):
    """In-memory frames for ``run_live``: not live (every frame, in order, as fast as the loop takes them).

    Frames from ``measure_from`` on are measured: before handing out that one, ``hold()`` (if given) is called and
    waited for; ``seconds`` runs from then to the loop asking for a frame after the last one."""

    live = False

    def __init__(self, frames: list[np.ndarray], description: str, *, measure_from: int = 0,
                 hold: Callable[[], None] | None = None) -> None:
        if not 0 <= measure_from < len(frames):
            raise ValueError(f"measure_from {measure_from} is outside the {len(frames)} frames")
        self.frames = frames
        self.description = description
        self.measure_from = measure_from
        self.hold = hold
        self.t_start: float | None = None
        self.t_end: float | None = None

    def __iter__(self) -> Iterator[Frame]:
        for i, image in enumerate(self.frames):
            if i == self.measure_from:
                if self.hold is not None:
                    self.hold()
                self.t_start = time.perf_counter()
            yield Frame(i, image)
        self.t_end = time.perf_counter()

    @property
    def measured(self) -> int:
        return len(self.frames) - self.measure_from

    @property
    def seconds(self) -> float:
        if self.t_start is None or self.t_end is None:
            raise RuntimeError("the clip was not played to its end")
        return self.t_end - self.t_start


class PacedClip(FrameSource):
    """Frames drawn by ``draw(i)`` at ``fps``, as a camera delivers them: a loop that falls behind gets the newest
    frame (the frame numbers skip the ones it missed; ``dropped`` counts them). Endless until :meth:`close`."""

    live = True

    def __init__(self, draw: Callable[[int], np.ndarray], fps: float, description: str) -> None:
        self.draw, self._fps, self.description = draw, float(fps), description
        self._closed = threading.Event()
        self.handed = 0  # frames handed to the loop
        self.last = -1  # the newest frame number handed out

    @property
    def fps(self) -> float:
        return self._fps

    @property
    def dropped(self) -> int:
        """Camera frames the loop never got (it was busy when they were the newest)."""
        return self.last + 1 - self.handed

    def __iter__(self) -> Iterator[Frame]:
        t0 = time.monotonic()
        while not self._closed.is_set():
            due = max(self.last + 1, int((time.monotonic() - t0) * self._fps))  # the newest frame the camera has
            wait = t0 + due / self._fps - time.monotonic()
            if wait > 0 and self._closed.wait(wait):
                return
            self.last, self.handed = due, self.handed + 1
            yield Frame(due, self.draw(due))

    def close(self) -> None:
        self._closed.set()


class Records:
    """``run_live``'s ``on_record``: keeps each answer record with its arrival time; ``wait_for(n)`` blocks until
    ``n`` records have come (or ``timeout_s``)."""

    def __init__(self) -> None:
        self.items: list[tuple[float, dict[str, Any]]] = []
        self._cond = threading.Condition()

    def __call__(self, rec: dict[str, Any]) -> None:
        with self._cond:
            self.items.append((time.perf_counter(), rec))
            self._cond.notify_all()

    def wait_for(self, n: int, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.items) >= n, timeout=timeout_s)


# -- one run -------------------------------------------------------------------------------------------------

def decode_rate(records: list[dict[str, Any]]) -> float | None:
    """Tokens after the first over ``decode`` time, summed over the answers' records (None without decode time)."""
    tokens = sum(max(r["n_tokens"] - 1, 0) for r in records)
    ms = sum(r["timings_ms"].get("decode", 0.0) for r in records)
    return round(tokens / ms * 1000.0, 2) if tokens and ms > 0 else None


def since_seen(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The kiosk metric: first token and whole answer, ms after the person's first frame (median, p90, ...)."""
    seen = [r["since_seen_ms"] for r in records if "since_seen_ms" in r]  # first answers (not follow-ups)
    if not seen:
        return None
    return {k: summarize([s[k] for s in seen]) for k in ("first_token", "answer")}


def play(model: "FaceLLM", source: ClipSource, question: str, records: Records) -> dict[str, Any]:
    """``run_live`` on ``source``, headless; the measured frames' FPS and latency, the answers' metrics."""
    from facellm_edge.runtime.live.loop import LiveConfig, run_live

    cfg = LiveConfig(question=question, display=False, frame_latencies=len(source.frames))
    stats = run_live(model, source, cfg, on_record=records)
    measured = list(stats.frame_ms)[-source.measured:]
    recs = [r for _, r in records.items]
    return {"fps": round(source.measured / source.seconds, 2), "frames": source.measured,
            "frame_ms": summarize(measured), "faces_per_frame": round(stats.faces / max(stats.frames, 1), 2),
            "tracks": stats.tracks, "answers": stats.answers,
            "answers_in_loop": sum(1 for t, _ in records.items if source.t_start <= t <= source.t_end),
            "dropped_jobs": stats.dropped_jobs, "decode_tok_s": decode_rate(recs), "since_seen_ms": since_seen(recs)}


def idle_run(model: "FaceLLM", frames: list[np.ndarray], question: str, description: str) -> dict[str, Any]:
    """Frame 0 is handed out, its faces answered, then the rest is measured with the worker waiting."""
    records = Records()
    expected = len(model.detect(frames[0]))  # what frame 0 hands the worker (the same detector, same frame)
    settled: list[bool] = []

    def hold() -> None:
        settled.append(records.wait_for(expected, timeout_s=SETTLE_TIMEOUT_S))
        if not settled[-1]:
            log.warning("the VLM worker did not answer the idle clip's %d faces within %.0f s; measuring anyway",
                        expected, SETTLE_TIMEOUT_S)

    source = ClipSource(frames, description, measure_from=1, hold=hold)
    run = play(model, source, question, records)
    # the answers of frame 0 were made while the loop waited: not the idle loop's, and not a live measurement
    return {**run, "answered_before": expected, "settled": all(settled), "decode_tok_s": None,
            "since_seen_ms": None}


def busy_run(model: "FaceLLM", frames: list[np.ndarray], question: str, description: str) -> dict[str, Any]:
    return play(model, ClipSource(frames, description), question, Records())


def warm_up(model: "FaceLLM", photo: np.ndarray, question: str, image_name: str) -> None:
    """One answer about the photo's largest face, so no run pays the first ONNX / llama.cpp calls."""
    from facellm_edge.bench.edge import largest_face

    face = largest_face(model.detect(photo), image_name)
    model.encode_faces(photo, [face])
    with model.open_face(face) as session:
        session.ask(question, max_tokens=2)


def meets_loop_targets(run: dict[str, Any]) -> bool:
    _, fps_min, _ = TARGETS["live_fps_busy"]
    _, p99_max, _ = TARGETS["live_p99_busy_ms"]
    return run["fps"] >= fps_min and run["frame_ms"]["p99"] < p99_max


def pick_winner(runs: list[dict[str, Any]]) -> str:
    busy = [r for r in runs if r["vlm_busy"]]
    good = [r for r in busy if meets_loop_targets(r)]
    if good:
        return max(good, key=lambda r: r["decode_tok_s"] or 0.0)["name"]
    return (max(busy, key=lambda r: r["fps"]) if busy else runs[0])["name"]


def make_clips(model: "FaceLLM", p: dict[str, Any], photo: np.ndarray) -> dict[str, Any]:
    """The idle clip (``n`` + 1 frames: the first one is answered before the measured ``n``), the busy clip, and
    what they show. Synthetic clips are drawn around the faces the runtime's detector finds in the photo."""
    from facellm_edge.bench.edge import largest_face
    from facellm_edge.runtime.live.tracker import TrackerConfig

    n, w, h = int(p["frames"]), int(p["width"]), int(p["height"])
    if p["video"]:
        busy = video_frames(p["video"], n)
        return {"idle": [busy[0]] * (n + 1), "busy": busy, "source": f"video {Path(p['video']).name}",
                "idle_clip": "the video's first frame, held", "busy_clip": "the video's frames"}
    name = Path(p["image"]).name
    segment = TrackerConfig().max_missed + 5  # the previous person's track ends during the next one's segment
    faces = sorted(model.detect(photo), key=lambda f: -f.width * f.height)
    largest_face(faces, p["image"])
    people = person_crops(photo, [f.box for f in faces], person_side(w, h))
    return {"idle": idle_clip(people[0], n + 1, w, h), "busy": arrivals_clip(people, n, w, h, segment),
            "source": f"synthetic clips of {name}", "idle_clip": f"the largest face of {name} staying",
            "busy_clip": f"the {len(people)} faces of {name} arriving one after another, a new one every {segment} "
                         "frames"}


def bench_live(p: dict[str, Any]) -> dict[str, Any]:
    """Entry point of the subprocess: per llama.cpp thread policy, load the model for the live loop; the first
    policy's model also runs the idle clip."""
    from facellm_edge.bench.edge import read_bgr, runtime_config
    from facellm_edge.runtime.pipeline import FaceLLM

    photo = read_bgr(p["image"])
    runs: list[dict[str, Any]] = []
    clips: dict[str, Any] = {}
    for i, k in enumerate(int(k) for k in p["llama_threads"]):
        with FaceLLM.load(p["bundle"], runtime_config(p, threads=1, llama_threads=k).for_live()) as model:
            clips = clips or make_clips(model, p, photo)  # drawn once, with the runtime's detector
            warm_up(model, photo, p["question"], p["image"])
            if i == 0:
                runs.append({"name": "idle", "llama_threads": k, "vlm_busy": False, "clip": clips["idle_clip"],
                             **idle_run(model, clips["idle"], p["question"], clips["idle_clip"])})
            runs.append({"name": f"busy, llama.cpp {k} thread{'s' if k > 1 else ''} + detector 1 thread",
                         "llama_threads": k, "vlm_busy": True, "clip": clips["busy_clip"],
                         **busy_run(model, clips["busy"], p["question"], clips["busy_clip"])})
    h, w = clips["busy"][0].shape[:2]
    kiosk = None
    if p.get("kiosk") and not p["video"]:
        from facellm_edge.bench.kiosk import bench_kiosk

        kiosk = bench_kiosk(p, photo, int(p.get("cores") or max(p["llama_threads"])))
    from facellm_edge.runtime.live.loop import LiveConfig

    defaults = LiveConfig(question=p["question"])  # run's auto detection pace on this machine
    return {"name": "live", "kind": "live", "code_path": CODE_PATH,
            "detect_every": defaults.stride, "detect_every_busy": defaults.busy_stride,  # ... while the worker answers
            "source": clips["source"], "width": w,
            "height": h, "frames": int(p["frames"]), "vision": p["vision"], "quant": p["quant"],
            "decode_tokens": int(p["decode_tokens"]), "runs": runs, "winner": pick_winner(runs),
            "winner_rule": WINNER_RULE, "kiosk": kiosk}
