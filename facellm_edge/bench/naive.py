"""The naive baseline: what a FaceLLM user runs today with transformers.

``AutoProcessor`` (its own image processing) + ``InternVLForConditionalGeneration.generate`` (greedy, a fixed
number of new tokens: ``min_new_tokens == max_new_tokens``), on CPU in fp32 or bf16, or on CUDA in bf16.

Per run, under the edge path's names where the stage exists (:mod:`facellm_edge.timings`): ``preprocess_ms``
(processor call), ``encode_ms`` (``get_image_features``, measured on its own), ``ttft_cold_ms``
(``generate(max_new_tokens=1)`` from the processor's output, plus preprocessing: the image and the question are
prefilled together inside it, so there is no separate image / question prefill or ``ttft``), the full answer
(``generate(max_new_tokens=N)``: ``decode_ms`` from its first to its last token, ``decode_tok_s`` = (N - 1) tokens
over that time, ``end_to_end_ms`` = preprocessing + the whole call), and ``ttft_warm_ms``, a follow-up question
about the same face (transformers keeps no prefix cache between ``generate`` calls, so the image is encoded and
prefilled again). Runs in a fresh subprocess (see ``stages.run_isolated``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from facellm_edge.bench.config import NAIVE_TARGETS
from facellm_edge.bench.stages import RssSampler, StageTimer, gpu_memory_reader, gpu_peak, repeat, rss_mb
from facellm_edge.errors import CheckpointError, RuntimeStageError, require

log = logging.getLogger(__name__)


def naive_payload(checkpoint: str, target: str, image: Path, question: str, followup: str, runs: int, warmup: int,
                  decode_tokens: int, threads: int) -> dict[str, Any]:
    return {"checkpoint": str(checkpoint), "target": target, "image": str(image), "question": question,
            "followup": followup, "runs": runs, "warmup": warmup, "decode_tokens": decode_tokens,
            "threads": threads}


def _load_rgb(path: str):
    import cv2
    from PIL import Image

    from facellm_edge.io import read_image

    return Image.fromarray(cv2.cvtColor(read_image(Path(path)), cv2.COLOR_BGR2RGB))


class _TokenClock:
    """A generate() streamer that timestamps every new token: the decode rate is (N - 1) tokens over the time from
    the first to the last token of one call (subtracting two separate generate() timings mixed the run-to-run noise
    of the prefill into it — seconds on a CPU — and could even come out negative)."""

    def __init__(self, sync) -> None:
        self._sync = sync
        self.times: list[float] = []

    def put(self, value) -> None:  # first call: the prompt ids; then one call per generated token
        self._sync()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_s(self, generated: int) -> float:
        """Seconds from the first to the last generated token."""
        tokens = self.times[1:]  # drop the prompt's put
        if generated < 2 or len(tokens) != generated:
            raise RuntimeStageError(f"the streamer saw {len(tokens)} tokens of {generated}: cannot time decode")
        return tokens[-1] - tokens[0]


def run_naive(p: dict[str, Any]) -> dict[str, Any]:
    """Benchmark one naive target (``cpu-fp32`` / ``cpu-bf16`` / ``cuda-bf16``). Entry point of the subprocess."""
    torch = require("torch", "bench")
    transformers = require("transformers", "bench")
    device, dtype_name = NAIVE_TARGETS[p["target"]]
    torch.set_num_threads(int(p["threads"]))
    dtype = getattr(torch, dtype_name)
    image = _load_rgb(p["image"])
    n_new = int(p["decode_tokens"])
    rss_start = rss_mb()
    gpu_used = gpu_memory_reader() if device == "cuda" else None  # the same count as the edge path's GPU rows
    gpu_start = gpu_used() if gpu_used else None

    t0 = time.perf_counter()
    try:
        from facellm_edge.export.checkpoint import load_processor

        processor = load_processor(p["checkpoint"])  # also checkpoints without a video token
        model = transformers.InternVLForConditionalGeneration.from_pretrained(p["checkpoint"], dtype=dtype)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the transformers checkpoint {p['checkpoint']} for the naive baseline: "
                              f"{str(exc).splitlines()[0]}; pass --checkpoint DIR|HUB_ID or --naive none") from exc
    model = model.to(device).eval()
    if device == "cuda":
        torch.cuda.synchronize()
    load_ms = (time.perf_counter() - t0) * 1000.0
    rss_loaded = rss_mb()

    def prompt(question: str) -> str:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    prompts = {"question": prompt(p["question"]), "followup": prompt(p["followup"])}
    cfg = model.config
    gen = dict(do_sample=False, num_beams=1, pad_token_id=processor.tokenizer.pad_token_id)
    n_prompt: dict[str, int] = {}

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def one(timer: StageTimer) -> None:
        with torch.inference_mode():
            t = time.perf_counter()
            inputs = processor(text=[prompts["question"]], images=[image], return_tensors="pt").to(device)
            pre_ms = (time.perf_counter() - t) * 1000.0
            timer.add("preprocess_ms", pre_ms)
            n_prompt["question"] = int(inputs["input_ids"].shape[1])
            with timer.time("encode_ms"):
                model.get_image_features(pixel_values=inputs["pixel_values"],
                                         vision_feature_layer=cfg.vision_feature_layer,
                                         vision_feature_select_strategy=cfg.vision_feature_select_strategy)
                sync()
            t = time.perf_counter()
            model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, **gen)
            sync()
            first_ms = (time.perf_counter() - t) * 1000.0
            timer.add("ttft_cold_ms", pre_ms + first_ms)
            clock = _TokenClock(sync)
            t = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, streamer=clock, **gen)
            sync()
            full_ms = (time.perf_counter() - t) * 1000.0
            got = int(out.shape[1] - inputs["input_ids"].shape[1])
            decode_s = clock.decode_s(got)
            timer.add("decode_ms", decode_s * 1000.0)
            timer.add("decode_tok_s", (got - 1) / decode_s)
            timer.add("end_to_end_ms", pre_ms + full_ms)
            # A second question about the same face: the naive path starts from the image again.
            t = time.perf_counter()
            follow = processor(text=[prompts["followup"]], images=[image], return_tensors="pt").to(device)
            model.generate(**follow, max_new_tokens=1, min_new_tokens=1, **gen)
            sync()
            timer.add("ttft_warm_ms", (time.perf_counter() - t) * 1000.0)

    with RssSampler(gpu=gpu_used) as sampler:
        timer = repeat(one, int(p["runs"]), int(p["warmup"]))
    memory: dict[str, Any] = {"rss_start_mb": round(rss_start, 1), "rss_loaded_mb": round(rss_loaded, 1),
                              "rss_sampled_peak_mb": round(sampler.peak_mb, 1), **gpu_peak(sampler, gpu_start)}
    if device == "cuda":
        memory["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {
        "name": f"naive {p['target']}",
        "kind": "naive",
        "target": p["target"],
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": dtype_name,
        "threads": int(p["threads"]),
        "load_ms": round(load_ms, 1),
        "prompt_tokens": n_prompt.get("question"),
        "decode_tokens": n_new,
        "stages": timer.summary(),
        "memory": memory,
        "code_path": "transformers AutoProcessor + InternVLForConditionalGeneration.generate",
        "notes": "transformers generate, greedy, min_new_tokens=max_new_tokens; image and question are prefilled "
                 "together inside generate; ttft_warm = a follow-up question (no prefix cache: the image is encoded "
                 "and prefilled again)",
    }
