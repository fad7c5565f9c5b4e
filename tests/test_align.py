"""Alignment without insightface at run time, checked against insightface's own (a dev dependency)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from facellm_edge.runtime.align import ARCFACE_112, CropConfig, align_face, estimate_transform, similarity_transform

face_align = pytest.importorskip("insightface.utils.face_align")


def _estimate_norm(lm: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # insightface calls skimage's deprecated SimilarityTransform.estimate
        warnings.simplefilter("ignore", FutureWarning)
        return face_align.estimate_norm(lm.astype(np.float32), image_size=112)


def test_the_template_is_insightfaces():
    assert np.array_equal(ARCFACE_112, face_align.arcface_dst.astype(np.float32))


def test_similarity_matches_insightface_on_real_and_random_landmarks(t1_bgr, yunet_model):
    from facellm_edge.runtime.detect import DetectorConfig, create_detector

    faces = create_detector(DetectorConfig(model_path=yunet_model)).detect(t1_bgr)
    rng = np.random.default_rng(0)
    sets = [f.landmarks for f in faces] + [ARCFACE_112 * rng.uniform(0.2, 5) + rng.normal(0, 3, (5, 2)) + 100
                                           for _ in range(50)]
    sets.append(ARCFACE_112[:, ::-1] * 2.0)  # mirrored: the best similarity has no reflection
    assert len(sets) == 6 + 51
    for lm in sets:
        assert np.allclose(similarity_transform(lm, ARCFACE_112), _estimate_norm(lm), atol=1e-4)


def test_crop_equals_insightface_norm_crop_at_its_size_and_margin(astronaut_bgr, yunet_model):
    from facellm_edge.runtime.detect import DetectorConfig, create_detector

    (face,) = create_detector(DetectorConfig(model_path=yunet_model)).detect(astronaut_bgr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = face_align.norm_crop(astronaut_bgr, face.landmarks, image_size=112)
    ours = align_face(astronaut_bgr, face.landmarks, CropConfig(size=112, margin=0.0))
    assert ours.shape == theirs.shape and np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    m = estimate_transform(face.landmarks, CropConfig(size=448, margin=0.25))
    assert np.allclose(m[:, :2], _estimate_norm(face.landmarks)[:, :2] * 448 / 112 / 1.5, atol=1e-4)
