"""YuNet (OpenCV zoo, MIT) through ``cv2.FaceDetectorYN``: the default detector.

The model (232 KB) ships inside the package (``models/``, with its MIT licence) and is checked against a pinned
sha256 before first use: the default detector works offline, with no download and no cache. A local file given as
``DetectorConfig.model_path`` (``--detector-model``) is used instead when set.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import cv2
import numpy as np

from facellm_edge.runtime.detect import DetectorConfig, check_image, top_faces
from facellm_edge.errors import InputError, RuntimeStageError, UsageError
from facellm_edge.runtime.faces import Face
from facellm_edge.io import sha256_file

log = logging.getLogger(__name__)

YUNET_FILE = "face_detection_yunet_2023mar.onnx"
YUNET_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"
PACKAGED_MODEL = Path(__file__).resolve().parent / "models" / YUNET_FILE
_checked: set[Path] = set()
_check_lock = threading.Lock()


def default_model_path(path: Path = PACKAGED_MODEL) -> Path:
    """The YuNet model shipped in the package, once its sha256 matches the pinned one (checked once per process)."""
    with _check_lock:
        if path in _checked:
            return path
        try:
            got = sha256_file(path)
        except OSError as exc:
            raise InputError(f"the packaged YuNet model {path} cannot be read ({exc.strerror or exc}); reinstall "
                             "facellm-edge or pass --detector-model PATH") from exc
        if got != YUNET_SHA256:
            raise InputError(f"the packaged YuNet model {path} is damaged (sha256 {got}, expected {YUNET_SHA256}); "
                             "reinstall facellm-edge or pass --detector-model PATH")
        _checked.add(path)
    return path


class YuNetDetector:
    name = "yunet"

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        if config.model_path is not None:
            path = Path(config.model_path)
            if not path.is_file():
                raise InputError(f"detector model not found: {path} (pass an existing YuNet .onnx to --detector-model)")
        else:
            path = default_model_path()
        self.model_path = path
        if config.n_threads is not None:
            cv2.setNumThreads(int(config.n_threads))
        quiet = getattr(getattr(cv2, "utils", None), "logging", None)  # OpenCV 5 warns about DNN targets on load
        previous = quiet.getLogLevel() if quiet else None
        try:
            if quiet:
                quiet.setLogLevel(quiet.LOG_LEVEL_ERROR)
            self._net = cv2.FaceDetectorYN.create(
                str(path), "", (config.size, config.size),
                config.score_threshold, config.nms_threshold, 5000,
            )
        except cv2.error as exc:
            raise InputError(f"cannot load YuNet model {path}: {exc.msg.strip().splitlines()[-1]}") from exc
        finally:
            if quiet:
                quiet.setLogLevel(previous)
        self._size: tuple[int, int] | None = None

    def detect(self, image_bgr: np.ndarray) -> list[Face]:
        """The faces in a BGR uint8 image, most confident first (the image is checked: :func:`check_image`)."""
        return self.detect_checked(check_image(image_bgr))

    def detect_checked(self, image: np.ndarray) -> list[Face]:
        """:meth:`detect` for an image its caller has already checked."""
        net = self._net
        if net is None:
            raise UsageError("this YuNet detector is closed (FaceLLM.close() closes its detector); "
                             "load the model again")
        h, w = image.shape[:2]
        scale = min(1.0, self.config.size / max(h, w))
        if scale < 1.0:
            # at least 1 px a side: a strip (8 x 100000) would round its short side to 0, which cv2.resize refuses;
            # each axis is then mapped back by its own factor (the rounding makes them differ)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        sx, sy = image.shape[1] / w, image.shape[0] / h
        size = (image.shape[1], image.shape[0])
        if size != self._size:
            net.setInputSize(size)
            self._size = size
        try:
            _, rows = net.detect(image)
        except cv2.error as exc:
            raise RuntimeStageError(f"YuNet failed on a {w}x{h} image: {exc.msg.strip()}") from exc
        faces = []
        for row in rows if rows is not None else ():
            x, bw = float(row[0]) / sx, float(row[2]) / sx
            y, bh = float(row[1]) / sy, float(row[3]) / sy
            lm = np.asarray(row[4:14], dtype=np.float32).reshape(5, 2) / np.array([sx, sy], np.float32)
            faces.append(Face(box=np.array([x, y, x + bw, y + bh]), score=float(row[14]), landmarks=lm))
        return top_faces(faces, self.config.max_faces)

    def close(self) -> None:
        """Free the network (idempotent); :meth:`detect` then raises. ``FaceLLM.close`` calls it."""
        self._net = None
