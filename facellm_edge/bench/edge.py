"""The edge path, one configuration = one vision precision (ONNX Runtime) x one GGUF quant (llama.cpp).

It runs the runtime itself: :meth:`FaceLLM.load <facellm_edge.runtime.pipeline.FaceLLM.load>` with a
:class:`~facellm_edge.runtime.config.RuntimeConfig` built from the bench settings, then per run, on the benchmark
photo, what ``ask`` and a follow-up do: ``FaceLLM.detect`` -> the largest face -> ``FaceLLM.encode_faces`` (align,
preprocess, encode) -> ``FaceLLM.open_face`` (image prefill, one :class:`~facellm_edge.runtime.session.FaceSession`
per run) -> ``FaceSession.ask`` (a fixed number of tokens, ``stop_at_eos=False``) -> a follow-up ``ask`` on the
cached image prefix (warm TTFT) -> ``FaceSession.close``. Stages are reported under the runtime's own names
(:mod:`facellm_edge.timings`, ``<stage>_ms``) plus what is derived from them (:func:`add_answer`). Runs in a fresh
subprocess (``stages.run_isolated``), so the peak RSS is the runtime's alone: no torch, no transformers imported.

Vision ``mmproj`` is the peer, llama.cpp's own path end to end: the runtime's detector and aligner (llama.cpp has
none), then :class:`~facellm_edge.bench.peer.MtmdChat` — llama.cpp's InternVL encoder (libmtmd, the bundle's
``--vision mmproj`` GGUF), its prefill helpers, context defaults and sampler, as ``llama-mtmd-cli`` runs a chat; none
of the runtime's LLM code. It preprocesses the aligned crop itself, so it has no ``preprocess`` stage: that time is in
its ``encode``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from facellm_edge.bench.stages import RssSampler, StageTimer, gpu_memory_reader, gpu_peak, repeat, rss_mb
from facellm_edge.errors import InputError, RuntimeStageError
from facellm_edge.timings import STAGES, cold_ttft, timed

if TYPE_CHECKING:
    from facellm_edge.llm.generator import Answer
    from facellm_edge.runtime.config import RuntimeConfig
    from facellm_edge.runtime.faces import Face

log = logging.getLogger(__name__)

PEER = "mmproj"  # vision "precision" of the llama.cpp/libmtmd peer
NOTES = ("stages are facellm_edge.timings' (ms); ttft_cold = preprocess + encode + image_prefill + ttft (a new "
         "face after detection); ttft_warm = a follow-up question's ttft on the cached image prefix; end_to_end = "
         "detect + align + ttft_cold + decode")


def edge_payload(bundle: Path, vision: str, quant: str, image: Path, question: str, followup: str, runs: int,
                 warmup: int, decode_tokens: int, threads: int, detector_model: Path | None,
                 vision_prepack: str = "auto", device: str = "cpu") -> dict[str, Any]:
    return {"bundle": str(bundle), "vision": vision, "quant": quant, "image": str(image), "question": question,
            "followup": followup, "runs": runs, "warmup": warmup, "decode_tokens": decode_tokens,
            "threads": threads, "detector_model": str(detector_model) if detector_model else None,
            "vision_prepack": vision_prepack, "device": device}


def config_name(kind: str, vision: str, quant: str, device: str) -> str:
    """A configuration's row name: ``edge int8+q4_0``, ``edge cuda fp32+q4_0``, ``peer llama.cpp mtmd+q4_0``,
    ``peer cuda llama.cpp mtmd+q4_0`` (CPU rows keep the names of the results measured before --device)."""
    where = "" if device == "cpu" else f"{device} "
    return f"peer {where}llama.cpp mtmd+{quant}" if kind == "peer" else f"edge {where}{vision}+{quant}"


def read_bgr(path: str | Path) -> np.ndarray:
    from facellm_edge.io import read_image

    return read_image(Path(path))  # the runtime's own reader and decoded-size bound


def detector_config(detector_model: str | Path | None, threads: int | None):
    from facellm_edge.runtime.detect import DetectorConfig

    return DetectorConfig(model_path=Path(detector_model) if detector_model else None, n_threads=threads)


def largest_face(faces: list["Face"], image_path: str | Path) -> "Face":
    if not faces:
        raise InputError(f"no face found in {image_path}; benchmark with a photo that shows a face (--image)")
    return max(faces, key=lambda f: f.width * f.height)


def aligned_face_crop(image_path: Path, detector_model: Path | None, size: int) -> np.ndarray:
    """The aligned crop of the photo's largest face: the one input both paths see (naive: via its processor)."""
    from facellm_edge.runtime.align import CropConfig, align_face
    from facellm_edge.runtime.detect import create_detector

    image = read_bgr(image_path)
    face = largest_face(create_detector(detector_config(detector_model, None)).detect(image), image_path)
    return align_face(image, face.landmarks, CropConfig(size=size))


