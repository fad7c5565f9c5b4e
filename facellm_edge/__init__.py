"""facellm-edge: FaceLLM on the edge (ONNX Runtime vision + llama.cpp LLM).

Heavy libraries are imported lazily; ``import facellm_edge`` is instant and needs no torch.
"""

from __future__ import annotations

import os as _os

# Faces are biometric data: ONNX Runtime must not write its telemetry database (device id, paths) under the user's
# cache. It reads this only when it is first imported, so it is set here, before any library can import it.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

__all__ = ["__version__", "FaceLLM"]


def __getattr__(name: str):
    if name == "FaceLLM":
        from facellm_edge.runtime.pipeline import FaceLLM

        return FaceLLM
    raise AttributeError(name)
