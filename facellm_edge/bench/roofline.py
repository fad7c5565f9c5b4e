"""Roofline: what this machine can do at best, and what the model needs — so a missed target gets a measured "why".

Ceilings, measured in this process with the benchmark's thread count (best of several runs after a warm-up):

* ``mem_read_gb_s`` — streaming read bandwidth: numpy sums of a 1 GiB array split over the threads (numpy releases
  the GIL in reductions). Decoding one token reads every LLM weight once, so ``bandwidth / bytes per token`` bounds
  decode tok/s from above.
* ``fp32_gflop_s`` — ONNX Runtime (MLAS) fp32 MatMul [1025 x 1024] x [1024 x 4096]: the vision tower's shape.
* ``int8_gop_s`` — ONNX Runtime ``com.microsoft.DynamicQuantizeMatMul``, the op the int8 vision graph runs (fp32
  activations quantised on the fly, int8 weights), same shape.
* per GGUF (``llm.<quant>.llama``), llama.cpp's own kernels on that file at the benchmark's shapes: the prefill rate
  (GFLOP/s of the image prefix's length decoded in one call on a fresh context, where attention is ~1-2 % of the
  work), and the *compute* time a decoding step spends per token — (one call of 8 one-token sequences − one call of
  1) / 7: once the weights are streamed, what each more token costs. Decode is bound by the slower of reading the
  weights and this compute: ``decode_tok_s`` is the min of both.

Work, counted from the bundle's own files (no registry needed, so a real bundle works the same way):

* vision: multiply-accumulates of every weight matrix of the ONNX graph (the projector's — output width = the LLM's
  width — on the pixel-shuffled tokens, all others on every patch token), the patch convolution, and attention
  (2 x tokens^2 x width per layer), which ONNX Runtime runs in fp32 in both graphs.
* LLM prefill: 2 x tokens x (2-D weights except the embedding), for the image prefix (``image_prefill``: no logits)
  and for the question (``question_prefill``: + one output-head product, the logits of its last token); decode
  bytes per token: every 2-D weight tensor once (the tied embedding as the output head) + the KV cache read at the
  whole prompt's length.

Bounds carry the stage names of :mod:`facellm_edge.timings` (``encode_ms``, ``image_prefill_ms``,
``question_prefill_ms``), ``ttft_cold_ms`` (their sum: preprocessing and sampling are taken as free) and
``decode_tok_s``.

Bounds are optimistic (perfect kernels, no overhead); a measured time near its bound means the stage is as fast as
this machine allows, and no software change can meet a target beyond it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

GEMM_SHAPE = (1025, 1024, 4096)  # (tokens, K, N): InternViT-300M's MLP at 448 px
_MB = 1024 * 1024


def _best_of(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def mem_read_gb_s(threads: int, nbytes: int = 1 << 30, reps: int = 5) -> float:
    data = np.ones(nbytes // 8, dtype=np.float64)
    parts = np.array_split(data, max(1, threads))

    def read() -> None:
        workers = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    return nbytes / _best_of(read, reps) / 1e9


def _ort_gemm(threads: int, int8: bool, reps: int = 5) -> float:
    from facellm_edge.onnxrt import onnxruntime_module  # telemetry off
    ort = onnxruntime_module()
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = GEMM_SHAPE
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    if int8:
        w = numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "W")
        inits = [w, numpy_helper.from_array(np.array([0.01], np.float32), "s"),
                 numpy_helper.from_array(np.array([0], np.int8), "z")]
        node = helper.make_node("DynamicQuantizeMatMul", ["A", "W", "s", "z"], ["Y"], domain="com.microsoft")
    else:
        inits = [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "W")]
        node = helper.make_node("MatMul", ["A", "W"], ["Y"])
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    seconds = _best_of(lambda: sess.run(None, {"A": a}), reps)
    return 2.0 * m * k * n / seconds / 1e9


def measure_ceilings(threads: int) -> dict[str, Any]:
    return {"threads": threads, "mem_read_gb_s": round(mem_read_gb_s(threads), 2),
            "fp32_gflop_s": round(_ort_gemm(threads, int8=False), 1),
            "int8_gop_s": round(_ort_gemm(threads, int8=True), 1), "gemm_shape": list(GEMM_SHAPE)}


def llama_ceilings(gguf_path: Path, threads: int, tokens: int, reps: int = 3) -> dict[str, float]:
    """llama.cpp's throughput on ``gguf_path`` here: seconds to prefill ``tokens`` positions in one call, and the
    ms of one-token steps for 1 and 8 sequences in one call (their difference / 7: compute per decoded token)."""
    from facellm_edge.llm.engine import EngineConfig, LlamaEngine

    n_batch = max(512, tokens)
    eng = LlamaEngine(gguf_path, EngineConfig(n_ctx=n_batch + 16, n_threads=threads, n_threads_batch=threads,
                                              n_batch=n_batch, max_slots=8))
    try:
        ids = [100 + (i * 7919) % 1000 for i in range(tokens)]  # ordinary text token ids

        def prefill() -> None:
            eng.seq_clear(0)
            eng.decode_tokens(ids, 0, 0, logits_last=True)

        def steps(b: int):
            def run() -> None:
                for k in range(b):
                    eng.seq_clear(k)
                eng.decode_packed([([ids[k]], k, 0) for k in range(b)], logits_last=True)
            return run

        prefill_s = _best_of(prefill, reps)
        step1, step8 = _best_of(steps(1), 5), _best_of(steps(8), 5)
    finally:
        eng.close()
    return {"prefill_tokens": tokens, "prefill_s": round(prefill_s, 4), "step1_ms": round(step1 * 1e3, 2),
            "step8_ms": round(step8 * 1e3, 2), "compute_ms_per_token": round(max(0.0, (step8 - step1) / 7) * 1e3, 3)}


# -- work of the model ---------------------------------------------------------------------------------------

def vision_work(onnx_path: Path, *, image_size: int, patch_size: int, vision_hidden: int, vision_layers: int,
                llm_hidden: int, num_image_tokens: int) -> dict[str, float]:
    """Multiply-accumulates (G) of one 448 px tile, split into weight products and attention."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    tokens = (image_size // patch_size) ** 2 + 1  # patches + class token
    weight_macs = 0.0
    for t in model.graph.initializer:
        dims = list(t.dims)
        if len(dims) == 2 and min(dims) > 1:
            k, n = dims
            rows = num_image_tokens if llm_hidden in (k, n) and vision_hidden not in (k, n) else tokens
            weight_macs += float(rows) * k * n
        elif len(dims) == 4:  # the patch embedding convolution: out x in x p x p per patch
            weight_macs += float(tokens - 1) * int(np.prod(dims))
    attention_macs = 2.0 * tokens * tokens * vision_hidden * vision_layers  # QK^T and AV
    return {"tokens": tokens, "weight_gmac": weight_macs / 1e9, "attention_gmac": attention_macs / 1e9}


