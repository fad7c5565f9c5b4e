"""facellm-edge: FaceLLM on the edge (ONNX Runtime vision + llama.cpp LLM).

Heavy libraries are imported lazily; ``import facellm_edge`` is instant and needs no torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "FaceLLM"]


def __getattr__(name: str):
    if name == "FaceLLM":
        from facellm_edge.pipeline import FaceLLM

        return FaceLLM
    raise AttributeError(name)