def runtime_config(p: Mapping[str, Any], *, threads: int, llama_threads: int | None = None,
                   max_tokens: int | None = None) -> "RuntimeConfig":
    """The :class:`RuntimeConfig` of a benchmark payload: its vision precision and pre-packing setting, its device
    (``cpu``: ONNX Runtime's CPU provider and llama.cpp on the CPU; ``cuda`` / ``tensorrt``: that provider and every
    LLM layer on the GPU), quant, detector model and threads; answers of ``max_tokens`` (default: the payload's
    ``decode_tokens``) whatever the model samples (``stop_at_eos=False``, so every run decodes as many tokens).
    Hashes are not re-checked: the parent checked them once."""
    from facellm_edge.bench.config import GPU_LAYERS
    from facellm_edge.runtime.config import EncoderConfig, EngineConfig, GenerationConfig, RuntimeConfig

    k = llama_threads or threads
    device = p.get("device", "cpu")
    return RuntimeConfig(
        detector=detector_config(p["detector_model"], threads),
        encoder=EncoderConfig(device=device, precision=p["vision"], n_threads=threads,
                              prepack=p.get("vision_prepack", "auto")),
        engine=EngineConfig(quant=p["quant"], n_threads=k, n_threads_batch=k,
                            n_gpu_layers=0 if device == "cpu" else GPU_LAYERS),
        generation=GenerationConfig(max_tokens=max_tokens or int(p["decode_tokens"]), stop_at_eos=False),
        check_hashes=False)


def quality(verification: dict[str, Any], vision: str, quant: str) -> dict[str, float | None]:
    """What the export measured for these files against transformers (None where the bundle was not verified)."""
    llm = verification.get("llm", {}).get(quant) or {}
    vis = verification.get("mmproj") if vision == PEER else verification.get("vision", {}).get(vision)
    vis = vis or {}
    return {"llm_top1": llm.get("top1_agreement"), "llm_max_rel_diff": llm.get("max_rel_diff"),
            "vision_cosine": vis.get("token_cosine_min", vis.get("cosine_min"))}


def check_length(ans: "Answer", n_new: int) -> None:
    if ans.n_generated != n_new:
        raise RuntimeStageError(f"generated {ans.n_generated} tokens instead of {n_new} ({ans.stop_reason}); "
                                "lower --decode-tokens")


def add_answer(timer: StageTimer, timings: Mapping[str, float], ans: "Answer", warm: "Answer") -> None:
    """One run's samples: every stage of ``timings`` as ``<stage>_ms`` (``facellm_edge.timings`` names, the answer's
    own ``ttft`` and ``decode`` included), then the derived ``ttft_cold_ms`` (:func:`~facellm_edge.timings.cold_ttft`),
    ``ttft_warm_ms`` (the follow-up's ``ttft``), ``decode_tok_s`` (tokens after the first / decode time) and
    ``end_to_end_ms`` (detect + align + cold TTFT + decode)."""
    for stage in STAGES:
        if stage in timings:
            timer.add(f"{stage}_ms", timings[stage])
    cold = cold_ttft(timings)
    timer.add("ttft_cold_ms", cold)
    timer.add("ttft_warm_ms", warm.timings["ttft"])
    timer.add("decode_tok_s", ans.tokens_per_s)
    timer.add("end_to_end_ms", timings["detect"] + timings["align"] + cold + timings["decode"])


def _run_edge_path(p: dict[str, Any], image: np.ndarray, threads: int, n_new: int, info: dict[str, Any]):
    """(load, one run, close, providers) of the runtime: ``FaceLLM`` and one ``FaceSession`` per run."""
    from facellm_edge.runtime.config import GenerationConfig
    from facellm_edge.runtime.pipeline import FaceLLM

    model = FaceLLM.load(p["bundle"], runtime_config(p, threads=threads))
    model.detector  # loaded before the first frame, as `run` does: not inside the first run's detect
    info["vision_prepack"] = model.encoder.prepack
    answer_cfg = GenerationConfig(max_tokens=n_new, stop_at_eos=False)
    warm_cfg = GenerationConfig(max_tokens=1, stop_at_eos=False)

    def one(timer: StageTimer) -> None:
        face = largest_face(model.detect(image), p["image"])
        model.encode_faces(image, [face])
        with model.open_face(face) as session:
            ans = session.ask(p["question"], generation=answer_cfg)
            check_length(ans, n_new)
            warm = session.ask(p["followup"], generation=warm_cfg)
            info.update(image_prefix_tokens=session.n_prefix, question_tokens=ans.n_prefilled,
                        followup_tokens=warm.n_prefilled)
        add_answer(timer, {**face.timings, **ans.timings}, ans, warm)

    return one, model.close, model.encoder.providers