def llm_work(gguf_path: Path, *, image_tokens: int, question_tokens: int, kv_dim: int,
             n_layers: int) -> dict[str, float]:
    """Prefill GFLOP of the image prefix and of the question, and decode MB read per token (weights + the KV cache
    at the prompt's length)."""
    from facellm_edge.export.quantize import read_tensor_infos

    infos = read_tensor_infos(gguf_path)
    mats = [t for t in infos if len(t.shape) >= 2]
    embed = next((t for t in mats if t.name == "token_embd.weight"), None)
    head = next((t for t in mats if t.name == "output.weight"), embed)  # tied: the embedding is the head
    body = [t for t in mats if t.name not in ("token_embd.weight", "output.weight")]
    body_params = sum(t.n_elements for t in body)
    head_params = head.n_elements if head is not None else 0
    kv_bytes = 2.0 * n_layers * (image_tokens + question_tokens) * kv_dim * 2  # K and V, f16
    read = sum(t.n_bytes for t in body) + (head.n_bytes if head is not None else 0) + kv_bytes
    return {"image_prefill_gflop": 2.0 * image_tokens * body_params / 1e9,
            "question_prefill_gflop": (2.0 * question_tokens * body_params + 2.0 * head_params) / 1e9,
            "decode_mb_per_token": read / _MB, "head_mb": (head.n_bytes / _MB) if head is not None else 0.0}


