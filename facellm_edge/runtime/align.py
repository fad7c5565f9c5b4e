"""Face alignment: a similarity transform from the five landmarks to a FairFace-like crop (pure functions).

InsightFace's ArcFace template (:data:`ARCFACE_112`, 112 px) frames the face tightly. FaceLLM was trained
on FairFace crops, made with a 0.25 margin around the face (dlib ``get_face_chips(padding=0.25)``): the whole head
with some context. ``CropConfig.margin`` reproduces that: the template is scaled to the crop size and shrunk by
``1 / (1 + 2 * margin)`` around the centre, so a margin of ``m`` adds ``m`` face-widths of context on every side.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# Where InsightFace's ArcFace alignment puts the five landmarks in a 112 px crop (insightface.utils.face_align
# .arcface_dst; InsightFace order: right eye, left eye, nose, right and left mouth corners). Written out here so the
# runtime needs no insightface; tests/test_align.py checks it and the transform against insightface's own.
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                        [70.7299, 92.2041]], dtype=np.float32)


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
    return (ARCFACE_112 * scale + offset).astype(np.float32)


def estimate_transform(landmarks: np.ndarray, config: CropConfig) -> np.ndarray:
    """2x3 similarity transform image -> crop.

    The least-squares similarity to the 112 px ArcFace template (what InsightFace's ``estimate_norm`` computes);
    the fit is equivariant to scaling and shifting the destination, so scaling its matrix and adding the offset
    gives exactly the fit to :func:`template`.
    """
    lm = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    m112 = similarity_transform(lm, ARCFACE_112.astype(np.float64))
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


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, translation; no reflection) mapping the points ``src`` onto
    ``dst`` with the least squared error: Umeyama (1991), as scikit-image's ``SimilarityTransform.estimate`` (which
    InsightFace's ``estimate_norm`` calls) computes it."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    n, dim = src.shape
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s_c, d_c = src - mu_s, dst - mu_d
    a = d_c.T @ s_c / n
    d = np.ones(dim)
    if np.linalg.det(a) < 0:
        d[-1] = -1.0
    u, sv, vt = np.linalg.svd(a)
    rank = np.linalg.matrix_rank(a)
    if rank == 0:
        raise ValueError("landmarks are all at one point: no similarity transform")
    if rank == dim - 1 and np.linalg.det(u) * np.linalg.det(vt) > 0:
        r = u @ vt
    elif rank == dim - 1:
        flip = d.copy()
        flip[-1] = -1.0
        r = u @ np.diag(flip) @ vt
    else:
        r = u @ np.diag(d) @ vt
    scale = (sv @ d) / s_c.var(axis=0).sum()
    m = np.empty((2, 3))
    m[:, :2] = scale * r
    m[:, 2] = mu_d - scale * r @ mu_s
    return m
