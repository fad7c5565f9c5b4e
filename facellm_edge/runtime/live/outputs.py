"""The live loop's files: ``--jsonl`` (one flushed, fsync-ed line per answer) and ``--output`` (the annotated
video, written to a temporary file that replaces the destination only once complete). Paths are checked before the
first frame."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from facellm_edge.errors import OutputError
from facellm_edge.io import (check_output_file, clean_stale_temp_files, commit_temp_file, open_line_log,
                             temp_file_beside, write_line)
from facellm_edge.runtime.live.sources import FrameSource

if TYPE_CHECKING:
    from facellm_edge.runtime.live.loop import LiveConfig


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # --output as one annotated image


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


class LiveOutputs:
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
        self.still: np.ndarray | None = None  # image output: the last annotated frame
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

        if is_image_output(self.config.output):
            self.still = image
            self.frames += 1
            return
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
                    if self.still is not None:
                        self._write_still()
                    if keep and self.frames:
                        commit_temp_file(self.video, Path(self.config.output))
                finally:
                    Path(self.video).unlink(missing_ok=True)  # no-op once committed

    def _write_still(self) -> None:
        import cv2

        ok, data = cv2.imencode(Path(self.config.output).suffix.lower(), self.still)
        if not ok:
            raise OutputError(f"cannot encode {self.config.output} as {Path(self.config.output).suffix} image")
        Path(self.video).write_bytes(data.tobytes())
