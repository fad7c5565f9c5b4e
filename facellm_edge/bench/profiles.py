"""Profiles: which runtime setting wins on this machine (each option timed like a stage, medians over runs).

* ``llama.cpp threads`` (1 .. cores): ``image_prefill`` ms and decode tok/s of the runtime (``FaceLLM.open_face``
  and ``FaceSession.ask`` on the photo's largest face, the model loaded with that many llama.cpp threads);
* ``ORT threads`` (1 .. cores): ``encode`` ms of one face (``VisionEncoder``);
* ``ORT graph optimisation`` (basic / extended / all): ``encode`` ms, an ONNX Runtime session on the bundle's
  vision file (``VisionEncoder`` always uses ``all``);
* ``GGUF KV-cache type`` (f16 / q8_0): prefill ms of a text prompt as long as the image prompt, then decode tok/s,
  through llama-cpp-python's ``Llama`` (flash attention on; the Generator's ``EngineConfig`` has no KV-type field);
* ``faces per encoder call``: ``encode`` ms per face for all faces of the photo, one batched call vs one call per
  face.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from facellm_edge.bench.stages import StageTimer, repeat, summarize
from facellm_edge.signals import call_holding_signals

log = logging.getLogger(__name__)


def _profile(setting: str, metric: str, better: str, samples: dict[str, list[float]]) -> dict[str, Any]:
    options = {k: summarize(v) for k, v in samples.items()}
    pick = (max if better == "higher" else min)(options, key=lambda k: options[k]["median"])
    return {"setting": setting, "metric": metric, "better": better, "options": options, "winner": pick}


def _timed(fn, runs: int, warmup: int, key: str = "x") -> list[float]:
    def one(t: StageTimer) -> None:
        with t.time(key):
            fn()

    return repeat(one, runs, warmup).samples[key]


def run_profiles(p: dict[str, Any]) -> dict[str, Any]:
    """Entry point of the subprocess. Payload: the edge payload plus ``max_threads``."""
    from facellm_edge.onnxrt import onnxruntime_module  # telemetry off
    ort = onnxruntime_module()

    from facellm_edge.bench.edge import largest_face, read_bgr, runtime_config
    from facellm_edge.runtime.align import CropConfig, align_face
    from facellm_edge.runtime.config import GenerationConfig
    from facellm_edge.runtime.encode import EncoderConfig, VisionEncoder
    from facellm_edge.runtime.pipeline import FaceLLM
    from facellm_edge.runtime.preprocess import crop_to_pixels, crops_to_pixels

    runs, warmup, n_new = int(p["runs"]), int(p["warmup"]), int(p["decode_tokens"])
    thread_options = list(range(1, int(p["max_threads"]) + 1))
    threads = int(p["threads"])
    image = read_bgr(p["image"])
    out: list[dict[str, Any]] = []

    # llama.cpp threads: image prefill and decode rate of the runtime, on the largest face (encoded once).
    answer_cfg = GenerationConfig(max_tokens=n_new, stop_at_eos=False)
    decode: dict[str, list[float]] = {}
    prefill: dict[str, list[float]] = {}
    faces = embeds = None
    for k in thread_options:
        with FaceLLM.load(p["bundle"], runtime_config(p, threads=threads, llama_threads=k)) as model:
            if faces is None:
                faces = model.detect(image)
                face = largest_face(faces, p["image"])
                model.encode_faces(image, [face])
                embeds = face.embeds
            samples: list[float] = []
            pre: list[float] = []

            def answer() -> None:
                with model.open_face(face) as session:  # a fresh image prefill each time
                    pre.append(face.timings["image_prefill"])
                    samples.append(session.ask(p["question"], generation=answer_cfg).tokens_per_s)

            for _ in range(warmup):
                answer()
            samples.clear()
            pre.clear()
            for _ in range(runs):
                answer()
            decode[str(k)], prefill[str(k)] = samples, pre
            bundle = model.bundle
    out.append(_profile("llama.cpp threads", "decode tok/s", "higher", decode))
    out.append(_profile("llama.cpp threads", "image_prefill ms", "lower", prefill))

    spec = bundle.manifest.image
    crops = [align_face(image, f.landmarks, CropConfig(size=spec.size)) for f in faces]
    # ORT threads and faces per encoder call (the configured vision precision).
    one_face = crop_to_pixels(crops[0], spec)
    all_faces = crops_to_pixels(crops, spec)
    encode_ms: dict[str, list[float]] = {}
    for k in thread_options:
        enc = VisionEncoder.from_bundle(bundle, EncoderConfig(device="cpu", precision=p["vision"], n_threads=k))
        encode_ms[str(k)] = _timed(lambda: enc.encode(one_face), runs, warmup)
    out.append(_profile("ORT threads", "encode ms", "lower", encode_ms))
    enc = VisionEncoder.from_bundle(bundle, EncoderConfig(device="cpu", precision=p["vision"], n_threads=threads))
    n = len(crops)
    batched = [t / n for t in _timed(lambda: enc.encode(all_faces, one_call=True), runs, warmup)]
    single = [t / n for t in _timed(lambda: [enc.encode(all_faces[i:i + 1]) for i in range(n)], runs, warmup)]
    out.append(_profile(f"faces per encoder call ({n} faces)", "encode ms per face", "lower",
                        {f"batch of {n}": batched, "one by one": single}))

    # ORT graph optimisation level.
    _, vision_path = bundle.vision_file(p["vision"])
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    opt_ms: dict[str, list[float]] = {}
    for name, level in levels.items():
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(str(vision_path), sess_options=so, providers=["CPUExecutionProvider"])
        opt_ms[name] = _timed(lambda s=sess: s.run(["image_embeds"], {"pixel_values": one_face}), runs, warmup)
        del sess
    out.append(_profile("ORT graph optimisation", "encode ms", "lower", opt_ms))

    out += _kv_profiles(p, bundle, threads, runs, warmup, n_new, prompt_len=int(embeds.shape[0]) + 20)
    return {"name": "profiles", "kind": "profiles", "vision": p["vision"], "quant": p["quant"], "profiles": out}


def _kv_profiles(p: dict[str, Any], bundle, threads: int, runs: int, warmup: int, n_new: int,
                 prompt_len: int) -> list[dict[str, Any]]:
    import llama_cpp

    _, gguf_path = bundle.llm_file(p["quant"])
    types = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
    arch = bundle.manifest.arch
    head_dim = arch.llm_hidden // arch.llm_heads
    unsupported = {}
    if head_dim % 32:  # llama.cpp: a q8_0 KV block (32) must divide the head size
        unsupported["q8_0"] = f"head size {head_dim} is not a multiple of q8_0's block of 32"
        del types["q8_0"]
    prefill: dict[str, list[float]] = {}
    decode: dict[str, list[float]] = {}
    for name, ggml_type in types.items():
        llm = call_holding_signals(lambda: llama_cpp.Llama(  # Ctrl-C mid-load: honoured once the load returns
            str(gguf_path), n_ctx=max(1024, prompt_len + n_new + 16), n_threads=threads, n_threads_batch=threads,
            flash_attn=True, type_k=ggml_type, type_v=ggml_type, verbose=False), release=lambda m: m.close())
        try:
            words = llm.tokenize(p["question"].encode(), add_bos=False)
            prompt = (words * (prompt_len // max(len(words), 1) + 1))[:prompt_len]
            pre: list[float] = []
            dec: list[float] = []
            for i in range(warmup + runs):
                llm.reset()
                t = time.perf_counter()
                llm.eval(prompt)
                t_pre = time.perf_counter()
                for _ in range(n_new - 1):
                    tok = llm.sample(temp=0.0)
                    llm.eval([tok])
                t_end = time.perf_counter()
                if i >= warmup:
                    pre.append((t_pre - t) * 1000.0)
                    dec.append((n_new - 1) / max(t_end - t_pre, 1e-9))
            prefill[name], decode[name] = pre, dec
        finally:
            llm.close()
    profs = [_profile(f"GGUF KV-cache type ({prompt_len}-token prompt)", "prefill ms", "lower", prefill),
             _profile("GGUF KV-cache type", "decode tok/s", "higher", decode)]
    for prof in profs:
        prof["unsupported"] = unsupported
    return profs

