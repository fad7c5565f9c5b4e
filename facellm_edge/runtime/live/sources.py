"""Frame sources: camera index, video file, image, folder of images, RTSP/HTTP stream.

Files are read in order, every frame. Live sources (cameras, streams) are read by a thread that keeps only the
newest frame, so a slow consumer never sees stale video; a lost camera or stream is reopened with exponential
backoff (logged once per outage). Consumers wait on a condition variable (no sleep-polling).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from facellm_edge.errors import InputError
from facellm_edge.io import DEFAULT_MAX_PIXELS, read_image

__all__ = ["FrameSource", "ImageFiles", "VideoFile", "LiveCapture", "MultiSource", "open_source", "open_sources",
           "source_files", "Frame"]

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


class Capture(Protocol):  # the part of cv2.VideoCapture we use
    def isOpened(self) -> bool: ...
    def read(self) -> tuple[bool, Any]: ...
    def release(self) -> None: ...
    def get(self, prop: int) -> float: ...


Opener = Callable[[Any], Capture]


@dataclass(frozen=True)
class Frame:
    index: int  # sequence number from the source (0, 1, 2 ...), increasing even when frames are dropped
    image: np.ndarray
    name: str = ""  # file name for images / folders
    source: str = ""  # which source it came from, when several are read in turn (MultiSource)


@dataclass(frozen=True)
class ReconnectPolicy:
    initial_s: float = 0.5
    max_s: float = 8.0
    factor: float = 2.0


def _default_opener(target: Any) -> Capture:
    import os

    # FFmpeg's own messages about damaged frames would go straight to stderr, one per frame; the sources report
    # skipped frames themselves. Read once, when OpenCV opens its first video: a user's own setting is kept.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    import cv2

    return cv2.VideoCapture(target)


class FrameSource:
    """Base: iterate frames with ``for frame in source``; ``close()`` (or a ``with`` block) releases everything."""

    live = False
    still = False  # separate still images (each one a new scene; its output waits for its answers)
    description = ""
    skipped = 0  # images / frames that could not be read and were left out (each logged once as a warning)
    unit = "frames"
    files: tuple[Path, ...] = ()  # the files it reads (no output may be one of them)

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def still_for(self, name: str) -> bool:
        """Whether frames from the source called ``name`` are still images (one source: ``still``)."""
        return self.still

    def close(self) -> None:
        pass

    @property
    def fps(self) -> float:
        return 0.0

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ImageFiles(FrameSource):
    """One image or a folder of images (sorted by name). In a folder, an image that cannot be read (damaged, not an
    image, too large, no permission) is skipped with a warning and counted in ``skipped``; only when none of them
    can be read is that an error."""

    unit = "images"
    still = True

    def __init__(self, paths: list[Path], description: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if not paths:
            raise InputError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) in {description}")
        self.paths = paths
        self.files = tuple(paths)
        self.description = description
        self.max_pixels = max_pixels
        self.skipped = 0

    def __iter__(self) -> Iterator[Frame]:
        self.skipped = 0
        for i, p in enumerate(self.paths):
            try:
                image = read_image(p, self.max_pixels)
            except InputError as exc:
                if len(self.paths) == 1:
                    raise
                self.skipped += 1
                log.warning("%s; skipped", exc)
                continue
            yield Frame(i, image, p.name)
        if self.skipped == len(self.paths):
            raise InputError(f"none of the {len(self.paths)} images in {self.description} could be read")


class VideoFile(FrameSource):
    """A video file read in order, every frame. A frame that cannot be decoded (a damaged stretch of the file) is
    skipped and counted in ``skipped``, and reading goes on up to the container's frame count: a failed read is
    the end only past that count, when the count is unknown, or after ``max_bad_run`` failures in a row. Frame
    indexes are positions in the file (skipped ones included)."""

    def __init__(self, path: Path, opener: Opener = _default_opener, max_bad_run: int = 250) -> None:
        self.description = str(path)
        self.files = (Path(path),)
        self.max_bad_run = max_bad_run
        self.skipped = 0
        self._cap = opener(str(path))
        if not self._cap.isOpened():
            self._cap.release()
            raise InputError(f"cannot open video {path} (unsupported codec or not a video)")
        self._stopped = threading.Event()

    def _frame_count(self) -> int:
        import cv2

        try:
            return max(0, int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0))
        except Exception:  # a non-cv2 capture without properties
            return 0

    @property
    def fps(self) -> float:
        import cv2

        return float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)

    def __iter__(self) -> Iterator[Frame]:
        total, i, bad_run, good = self._frame_count(), 0, 0, 0
        while not self._stopped.is_set():
            ok, image = self._cap.read()
            if ok and image is not None:
                bad_run = 0
                good += 1
                yield Frame(i, image)
            elif i >= total or bad_run >= self.max_bad_run:
                break
            else:
                if bad_run == 0:
                    log.warning("%s: frame %d cannot be decoded (damaged?); skipping to the next good frame",
                                self.description, i)
                bad_run += 1
                self.skipped += 1
            i += 1
        if not good and self.skipped and not self._stopped.is_set():
            raise InputError(f"no frame of {self.description} could be decoded ({self.skipped} tried)")

    def close(self) -> None:
        self._stopped.set()
        self._cap.release()


class LiveCapture(FrameSource):
    """A camera or stream: a reader thread keeps the newest frame; reconnects with exponential backoff."""

    live = True

    def __init__(self, target: Any, *, opener: Opener = _default_opener,
                 reconnect: ReconnectPolicy = ReconnectPolicy(), description: str | None = None) -> None:
        self.target = target
        self.description = description or str(target)
        self._opener = opener
        self._policy = reconnect
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._seq = 0
        self._stop = threading.Event()
        self.reconnects = 0
        self._cap = opener(target)
        if not self._cap.isOpened():
            self._cap.release()
            raise InputError(f"cannot open {self.description} (check the camera index or URL, permissions, and "
                             "that no other program is using it)")
        self._fps = self._get_fps(self._cap)
        self._thread = threading.Thread(target=self._read_loop, name="frame-reader", daemon=True)
        self._thread.start()

    @staticmethod
    def _get_fps(cap: Capture) -> float:
        import cv2

        try:
            return float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        except Exception:  # a non-cv2 capture without properties
            return 0.0

    @property
    def fps(self) -> float:
        return self._fps

    def _read_loop(self) -> None:
        try:
            while not self._stop.is_set():
                ok, image = self._cap.read() if self._cap.isOpened() else (False, None)
                if ok and image is not None:
                    with self._cond:
                        self._latest = Frame(self._seq, image)
                        self._seq += 1
                        self._cond.notify_all()
                    continue
                if not self._reopen():
                    return
        finally:
            with self._cond:
                self._cond.notify_all()

    def _reopen(self) -> bool:
        """Reopen after a loss with exponential backoff; False when stopped."""
        self._cap.release()
        log.warning("lost %s; reconnecting (backoff from %.1fs up to %.1fs)", self.description,
                    self._policy.initial_s, self._policy.max_s)
        delay = self._policy.initial_s
        while not self._stop.wait(delay):
            cap = self._opener(self.target)
            if cap.isOpened():
                self._cap = cap
                self.reconnects += 1
                log.info("reconnected to %s", self.description)
                return True
            cap.release()
            delay = min(delay * self._policy.factor, self._policy.max_s)
        return False

    def read_latest(self, after: int, timeout: float | None = None) -> Frame | None:
        """The newest frame with index > ``after``; waits for one (None on timeout or when closed)."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._stop.is_set() or (self._latest is not None and self._latest.index > after),
                timeout=timeout,
            )
            if self._latest is not None and self._latest.index > after:
                return self._latest
            return None

    def __iter__(self) -> Iterator[Frame]:
        last = -1
        while not self._stop.is_set():
            frame = self.read_latest(last, timeout=1.0)
            if frame is None:
                continue
            last = frame.index
            yield frame

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=timeout)
        self._cap.release()


