"""Face alignment: a similarity transform from the five landmarks to a FairFace-like crop (pure functions).

InsightFace's ArcFace template (``face_align.arcface_dst``, 112 px) frames the face tightly. FaceLLM was trained
on FairFace crops, made with a 0.25 margin around the face (dlib ``get_face_chips(padding=0.25)``): the whole head
with some context. ``CropConfig.margin`` reproduces that: the template is scaled to the crop size and shrunk by
``1 / (1 + 2 * margin)`` around the centre, so a margin of ``m`` adds ``m`` face-widths of context on every side.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from insightface.utils import face_align


@dataclass(frozen=True)
class CropConfig:
    size: int = 448  # crop side in pixels (the vision tile size)
    margin: float = 0.25  # context around the ArcFace template, in template widths per side

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"crop size must be >= 16, got {self.size}")
        if not 0.0 <= self.margin <= 2.0:
            raise ValueError(f"crop margin must be in [0, 2], got {self.margin}")


def template(config: CropConfig) -> np.ndarray:
    """Where the five landmarks land in the crop (5x2, InsightFace order)."""
    scale = config.size / 112.0 / (1.0 + 2.0 * config.margin)
    offset = config.size * config.margin / (1.0 + 2.0 * config.margin)
    return (face_align.arcface_dst * scale + offset).astype(np.float32)


def estimate_transform(landmarks: np.ndarray, config: CropConfig) -> np.ndarray:
    """2x3 similarity transform image -> crop.

    Uses InsightFace's ``estimate_norm`` (least-squares similarity to the 112 px ArcFace template); the
    least-squares fit is equivariant to scaling and shifting the destination, so scaling its matrix and adding
    the offset gives exactly the fit to :func:`template`.
    """
    lm = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
    with warnings.catch_warnings():  # insightface calls skimage's deprecated SimilarityTransform.estimate
        warnings.simplefilter("ignore", FutureWarning)
        m112 = face_align.estimate_norm(lm, image_size=112).astype(np.float64)
    scale = config.size / 112.0 / (1.0 + 2.0 * config.margin)
    offset = config.size * config.margin / (1.0 + 2.0 * config.margin)
    m = m112 * scale
    m[:, 2] += offset
    return m


def align_face(image_bgr: np.ndarray, landmarks: np.ndarray, config: CropConfig = CropConfig()) -> np.ndarray:
    """The aligned ``size x size`` BGR crop (black outside the image, like InsightFace's ``norm_crop``)."""
    m = estimate_transform(landmarks, config)
    return cv2.warpAffine(image_bgr, m, (config.size, config.size), flags=cv2.INTER_LINEAR, borderValue=0.0)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to N x 2 points."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return (pts @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)
