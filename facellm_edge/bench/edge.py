"""The edge path, one configuration = one vision precision (ONNX Runtime) x one GGUF quant (llama.cpp).

Per run, on the benchmark photo: detect (YuNet) -> align the largest face -> preprocess -> vision encode ->
image prefill into a fresh KV slot -> question (prefill + first token) -> a fixed number of decoded tokens
(``stop_at_eos=False``) -> a follow-up question on the cached image prefix (warm TTFT). All stages are the runtime's
own components (``facellm_edge.runtime.detect``, ``align``, ``preprocess``, ``encode``, ``generate``). Runs in a fresh
subprocess (``stages.run_isolated``), so the peak RSS is the runtime's alone: no torch, no transformers imported.

Vision ``mmproj`` is the peer: llama.cpp's own InternVL encoder (libmtmd, the bundle's ``--vision mmproj`` GGUF) in
place of ONNX Runtime; it preprocesses the aligned crop itself, so its preprocessing is inside ``vision_ms``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from facellm_edge.bench.stages import RssSampler, StageTimer, repeat, rss_mb
from facellm_edge.errors import InputError, RuntimeStageError

log = logging.getLogger(__name__)


def edge_payload(bundle: Path, vision: str, quant: str, image: Path, question: str, followup: str, runs: int,
                 warmup: int, decode_tokens: int, threads: int, detector_model: Path | None) -> dict[str, Any]:
    return {"bundle": str(bundle), "vision": vision, "quant": quant, "image": str(image), "question": question,
            "followup": followup, "runs": runs, "warmup": warmup, "decode_tokens": decode_tokens,
            "threads": threads, "detector_model": str(detector_model) if detector_model else None}


def read_bgr(path: str | Path) -> np.ndarray:
    from facellm_edge.io import read_image

    return read_image(Path(path))  # the runtime's own reader and decoded-size bound


def make_detector(detector_model: str | Path | None, threads: int | None):
    from facellm_edge.runtime.detect import DetectorConfig, create_detector

    return create_detector(DetectorConfig(model_path=Path(detector_model) if detector_model else None,
                                          n_threads=threads))


def largest_face(faces: list, image_path: str | Path):
    if not faces:
        raise InputError(f"no face found in {image_path}; benchmark with a photo that shows a face (--image)")
    return max(faces, key=lambda f: f.width * f.height)


def aligned_face_crop(image_path: Path, detector_model: Path | None, size: int) -> np.ndarray:
    """The aligned crop of the photo's largest face: the one input both paths see (naive: via its processor)."""
    from facellm_edge.runtime.align import CropConfig, align_face

    image = read_bgr(image_path)
    face = largest_face(make_detector(detector_model, None).detect(image), image_path)
    return align_face(image, face.landmarks, CropConfig(size=size))


PEER = "mmproj"  # vision "precision" of the llama.cpp/libmtmd peer


def quality(verification: dict[str, Any], vision: str, quant: str) -> dict[str, float | None]:
    """What the export measured for these files against transformers (None where the bundle was not verified)."""
    llm = verification.get("llm", {}).get(quant) or {}
    vis = verification.get("mmproj") if vision == PEER else verification.get("vision", {}).get(vision)
    vis = vis or {}
    return {"llm_top1": llm.get("top1_agreement"), "llm_max_rel_diff": llm.get("max_rel_diff"),
            "vision_cosine": vis.get("token_cosine_min", vis.get("cosine_min"))}


class _MtmdEncoder:
    """libmtmd behind the ONNX encoder's interface, for the benchmark (takes the aligned BGR crop, not pixels)."""

    providers = ["llama.cpp libmtmd (CPU)"]

    def __init__(self, bundle: Any, quant: str, threads: int) -> None:
        from facellm_edge.export.mtmd_peer import MtmdConfig, MtmdVision

        if bundle.manifest.mmproj is None:
            raise InputError(f"bundle {bundle.root} has no mmproj; export it with --vision ...,mmproj")
        self._peer = MtmdVision(bundle.path(bundle.manifest.mmproj), bundle.llm_file(quant)[1],
                                MtmdConfig(n_threads=threads))

    def encode_crop(self, crop_bgr: np.ndarray) -> np.ndarray:
        return self._peer.encode(np.ascontiguousarray(crop_bgr[..., ::-1]))[None]

    def close(self) -> None:
        self._peer.close()


def open_runtime(bundle_dir: str, vision: str, quant: str, threads: int, *, llama_threads: int | None = None):
    """(bundle, encoder, generator) for one configuration."""
    from facellm_edge.bundle import load_bundle
    from facellm_edge.runtime.encode import EncoderConfig, VisionEncoder
    from facellm_edge.llm.generator import EngineConfig, Generator

    bundle = load_bundle(bundle_dir, check_hashes=False)  # the parent checked the hashes once
    n_llama = llama_threads or threads
    gen = Generator.from_bundle(bundle, quant, EngineConfig(n_threads=n_llama, n_threads_batch=n_llama))
    try:
        if vision == PEER:
            return bundle, _MtmdEncoder(bundle, quant, threads), gen
        enc = VisionEncoder.from_bundle(bundle, EncoderConfig(device="cpu", precision=vision, n_threads=threads),
                                        llm_width=gen.n_embd)
    except BaseException:
        gen.close()
        raise
    return bundle, enc, gen


