"""facellm-edge: FaceLLM on the edge (ONNX Runtime vision + llama.cpp LLM).

Heavy libraries are imported lazily; ``import facellm_edge`` is instant and needs no torch.
"""

from __future__ import annotations

import os as _os

# Faces are biometric data: ONNX Runtime must not write its telemetry database (device id, paths) under the user's
# cache. It reads this only when it is first imported, so it is set here, before any library can import it.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

# The Python API, imported on first use (``from facellm_edge import FaceLLM, RuntimeConfig``).
_API = {
    "FaceLLM": "facellm_edge.runtime.pipeline",
    "FaceSession": "facellm_edge.runtime.session",
    "SessionError": "facellm_edge.runtime.session",
    "FaceAnswer": "facellm_edge.runtime.answers",
    "ImagesAnswer": "facellm_edge.runtime.answers",
    "RuntimeConfig": "facellm_edge.runtime.config",
    "DetectorConfig": "facellm_edge.runtime.config",
    "CropConfig": "facellm_edge.runtime.config",
    "EncoderConfig": "facellm_edge.runtime.config",
    "EngineConfig": "facellm_edge.runtime.config",
    "GenerationConfig": "facellm_edge.runtime.config",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'facellm_edge' has no attribute {name!r}")
