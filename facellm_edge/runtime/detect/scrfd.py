"""SCRFD (InsightFace) through ``insightface.model_zoo``: a stronger detector for hard poses and small faces.

insightface is not a runtime dependency: this backend needs the ``insightface`` extra
(``pip install 'facellm-edge[insightface]'``; without it, choosing it is a one-line error, exit code 7). The model
comes from a local ``.onnx`` (``--detector-model``) or from an InsightFace model pack directory such as
``~/.insightface/models/buffalo_l`` (its ``det_*.onnx``). InsightFace's pretrained models are licensed for
non-commercial research only (``LICENCE-scrfd.md`` beside this file): a warning says so when this backend is chosen.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from facellm_edge.runtime.detect import DetectorConfig, check_image, top_faces
from facellm_edge.errors import InputError, RuntimeStageError, UsageError, require
from facellm_edge.runtime.faces import Face

log = logging.getLogger(__name__)

DEFAULT_PACK = Path("~/.insightface/models/buffalo_l")
LICENCE_NOTE = (
    "SCRFD detector chosen: InsightFace's pretrained models are for non-commercial research use only "
    "(see https://github.com/deepinsight/insightface#license); use --detector yunet (MIT) otherwise"
)


def resolve_model(path: Path | None) -> Path:
    """A ``.onnx`` file, or the ``det_*.onnx`` inside a model pack directory (default: buffalo_l)."""
    p = Path(path if path is not None else DEFAULT_PACK).expanduser()
    if p.is_dir():
        found = sorted(p.glob("det_*.onnx"))
        if not found:
            raise InputError(f"no SCRFD model (det_*.onnx) in {p}; pass --detector-model PATH to an SCRFD .onnx")
        return found[0]
    if not p.is_file():
        raise InputError(
            f"SCRFD model not found: {p}; download an InsightFace pack (e.g. buffalo_l) into ~/.insightface/models "
            "or pass --detector-model PATH to an SCRFD .onnx"
        )
    return p


class ScrfdDetector:
    name = "scrfd"

    def __init__(self, config: DetectorConfig) -> None:
        from facellm_edge.onnxrt import onnxruntime_module

        self.config = config
        onnxruntime_module()  # telemetry off before insightface imports onnxruntime; no runtime flavour: exit 7
        require("insightface", "insightface")  # not installed: the extra to install, exit 7
        from insightface.model_zoo import get_model

        self.model_path = resolve_model(config.model_path)
        log.warning(LICENCE_NOTE)
        try:
            model = get_model(str(self.model_path))
        except Exception as exc:  # insightface raises assorted errors for unusable files
            raise InputError(f"cannot load SCRFD model {self.model_path}: {exc}") from exc
        if model is None or getattr(model, "taskname", None) != "detection":
            raise InputError(f"{self.model_path} is not an InsightFace detection model; pass an SCRFD .onnx")
        size = (config.size, config.size)
        model.prepare(ctx_id=-1, input_size=size, det_thresh=config.score_threshold)
        self._model = model
        self._size = size

    def detect(self, image_bgr: np.ndarray) -> list[Face]:
        """The faces in a BGR uint8 image, most confident first (the image is checked: :func:`check_image`)."""
        return self.detect_checked(check_image(image_bgr))

    def detect_checked(self, image: np.ndarray) -> list[Face]:
        """:meth:`detect` for an image its caller has already checked."""
        model = self._model
        if model is None:
            raise UsageError("this SCRFD detector is closed (FaceLLM.close() closes its detector); "
                             "load the model again")
        h, w = image.shape[:2]
        if max(h, w) >= min(h, w) * min(self._size):
            # insightface scales the long side to the input size with int(): a strip this thin (8 x 100000) comes
            # out 0 px across, which cv2.resize refuses; at under 1 px no face can be seen anyway
            return []
        try:
            det, kps = model.detect(image, input_size=self._size)
        except Exception as exc:
            raise RuntimeStageError(f"SCRFD failed on a {image.shape[1]}x{image.shape[0]} image: {exc}") from exc
        if kps is None:
            raise RuntimeStageError(f"{self.model_path} gives no landmarks; use an SCRFD model with keypoints (_kps)")
        faces = [Face(box=d[:4], score=float(d[4]), landmarks=k) for d, k in zip(det, kps)]
        return top_faces(faces, self.config.max_faces)

    def close(self) -> None:
        """Free the ONNX Runtime session (idempotent); :meth:`detect` then raises. ``FaceLLM.close`` calls it."""
        self._model = None