def run_edge(p: dict[str, Any]) -> dict[str, Any]:
    """Benchmark one (vision precision, GGUF quant) pair. Entry point of the subprocess."""
    from facellm_edge.runtime.align import CropConfig, align_face
    from facellm_edge.llm.generator import GenerationConfig
    from facellm_edge.runtime.preprocess import crop_to_pixels

    n_new, threads = int(p["decode_tokens"]), int(p["threads"])
    image = read_bgr(p["image"])
    rss_start = rss_mb()
    t0 = time.perf_counter()
    detector = make_detector(p["detector_model"], threads)
    bundle, enc, gen = open_runtime(p["bundle"], p["vision"], p["quant"], threads)
    load_ms = (time.perf_counter() - t0) * 1000.0
    rss_loaded = rss_mb()
    spec = bundle.manifest.image
    crop_cfg = CropConfig(size=spec.size)
    answer_cfg = GenerationConfig(max_tokens=n_new, stop_at_eos=False)
    warm_cfg = GenerationConfig(max_tokens=1, stop_at_eos=False)
    counter = iter(range(1 << 30))
    info: dict[str, Any] = {}
    peer = p["vision"] == PEER

    def one(timer: StageTimer) -> None:
        key = f"bench-{next(counter)}"
        with timer.time("detect_ms"):
            faces = detector.detect(image)
        face = largest_face(faces, p["image"])
        with timer.time("align_ms"):
            crop = align_face(image, face.landmarks, crop_cfg)
        if peer:
            timer.add("preprocess_ms", 0.0)
            with timer.time("vision_ms"):
                embeds = enc.encode_crop(crop)
        else:
            with timer.time("preprocess_ms"):
                pixels = crop_to_pixels(crop, spec)
            with timer.time("vision_ms"):
                embeds = enc.encode(pixels)
        t = time.perf_counter()
        info["image_prefix_tokens"] = gen.prefill_image(key, embeds[0])
        image_prefill_ms = (time.perf_counter() - t) * 1000.0
        ans = gen.ask(key, p["question"], answer_cfg)
        if ans.n_generated != n_new:
            raise RuntimeStageError(f"generated {ans.n_generated} tokens instead of {n_new} ({ans.stop_reason}); "
                                    "lower --decode-tokens")
        info["question_tokens"] = ans.n_prefilled
        tm = ans.timings
        cold = timer.samples["preprocess_ms"][-1] + timer.samples["vision_ms"][-1] + image_prefill_ms + tm["ttft_ms"]
        timer.add("image_prefill_ms", image_prefill_ms)
        timer.add("prefill_ms", image_prefill_ms + tm["prefill_ms"])
        timer.add("ttft_cold_ms", cold)
        timer.add("decode_tok_s", tm["tokens_per_s"])
        timer.add("decode_ms", tm["decode_ms"])
        timer.add("end_to_end_ms", timer.samples["detect_ms"][-1] + timer.samples["align_ms"][-1] + cold
                  + tm["decode_ms"])
        warm = gen.ask(key, p["followup"], warm_cfg)
        info["followup_tokens"] = warm.n_prefilled
        timer.add("ttft_warm_ms", warm.timings["ttft_ms"])
        gen.drop(key)

    try:
        with RssSampler() as sampler:
            timer = repeat(one, int(p["runs"]), int(p["warmup"]))
    finally:
        gen.close()
        if peer:
            enc.close()
    llm_entry = bundle.manifest.llm[p["quant"]]
    vision_entry = bundle.manifest.mmproj if peer else bundle.manifest.vision[p["vision"]]
    return {
        "name": f"peer llama.cpp mtmd+{p['quant']}" if peer else f"edge {p['vision']}+{p['quant']}",
        "kind": "peer" if peer else "edge",
        "vision": p["vision"],
        "quant": p["quant"],
        "device": "cpu",
        "threads": threads,
        "providers": enc.providers,
        "imports_torch": "torch" in sys.modules,  # the runtime must not need it: peak RSS is the runtime's
        "load_ms": round(load_ms, 1),
        "decode_tokens": n_new,
        "bits_per_weight": llm_entry.extra.get("bits_per_weight"),
        "files_mb": {"vision": round(vision_entry.bytes / 2**20, 1),
                     "llm": round(llm_entry.bytes / 2**20, 1)},
        **info,
        "quality": quality(bundle.manifest.verification, p["vision"], p["quant"]),
        "stages": timer.summary(),
        "memory": {"rss_start_mb": round(rss_start, 1), "rss_loaded_mb": round(rss_loaded, 1),
                   "rss_sampled_peak_mb": round(sampler.peak_mb, 1)},
        "notes": "cold TTFT = preprocess + vision + image prefill + question prefill + first token; warm TTFT = a "
                 "follow-up question on the cached image prefix; end-to-end adds detection, alignment and decode",
    }