def bounds(ceilings: dict[str, Any], vision: dict[str, float], vision_precision: str,
           llm: dict[str, float]) -> dict[str, float]:
    """Best times this machine allows: encode, image prefill, question prefill and cold TTFT ms, decode tok/s."""
    fp32, int8, bw = ceilings["fp32_gflop_s"], ceilings["int8_gop_s"], ceilings["mem_read_gb_s"]
    weight_rate = int8 if vision_precision == "int8" else fp32
    encode_ms = (2 * vision["weight_gmac"] / weight_rate + 2 * vision["attention_gmac"] / fp32) * 1000
    llm_rate = max(fp32, int8)
    image_ms = llm["image_prefill_gflop"] / llm_rate * 1000
    question_ms = llm["question_prefill_gflop"] / llm_rate * 1000
    decode = bw * 1e9 / (llm["decode_mb_per_token"] * _MB)
    compute_ms = (llm.get("llama") or {}).get("compute_ms_per_token") or 0.0
    if compute_ms > 0:  # llama.cpp's own compute per token on this machine, when slower than reading the weights
        decode = min(decode, 1000.0 / compute_ms)
    return {"encode_ms": round(encode_ms, 1), "image_prefill_ms": round(image_ms, 1),
            "question_prefill_ms": round(question_ms, 1),
            "ttft_cold_ms": round(encode_ms + image_ms + question_ms, 1), "decode_tok_s": round(decode, 1)}


def run_roofline(p: dict[str, Any]) -> dict[str, Any]:
    """Entry point of the isolated process: ceilings of this machine + work of each file of the bundle."""
    from facellm_edge.bundle import load_bundle

    bundle = load_bundle(p["bundle"], check_hashes=False)
    m = bundle.manifest
    a = m.arch
    image_tokens, question_tokens = int(p["image_tokens"]), int(p["question_tokens"])
    out: dict[str, Any] = {"ceilings": measure_ceilings(int(p["threads"])), "vision": {}, "llm": {}}
    for precision in p["vision"]:
        _, path = bundle.vision_file(precision)
        out["vision"][precision] = vision_work(
            path, image_size=m.image.size, patch_size=a.patch_size, vision_hidden=a.vision_hidden,
            vision_layers=a.vision_layers, llm_hidden=a.llm_hidden, num_image_tokens=m.tokens.num_image_tokens)
    kv_dim = a.llm_hidden // a.llm_heads * a.llm_kv_heads
    for quant in p["quants"]:
        _, path = bundle.llm_file(quant)
        work = llm_work(path, image_tokens=image_tokens, question_tokens=question_tokens, kv_dim=kv_dim,
                        n_layers=a.llm_layers)
        llama = llama_ceilings(path, int(p["threads"]), image_tokens)
        llama["prefill_gflop_s"] = round(work["image_prefill_gflop"] / llama["prefill_s"], 1)
        out["llm"][quant] = {**work, "llama": llama}
    out.update(image_tokens=image_tokens, question_tokens=question_tokens)
    return out


def attach_bounds(roof: dict[str, Any], configs: list[dict[str, Any]]) -> None:
    """Add ``bounds`` (best possible here) to every edge configuration on the CPU, in place (the ceilings are this
    CPU's: a GPU configuration gets none)."""
    for c in configs:
        if c.get("kind") != "edge" or c.get("device", "cpu") != "cpu":
            continue
        v, q = roof["vision"].get(c["vision"]), roof["llm"].get(c["quant"])
        if v is not None and q is not None:
            c["bounds"] = bounds(roof["ceilings"], v, c["vision"], q)
