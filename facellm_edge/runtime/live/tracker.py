"""A simple IoU tracker: stable ids for faces across frames (greedy matching, highest IoU first)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from facellm_edge.cpu import small_cpu
from facellm_edge.runtime.faces import Face


# run/serve --detect-every (LiveConfig.detect_every): 0 = auto, the detector on every AUTO_STRIDE-th frame on a small
# CPU (facellm_edge.cpu.small_cpu), on every frame otherwise. Measured on 2 cores (bench's kiosk run): the frames the
# detector skips go to the answers (first token 10.5 -> 7.2 s with the live thread policy) while the loop holds
# 30 FPS. Here, beside the tracker that counts its misses in detections, so the server's config takes the default
# without importing the live loop.
DEFAULT_DETECT_EVERY = 0
AUTO_STRIDE = 3
# Auto on a small CPU also spaces detections out while the VLM worker is answering: the frames between show the last
# boxes, and a new face found sooner would wait for the worker anyway (its job slot keeps the newest offer). Measured
# on 2 cores (v5 kiosk run, medians of 3 visits): first token 7.4 s after the person's first frame at every 3rd frame,
# 6.5 s with every 6th while answering; the frame loop at 30 FPS either way.
AUTO_BUSY_STRIDE = 6


def resolve_detect_every(value: int, cores: int | None = None, *, busy: bool = False) -> int:
    """``value`` itself, or for 0 (auto) on small CPUs :data:`AUTO_STRIDE` (:data:`AUTO_BUSY_STRIDE` while the VLM
    worker is answering, ``busy``), and 1 elsewhere."""
    if value:
        return value
    if not small_cpu(cores):
        return 1
    return AUTO_BUSY_STRIDE if busy else AUTO_STRIDE


@dataclass(frozen=True)
class TrackerConfig:
    iou_threshold: float = 0.3  # a detection continues a track when IoU >= this
    # frames (of the source's frame index, not detections) a track survives without a detection: the same half a
    # second at 30 FPS whatever the detector's pace, so a person who steps into the spot of one who left later than
    # that is a new track, never the previous person's
    max_missed: int = 15


@dataclass
class Track:
    track_id: int
    box: np.ndarray
    first_frame: int
    last_frame: int
    hits: int = 1


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between every box in ``a`` [N, 4] and ``b`` [M, 4] (x1, y1, x2, y2)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float32)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-6)


@dataclass
class IouTracker:
    config: TrackerConfig = field(default_factory=TrackerConfig)
    tracks: dict[int, Track] = field(default_factory=dict)
    ids: Iterator[int] | None = None  # a shared id counter: ids unique across the trackers of several sources
    _next_id: int = 1
    _started: int = 0

    def end_all(self) -> list[int]:
        """End every track now (a new scene: the next image of a folder); returns their ids."""
        ended = list(self.tracks)
        self.tracks.clear()
        return ended

    @property
    def started(self) -> int:
        """Tracks this tracker started so far (people seen)."""
        return self._started

    def update(self, faces: list[Face], frame_index: int) -> tuple[list[Face], list[int]]:
        """Assign ``track_id`` to each face (in place). Returns (faces, ids of tracks that ended this frame)."""
        # Tracks unseen for more than max_missed frames end first: a face in their spot now is someone new (with the
        # detector on every Nth frame the first detection after the gap may be the next person already).
        ended = [tid for tid, t in self.tracks.items() if frame_index - t.last_frame > self.config.max_missed]
        for tid in ended:
            del self.tracks[tid]
        ids = list(self.tracks)
        boxes = np.array([self.tracks[i].box for i in ids], dtype=np.float32).reshape(-1, 4)
        dets = np.array([f.box for f in faces], dtype=np.float32).reshape(-1, 4)
        iou = iou_matrix(boxes, dets)
        matched_tracks: set[int] = set()
        matched_faces: set[int] = set()
        for flat in np.argsort(-iou, axis=None):
            t, d = np.unravel_index(flat, iou.shape)
            if iou[t, d] < self.config.iou_threshold:
                break
            if t in matched_tracks or d in matched_faces:
                continue
            matched_tracks.add(int(t))
            matched_faces.add(int(d))
            track = self.tracks[ids[t]]
            track.box, track.last_frame = dets[d].copy(), frame_index
            track.hits += 1
            faces[d].track_id = track.track_id
        for d, face in enumerate(faces):
            if d not in matched_faces:
                tid = next(self.ids) if self.ids is not None else self._next_id
                track = Track(tid, dets[d].copy(), frame_index, frame_index)
                self.tracks[track.track_id] = track
                face.track_id = track.track_id
                self._next_id += 1
                self._started += 1
        return faces, ended
