"""The live loop's files: ``--jsonl`` (one flushed, fsync-ed line per answer) and ``--output`` (the annotated
video, written to a temporary file that replaces the destination only once complete and checked). Paths are checked
before the first frame."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from facellm_edge.errors import OutputError, UsageError
from facellm_edge.io import (check_output_file, clean_stale_temp_files, commit_temp_file, open_line_log,
                             temp_file_beside, write_line)
from facellm_edge.runtime.live.sources import FrameSource

if TYPE_CHECKING:
    from facellm_edge.runtime.live.loop import LiveConfig

log = logging.getLogger(__name__)

# --output as one annotated image: what the sources read too (sources.IMAGE_EXTS), written by cv2.imencode
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# --output as a video: the containers FFmpeg muxes mp4v into (each checked to read back frame for frame). Any
# other suffix is refused: for some (.gif, .webm) FFmpeg refuses mp4v and OpenCV fell back to its image-sequence
# writer, which read the pid in the temporary name as a frame counter and left annotated frames on disk.
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv")


def is_image_output(path: Path | None) -> bool:
    return path is not None and Path(path).suffix.lower() in IMAGE_SUFFIXES


def check_output_source(config: LiveConfig, source: FrameSource) -> None:
    """``--output x.jpg`` writes one image: the source must be one still image."""
    if config.output is not None and len(getattr(source, "sources", ())) > 1:
        raise OutputError(f"--output {config.output} records one source, but {source.description} are several; "
                          "write --jsonl for all of them, or run once per source to record each")
    if is_image_output(config.output) and not (getattr(source, "still", False) and len(getattr(source, "paths", ())) == 1):
        what = source.description or "not one image"
        raise OutputError(f"--output {config.output} writes one image, but the source is {what}; give one image as "
                          "--source, or write a video (--output out.mp4)")


def check_outputs(config: LiveConfig, sources: Iterable[Path] = ()) -> None:
    """Check the output paths before any work (a folder, an existing file, an unwritable place, an unknown
    suffix, a file the run reads: one line now, not after the whole run). ``sources``: the files the sources read
    (``FrameSource.files``, ``sources.source_files``). Nothing is created."""
    if config.output is not None and Path(config.output).suffix.lower() not in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
        raise UsageError(f"--output {config.output}: cannot write a {Path(config.output).suffix or 'suffix-less'} "
                         f"file; end it with a video suffix ({' '.join(VIDEO_SUFFIXES)}) or an image suffix "
                         f"({' '.join(IMAGE_SUFFIXES)})")
    _check_not_a_source(config, sources)
    if config.jsonl is not None:
        check_output_file(config.jsonl, option="--jsonl", exists="append" if config.append else "refuse",
                          fix="pass --append to add to it, or choose another file")
    if config.output is not None:
        if config.jsonl is not None and Path(config.jsonl).resolve() == Path(config.output).resolve():
            raise OutputError(f"--jsonl and --output are the same file ({config.output}); give two paths")
        check_output_file(config.output, option="--output", exists="replace" if config.overwrite else "refuse",
                          fix="pass --force to replace it, or choose another file")


def _check_not_a_source(config: LiveConfig, sources: Iterable[Path]) -> None:
    """An output that is one of the files read (by name, through a link, or a hard link) would replace or append
    to the user's input, --force/--append or not: refused."""
    read = [(Path(p).resolve(), Path(p)) for p in sources]
    for option, path in (("--output", config.output), ("--jsonl", config.jsonl)):
        if path is None:
            continue
        target = Path(path).resolve()
        for resolved, given in read:
            if target == resolved or (target.exists() and resolved.exists() and os.path.samefile(target, resolved)):
                raise UsageError(f"{option} {path} is {given}, which this run reads; write to another file")


