"""Detection + alignment on real photos with the real YuNet model (shipped inside the package)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facellm_edge.runtime.align import CropConfig, align_face, estimate_transform, template, transform_points
from facellm_edge.runtime.detect import DetectorConfig, create_detector
from facellm_edge.errors import InputError, UsageError


@pytest.fixture(scope="module")
def yunet(yunet_model):
    return create_detector(DetectorConfig(name="yunet", model_path=yunet_model))


def _upright(face, crop_cfg):
    m = estimate_transform(face.landmarks, crop_cfg)
    lm = transform_points(face.landmarks, m)
    eyes_y = lm[:2, 1].mean()
    mouth_y = lm[3:, 1].mean()
    angle = np.degrees(np.arctan2(lm[1, 1] - lm[0, 1], lm[1, 0] - lm[0, 0]))
    return lm, eyes_y, mouth_y, angle


def test_yunet_finds_astronaut(yunet, astronaut_bgr):
    faces = yunet.detect(astronaut_bgr)
    assert len(faces) == 1
    f = faces[0]
    assert f.score > 0.8
    # the face is in the upper middle of the 512x512 photo, right eye (image left) left of the left eye
    assert 150 < f.box[0] < f.box[2] < 300 and 50 < f.box[1] < f.box[3] < 250
    assert f.landmarks[0, 0] < f.landmarks[1, 0]
    assert f.landmarks[3, 0] < f.landmarks[4, 0]
    assert f.landmarks[:2, 1].mean() < f.landmarks[2, 1] < f.landmarks[3:, 1].mean()


def test_yunet_finds_six_faces_in_t1(yunet, t1_bgr):
    faces = yunet.detect(t1_bgr)
    assert len(faces) == 6
    scores = [f.score for f in faces]
    assert scores == sorted(scores, reverse=True)
    centres = np.array([[(f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2] for f in faces])
    # six distinct faces: no two centres closer than 20 px
    d = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(6) * 1e9
    assert d.min() > 20


def test_aligned_crops_are_upright(yunet, astronaut_bgr, t1_bgr):
    cfg = CropConfig()
    for image in (astronaut_bgr, t1_bgr):
        for face in yunet.detect(image):
            crop = align_face(image, face.landmarks, cfg)
            assert crop.shape == (448, 448, 3) and crop.dtype == np.uint8
            lm, eyes_y, mouth_y, angle = _upright(face, cfg)
            assert eyes_y < lm[2, 1] < mouth_y  # eyes above nose above mouth
            assert abs(angle) < 8.0  # eye line nearly horizontal
            # landmarks land near the template (margin 0.25 -> face in the central two thirds)
            assert np.abs(lm - template(cfg)).max() < 0.08 * cfg.size
            assert 448 / 6 < lm[:, 0].min() and lm[:, 0].max() < 448 * 5 / 6


def test_rotated_face_is_straightened(yunet, astronaut_bgr):
    """Rotate the photo by 25 degrees and its landmarks with it: the aligned crop is the same upright face."""
    import cv2

    h, w = astronaut_bgr.shape[:2]
    face = yunet.detect(astronaut_bgr)[0]
    r = cv2.getRotationMatrix2D((w / 2, h / 2), 25, 1.0)
    rotated = cv2.warpAffine(astronaut_bgr, r, (w, h))
    lm_rot = transform_points(face.landmarks, r)
    tilt = np.degrees(np.arctan2(lm_rot[1, 1] - lm_rot[0, 1], lm_rot[1, 0] - lm_rot[0, 0]))
    assert abs(tilt) > 20
    cfg = CropConfig()
    upright = align_face(astronaut_bgr, face.landmarks, cfg).astype(np.float32)
    straightened = align_face(rotated, lm_rot, cfg).astype(np.float32)
    inner = slice(112, 336)  # away from the black border the rotation brings in
    assert np.abs(upright[inner, inner] - straightened[inner, inner]).mean() < 6.0
    assert np.abs(upright[inner, inner] - np.roll(upright, 20, axis=1)[inner, inner]).mean() > 15.0


def test_margin_controls_context():
    tight, wide = template(CropConfig(margin=0.0)), template(CropConfig(margin=0.5))
    assert np.ptp(tight[:, 0]) > np.ptp(wide[:, 0]) * 1.9
    assert abs(tight[:, 0].mean() - wide[:, 0].mean()) < 2  # both centred horizontally


def test_no_face_in_blank_image(yunet):
    assert yunet.detect(np.full((480, 640, 3), 127, np.uint8)) == []


def test_unknown_detector_lists_choices():
    with pytest.raises(UsageError, match="unknown detector 'haar'.*scrfd.*yunet"):
        create_detector(DetectorConfig(name="haar"))


def test_missing_detector_models(tmp_path):
    with pytest.raises(InputError, match="detector model not found"):
        create_detector(DetectorConfig(name="yunet", model_path=tmp_path / "nope.onnx"))
    with pytest.raises(InputError, match="SCRFD model not found.*--detector-model"):
        create_detector(DetectorConfig(name="scrfd", model_path=tmp_path / "scrfd.onnx"))
    (tmp_path / "pack").mkdir()
    with pytest.raises(InputError, match="no SCRFD model"):
        create_detector(DetectorConfig(name="scrfd", model_path=tmp_path / "pack"))


def test_bad_images(yunet):
    with pytest.raises(InputError):
        yunet.detect(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(InputError):
        yunet.detect(np.zeros((64, 64), np.uint8))


def test_default_yunet_is_the_packaged_model_and_needs_no_network(monkeypatch, tmp_path, astronaut_bgr):
    """No --detector-model: the model inside the package, its sha256 checked; no download, nothing cached."""
    import hashlib
    import socket

    from facellm_edge.runtime.detect import yunet as y

    def offline(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(y, "_checked", set())  # check the hash again in this process
    det = create_detector(DetectorConfig(name="yunet"))
    assert det.model_path == y.PACKAGED_MODEL and y.PACKAGED_MODEL.is_relative_to(Path(y.__file__).parent)
    assert hashlib.sha256(y.PACKAGED_MODEL.read_bytes()).hexdigest() == y.YUNET_SHA256
    assert (y.PACKAGED_MODEL.parent / "LICENSE.yunet").read_text().startswith("MIT License")
    assert len(det.detect(astronaut_bgr)) == 1
    assert not list(tmp_path.iterdir()), "the default detector wrote into the user cache"


def test_damaged_or_missing_packaged_model_names_the_fix(tmp_path):
    from facellm_edge.runtime.detect import yunet as y

    bad = tmp_path / y.YUNET_FILE
    bad.write_bytes(y.PACKAGED_MODEL.read_bytes()[:-1])
    with pytest.raises(InputError, match="damaged.*reinstall facellm-edge or pass --detector-model"):
        y.default_model_path(bad)
    with pytest.raises(InputError, match="cannot be read.*reinstall facellm-edge or pass --detector-model"):
        y.default_model_path(tmp_path / "gone.onnx")


def test_explicit_detector_model_is_used(tmp_path, astronaut_bgr):
    import shutil

    from facellm_edge.runtime.detect import yunet as y

    mine = tmp_path / "my-yunet.onnx"
    shutil.copy(y.PACKAGED_MODEL, mine)
    det = create_detector(DetectorConfig(name="yunet", model_path=mine))
    assert det.model_path == mine and len(det.detect(astronaut_bgr)) == 1


@pytest.mark.parametrize("h, w", [(8, 100000), (10, 20000), (20000, 10)])
def test_very_wide_or_tall_images_are_scaled_not_refused(yunet, h, w):
    """Scaled to the detector's size, the short side of a strip rounds to 0 px, which cv2.resize refuses (the CLI
    said `unexpected error`): it is kept at 1 px, and such a strip simply has no face."""
    assert yunet.detect(np.zeros((h, w, 3), np.uint8)) == []


def test_scrfd_gives_no_face_in_a_strip_too_thin_to_scale(astronaut_bgr):
    """insightface's SCRFD scales the long side to its input size with int(): a strip comes out 0 px across and
    cv2.resize refuses it (stub: that sizing step of SCRFD._detect_candidates, no network needed)."""
    import cv2

    from facellm_edge.runtime.detect.scrfd import ScrfdDetector

    class InsightfaceSizing:
        calls = 0

        def detect(self, img, input_size):
            self.calls += 1
            ratio = img.shape[0] / img.shape[1]
            if ratio > input_size[1] / input_size[0]:
                size = (int(input_size[1] / ratio), input_size[1])
            else:
                size = (input_size[0], int(input_size[0] * ratio))
            cv2.resize(img, size)
            return np.empty((0, 5), np.float32), np.empty((0, 5, 2), np.float32)

    det = object.__new__(ScrfdDetector)  # no insightface model to load: the stub stands in for it
    det.config, det.model_path, det._size = DetectorConfig(name="scrfd"), Path("det_stub.onnx"), (640, 640)
    det._model = stub = InsightfaceSizing()
    for shape in [(8, 100000, 3), (10, 20000, 3), (20000, 10, 3)]:
        assert det.detect(np.zeros(shape, np.uint8)) == []
    assert det.detect(astronaut_bgr) == [] and stub.calls == 1
    det.close()
    with pytest.raises(UsageError, match=r"^this SCRFD detector is closed .*; load the model again$"):
        det.detect(astronaut_bgr)


def test_a_closed_yunet_frees_its_network_and_says_so(yunet_model, astronaut_bgr):
    det = create_detector(DetectorConfig(name="yunet", model_path=yunet_model))
    assert len(det.detect(astronaut_bgr)) == 1
    det.close()
    det.close()
    assert det._net is None
    with pytest.raises(UsageError, match=r"^this YuNet detector is closed \(FaceLLM.close\(\) closes its detector\); "
                                         r"load the model again$"):
        det.detect(astronaut_bgr)