def _run_peer_path(p: dict[str, Any], image: np.ndarray, threads: int, n_new: int, info: dict[str, Any]):
    """The llama.cpp peer: the runtime's detector and aligner (llama.cpp has none) in front of llama.cpp's own
    multimodal chat path (:class:`facellm_edge.bench.peer.MtmdChat`: libmtmd vision, llama.cpp's helpers, context
    defaults and sampler; none of the runtime's LLM code)."""
    from facellm_edge.bench.peer import MtmdChat
    from facellm_edge.bundle import load_bundle
    from facellm_edge.runtime.align import CropConfig, align_face
    from facellm_edge.runtime.detect import create_detector

    cfg = runtime_config(p, threads=threads)
    bundle = load_bundle(p["bundle"], check_hashes=False)  # the parent checked the hashes once
    if bundle.manifest.mmproj is None:
        raise InputError(f"bundle {bundle.root} has no mmproj; export it with --vision ...,mmproj")
    detector = create_detector(cfg.detector)
    crop_cfg = CropConfig(size=bundle.manifest.image.size)
    gpu = p.get("device", "cpu") != "cpu"
    chat = MtmdChat(bundle.path(bundle.manifest.mmproj), bundle.llm_file(p["quant"])[1], bundle.manifest.prompt,
                    threads=threads, n_ctx=cfg.engine.n_ctx, gpu=gpu)

    def one(timer: StageTimer) -> None:
        t: dict[str, float] = {}
        with timed(t, "detect"):
            faces = detector.detect(image)
        face = largest_face(faces, p["image"])
        with timed(t, "align"):
            crop = align_face(image, face.landmarks, crop_cfg)
        ans = chat.first_turn(np.ascontiguousarray(crop[..., ::-1]), p["question"], n_new, t)
        check_length(ans, n_new)
        warm = chat.followup(p["followup"], 1)
        info.update(image_prefix_tokens=chat.n_image_prefix, question_tokens=ans.n_prefilled,
                    followup_tokens=warm.n_prefilled)
        add_answer(timer, {**t, **ans.timings}, ans, warm)

    return one, chat.close, [f"llama.cpp libmtmd ({'GPU' if gpu else 'CPU'})"]


def run_edge(p: dict[str, Any]) -> dict[str, Any]:
    """Benchmark one (vision precision, GGUF quant) pair. Entry point of the subprocess."""
    from facellm_edge.bundle import load_bundle

    n_new, threads = int(p["decode_tokens"]), int(p["threads"])
    peer = p["vision"] == PEER
    device = p.get("device", "cpu")
    image = read_bgr(p["image"])
    rss_start = rss_mb()
    gpu_used = gpu_memory_reader() if device != "cpu" else None  # before loading: the GPU memory this run takes
    gpu_start = gpu_used() if gpu_used else None
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    one, close, providers = (_run_peer_path if peer else _run_edge_path)(p, image, threads, n_new, info)
    load_ms = (time.perf_counter() - t0) * 1000.0
    rss_loaded = rss_mb()
    try:
        with RssSampler(gpu=gpu_used) as sampler:
            timer = repeat(one, int(p["runs"]), int(p["warmup"]))
    finally:
        close()
    manifest = load_bundle(p["bundle"], check_hashes=False).manifest
    llm_entry = manifest.llm[p["quant"]]
    vision_entry = manifest.mmproj if peer else manifest.vision[p["vision"]]
    return {
        "name": config_name("peer" if peer else "edge", p["vision"], p["quant"], device),
        "kind": "peer" if peer else "edge",
        "code_path": ("runtime detector + aligner, then llama.cpp's own multimodal chat path (libmtmd + helpers, "
                      "default context, greedy sampler: bench.peer.MtmdChat)" if peer
                      else "FaceLLM.detect -> encode_faces -> open_face -> FaceSession.ask (+ follow-up ask)"),
        "vision": p["vision"],
        "quant": p["quant"],
        "device": device,
        "threads": threads,
        "providers": providers,
        # ORT weight pre-packing + CPU arena as resolved on this machine (EncoderConfig.prepack); None: the peer
        "vision_prepack": info.pop("vision_prepack", None),
        "imports_torch": "torch" in sys.modules,  # the runtime must not need it: peak RSS is the runtime's
        "load_ms": round(load_ms, 1),
        "decode_tokens": n_new,
        "bits_per_weight": llm_entry.extra.get("bits_per_weight"),
        "files_mb": {"vision": round(vision_entry.bytes / 2**20, 1),
                     "llm": round(llm_entry.bytes / 2**20, 1)},
        **info,
        "quality": quality(manifest.verification, p["vision"], p["quant"]),
        "stages": timer.summary(),
        "memory": {"rss_start_mb": round(rss_start, 1), "rss_loaded_mb": round(rss_loaded, 1),
                   "rss_sampled_peak_mb": round(sampler.peak_mb, 1),
                   **gpu_peak(sampler, gpu_start)},
        "notes": NOTES,
    }