def letterbox(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` scaled to fit ``size`` (w, h), its aspect kept, centred on black: a frame of another size than
    the video's (a folder of photos of mixed sizes) is written whole instead of refused by the encoder."""
    import cv2

    w, h = size
    if image.shape[1] == w and image.shape[0] == h:
        return image
    s = min(w / image.shape[1], h / image.shape[0])
    rw, rh = max(1, min(w, round(image.shape[1] * s))), max(1, min(h, round(image.shape[0] * s)))
    resized = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    out = np.zeros((h, w, 3), np.uint8)
    y, x = (h - rh) // 2, (w - rw) // 2
    out[y:y + rh, x:x + rw] = resized
    return out


@contextlib.contextmanager
def _opencv_quiet() -> Iterator[None]:
    """OpenCV's own warnings off for a call whose failure this module reports as one line itself."""
    import cv2

    before = cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(before)


class LiveOutputs:
    """The loop's files. JSON lines: opened (created, or appended to) before the first frame, one flushed and
    fsync-ed line per answer. Video: a temporary file beside ``--output`` (stale ones of dead runs removed first)
    that replaces it at the end when frames were written and the file reads back with every one of them, and is
    removed otherwise. After an error the video is removed too, and so is a JSON lines file this run created and
    never wrote a line to; written lines always stay."""

    def __init__(self, config: LiveConfig, source: FrameSource) -> None:
        self.config = config
        self.fps = source.fps if source.fps and source.fps > 0 else 25.0
        self.closed = False
        self.jsonl = None
        self.video: Path | None = None
        self.writer = None
        self.size: tuple[int, int] | None = None  # the video's (w, h): its first frame's
        self.still: np.ndarray | None = None  # image output: the last annotated frame
        self.letterboxed = False  # a frame of another size was fitted to the video's (said once)
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
            try:
                write_line(self.jsonl, json.dumps(rec))
            except OSError as exc:  # named here: the bare OSError ("file too large") did not say which file
                raise OutputError(f"cannot write {self.config.jsonl}: {(exc.strerror or str(exc)).lower()}") from exc
            self.lines += 1

    def write_frame(self, image: np.ndarray) -> None:
        import cv2

        if is_image_output(self.config.output):
            self.still = image
            self.frames += 1
            return
        if self.writer is None:
            os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's own lines: the error says it once
            h, w = image.shape[:2]
            self.size = (w, h)
            # FFmpeg only: OpenCV's fallback for a container FFmpeg refuses is an image-sequence writer
            self.writer = cv2.VideoWriter(str(self.video), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"mp4v"),
                                          self.fps, (w, h))
            if not self.writer.isOpened():
                raise OutputError(f"cannot write video {self.config.output} (mp4v codec unavailable)")
        elif (image.shape[1], image.shape[0]) != self.size:
            if not self.letterboxed:
                self.letterboxed = True
                log.info("frames of another size than the video's %dx%d (its first frame's) are letterboxed",
                         *self.size)
            image = letterbox(image, self.size)
        with _opencv_quiet():  # its "Failed to write frame": the OutputError below says it, once
            ok = self.writer.write(image)
        if ok is False:  # OpenCV >= 5 says so; 4.x returns None (close() checks the file)
            raise OutputError(f"cannot write video {self.config.output}: frame {self.frames + 1} was not written "
                              "(disk full, or the file too large?)")
        self.frames += 1

    def close(self, keep: bool) -> None:
        """Finalise: the video becomes ``--output`` when ``keep``, frames were written and it reads back; temps
        always go. ``keep=False`` (an error is on its way up): errors of closing are logged, not raised over it."""
        self.closed = True
        try:
            if self.jsonl is not None:
                try:
                    self.jsonl.close()  # re-flushes a line a full disk refused: fails again
                except OSError as exc:
                    if keep:
                        raise OutputError(f"cannot write {self.config.jsonl}: {exc.strerror or exc}") from exc
                    log.debug("closing %s: %s", self.config.jsonl, exc)
                finally:
                    if not keep and self.created_jsonl and not self.lines:
                        Path(self.config.jsonl).unlink(missing_ok=True)
        finally:
            if self.video is not None:
                try:
                    if self.writer is not None:
                        self.writer.release()
                    if keep and self.still is not None:
                        self._write_still()
                    if keep and self.frames:
                        if self.writer is not None:
                            self._check_video()
                        commit_temp_file(self.video, Path(self.config.output))
                finally:
                    Path(self.video).unlink(missing_ok=True)  # no-op once committed

    def _check_video(self) -> None:
        """The temporary video must read back with every frame written: FFmpeg reports a failed write (a full
        disk) only in a log line, and a file cut short has no index (it does not open at all)."""
        import cv2

        with _opencv_quiet():  # its warning that the file does not open: the OutputError below says it
            cap = cv2.VideoCapture(str(self.video), cv2.CAP_FFMPEG)
        try:
            found = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
        finally:
            cap.release()
        # at least: Ctrl-C landing between a frame's write and its count leaves one frame more (it is kept)
        if found < self.frames:
            raise OutputError(f"cannot write video {self.config.output}: {max(found, 0)} of its {self.frames} frames "
                              "could be read back (disk full, or the file too large?); the video was not kept")

    def _write_still(self) -> None:
        import cv2

        ok, data = cv2.imencode(Path(self.config.output).suffix.lower(), self.still)
        if not ok:
            raise OutputError(f"cannot encode {self.config.output} as {Path(self.config.output).suffix} image")
        try:
            Path(self.video).write_bytes(data.tobytes())
        except OSError as exc:
            raise OutputError(f"cannot write {self.config.output}: {exc.strerror or exc}") from exc