def open_source(spec: str | int, *, opener: Opener = _default_opener,
                reconnect: ReconnectPolicy = ReconnectPolicy(), max_pixels: int = DEFAULT_MAX_PIXELS) -> FrameSource:
    """``0``/``"0"`` camera index, ``rtsp://...``/``http://...`` stream, a directory, an image, or a video file.
    ``max_pixels`` bounds the size of image files (0 = no limit)."""
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        index = int(spec)
        return LiveCapture(index, opener=opener, reconnect=reconnect, description=f"camera {index}")
    text = str(spec).strip()
    if not text:
        raise InputError("empty --source; pass a camera index, a file, a folder or a stream URL")
    if text.lower().startswith(STREAM_SCHEMES):
        return LiveCapture(text, opener=opener, reconnect=reconnect, description=f"stream {text}")
    path = Path(text).expanduser()
    if path.is_dir():
        return ImageFiles(_images_in(path), f"folder {path}", max_pixels)
    if not path.exists():
        raise InputError(f"source not found: {path} (pass a camera index, a file, a folder or a stream URL)")
    if path.suffix.lower() in IMAGE_EXTS:
        return ImageFiles([path], str(path), max_pixels)
    return VideoFile(path, opener=opener)


class MultiSource(FrameSource):
    """Several sources read in turn (round robin; a source that ends drops out): each frame carries its source's
    description in ``Frame.source``. Live when any part is; the loop keeps one tracker per source."""

    unit = "frames"

    def __init__(self, sources: list[FrameSource]) -> None:
        self.sources = sources
        self.live = any(s.live for s in sources)
        self.description = " + ".join(s.description for s in sources)
        self.files = tuple(f for s in sources for f in s.files)
        self._still = {s.description: s.still for s in sources}

    def __iter__(self) -> Iterator[Frame]:
        from dataclasses import replace

        running = [(s.description, iter(s)) for s in self.sources]
        while running:
            for item in list(running):
                try:
                    frame = next(item[1])
                except StopIteration:
                    running.remove(item)
                    continue
                yield replace(frame, source=item[0])

    def still_for(self, name: str) -> bool:
        return self._still.get(name, False)

    @property
    def skipped(self) -> int:  # type: ignore[override]
        return sum(s.skipped for s in self.sources)

    @property
    def fps(self) -> float:
        return max((s.fps for s in self.sources), default=0.0)

    def close(self) -> None:
        for s in self.sources:
            s.close()


