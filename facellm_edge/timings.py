"""The stage timings every part of facellm-edge reports, under one set of names (milliseconds, wall clock).

The runtime fills them into ``Face.timings`` / answers' ``timings``, the live loop into its JSON lines, and
``facellm-edge bench`` reads the same names from the same code paths (it calls the runtime, not a copy of it).

========================  =============================================================================================
``detect``                the detector on the whole image (shared by the faces found in it)
``align``                 this face's 5-point similarity warp to the crop the model sees
``preprocess``            crop(s) -> normalised ``pixel_values`` (resize, tiling, mean/std)
``encode``                the vision encoder (ONNX Runtime) making this face's embeddings; faces encoded together
                          (one call on a GPU, face by face on the CPU) each report the time of the whole group
``image_prefill``         llama.cpp decoding the prompt up to the question with the image embeddings into the KV
                          cache (once per conversation: a follow-up question does not pay it again)
``question_prefill``      decoding the question's tokens after the cached image prefix (part of ``ttft``)
``ttft``                  from the question to its first generated token: ``question_prefill`` + the first sample
``decode``                from the first to the last generated token
========================  =============================================================================================

A new face's *cold* time to first token is :func:`cold_ttft`: preprocess + encode + image_prefill + ttft (what a
person in front of a kiosk waits after detection); a follow-up question's (*warm*) is its ``ttft`` alone.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Mapping, MutableMapping

STAGES = ("detect", "align", "preprocess", "encode", "image_prefill", "question_prefill", "ttft", "decode")
_COLD = ("preprocess", "encode", "image_prefill", "ttft")


def ms_since(t0: float) -> float:
    """Milliseconds from ``t0`` (a ``time.perf_counter()`` value) to now."""
    return (time.perf_counter() - t0) * 1e3


@contextmanager
def timed(into: MutableMapping[str, float], stage: str) -> Iterator[None]:
    """Time the block and store it as ``into[stage]`` (ms); ``stage`` must be one of :data:`STAGES`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    t0 = time.perf_counter()
    try:
        yield
    finally:
        into[stage] = ms_since(t0)


def cold_ttft(timings: Mapping[str, float]) -> float:
    """A new face's time to first token: preprocess + encode + image_prefill + ttft (missing stages count 0)."""
    return sum(timings.get(k, 0.0) for k in _COLD)


def rounded(timings: Mapping[str, float]) -> dict[str, float]:
    """Timings for JSON, in the order of :data:`STAGES` (unknown keys after them), 2 decimals."""
    order = {k: i for i, k in enumerate(STAGES)}
    return {k: round(v, 2) for k, v in sorted(timings.items(), key=lambda kv: order.get(kv[0], len(order)))}
