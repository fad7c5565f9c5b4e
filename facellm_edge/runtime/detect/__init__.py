"""Face detectors: a small protocol, one module per backend, one factory.

Every backend returns :class:`~facellm_edge.runtime.faces.Face` records with a box, a score and five landmarks in
InsightFace order (right eye, left eye, nose, right mouth corner, left mouth corner), sorted by score.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from facellm_edge.errors import UsageError
from facellm_edge.runtime.faces import Face

# name -> "module:class"; the module is imported only when that backend is chosen.
BACKENDS: dict[str, str] = {
    "yunet": "facellm_edge.runtime.detect.yunet:YuNetDetector",
    "scrfd": "facellm_edge.runtime.detect.scrfd:ScrfdDetector",
}
DEFAULT_DETECTOR = "yunet"
# --detect-size's default. 320 measured on 2 cores (bench's kiosk run, FaceLLM-1B, the detector on every 3rd frame):
# a new person's first token 7.5 -> 6.0 s and frame p99 60 -> 17 ms, but YuNet then finds faces only down to ~32 px
# wide in a 640 x 480 frame (~20 px at 640) and reported a false 25 px face in letterboxed t1.jpg that 640 does not:
# a choice for the user (a kiosk with near faces), not a default.
DEFAULT_INPUT_SIZE = 640


@dataclass(frozen=True)
class DetectorConfig:
    name: str = DEFAULT_DETECTOR
    model_path: Path | None = None  # local model file; None = the backend's default (YuNet: shipped in the package)
    score_threshold: float = 0.6
    nms_threshold: float = 0.3
    input_size: int | None = None  # longest side the detector works at (larger images scaled down); None: 640
    max_faces: int = 0  # 0 = all
    n_threads: int | None = None  # OpenCV / ORT threads for the detector; None = library default

    @property
    def size(self) -> int:
        return self.input_size or DEFAULT_INPUT_SIZE

    def __post_init__(self) -> None:  # checked when the configuration is made, before any model loads
        check_name(self.name)
        if self.input_size is not None and not (64 <= self.input_size <= 4096 and self.input_size % 32 == 0):
            raise UsageError(f"detector input size {self.input_size} must be a multiple of 32 in 64..4096")
        if not 0.0 < self.score_threshold < 1.0:
            raise UsageError(f"detector score threshold {self.score_threshold} must be in (0, 1)")
        if self.max_faces < 0:
            raise UsageError(f"max_faces {self.max_faces} must be >= 0 (0 = every face)")


class Detector(Protocol):
    """``detect`` checks the image it is handed (:func:`check_image`); ``detect_checked`` is for callers that
    already did (``FaceLLM`` checks every image once, where it enters)."""

    name: str

    def detect(self, image_bgr: np.ndarray) -> list[Face]: ...

    def detect_checked(self, image: np.ndarray) -> list[Face]: ...


def check_name(name: str) -> str:
    """``name`` if it is a known backend, else :class:`UsageError` listing the choices."""
    if name not in BACKENDS:
        raise UsageError(f"unknown detector '{name}'; choose one of: {', '.join(sorted(BACKENDS))}")
    return name


def create_detector(config: DetectorConfig) -> Detector:
    """Build the detector named in ``config``; unknown name -> :class:`UsageError` listing the choices."""
    module_name, cls_name = BACKENDS[check_name(config.name)].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(config)


def check_image(image_bgr: object) -> np.ndarray:
    """Validate a BGR uint8 image (H, W, 3); raise :class:`InputError` otherwise."""
    from facellm_edge.errors import InputError

    if not isinstance(image_bgr, np.ndarray) or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        shape = getattr(image_bgr, "shape", None)
        raise InputError(f"expected a BGR image of shape (H, W, 3), got {type(image_bgr).__name__} {shape}")
    if image_bgr.size == 0 or min(image_bgr.shape[:2]) < 8:
        raise InputError(f"image is empty or too small ({image_bgr.shape[1]}x{image_bgr.shape[0]} px)")
    if image_bgr.dtype != np.uint8:
        raise InputError(f"expected a uint8 image, got {image_bgr.dtype}")
    return image_bgr


def top_faces(faces: list[Face], max_faces: int) -> list[Face]:
    faces = sorted(faces, key=lambda f: -f.score)
    return faces[:max_faces] if max_faces > 0 else faces