def _images_in(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    except OSError as exc:
        raise InputError(f"cannot list folder {folder}: {exc.strerror or exc}") from exc


def _identity(spec: "str | int") -> "tuple[str, Any]":
    """What a spec opens: a camera index (``0`` = ``00``), a URL, or a resolved path (``dir`` = ``dir/``)."""
    text = str(spec).strip()
    if isinstance(spec, int) or text.isdigit():
        return "camera", int(text)
    if text.lower().startswith(STREAM_SCHEMES):
        return "url", text
    return "path", Path(text).expanduser().resolve()


def source_files(specs: "list[str | int]") -> list[Path]:
    """The files ``open_sources(specs)`` reads (files, folders' images, .streams lists), none opened: for outputs."""
    files = [Path(str(s).strip()) for s in specs if _is_streams(s)]
    for kind, path in map(_identity, _expand(specs)):
        if kind == "path" and path.exists():
            files += _images_in(path) if path.is_dir() else [path]
    return files


def _is_streams(spec: "str | int") -> bool:
    return str(spec).strip().lower().endswith(".streams") and Path(str(spec).strip()).is_file()


def _expand(specs: "list[str | int]") -> "list[str | int]":
    """The specs with each ``.streams`` file replaced by the sources it lists."""
    expanded: list[str | int] = []
    for spec in specs:
        text = str(spec).strip()
        if _is_streams(spec):
            try:
                lines = Path(text).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"cannot read {text}: {exc}") from exc
            expanded += [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]
        else:
            expanded.append(spec)
    return expanded


def open_sources(specs: "list[str | int]", **kw: Any) -> FrameSource:
    """One source, or several read in turn. A ``.streams`` file lists sources one per line (``#`` comments), as in
    ultralytics. The same source twice (as resolved: ``_identity``) is refused (it would be opened twice)."""
    expanded = _expand(specs)
    if not expanded:
        raise InputError("no source given (a .streams file with no entries?)")
    seen = [_identity(s) for s in expanded]
    dup = next((str(expanded[i]).strip() for i, s in enumerate(seen) if s in seen[:i]), None)
    if dup is not None:
        raise InputError(f"source {dup} is given twice; give each camera, file or stream once")
    opened: list[FrameSource] = []
    try:
        for spec in expanded:
            opened.append(open_source(spec, **kw))
    except BaseException:
        for s in opened:
            s.close()
        raise
    return opened[0] if len(opened) == 1 else MultiSource(opened)
