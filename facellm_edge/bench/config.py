"""Benchmark configuration: one frozen dataclass, one source of defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from facellm_edge.errors import UsageError

# Naive (transformers) baselines: name -> (device, torch dtype name).
NAIVE_TARGETS: dict[str, tuple[str, str]] = {
    "cpu-fp32": ("cpu", "float32"),
    "cpu-bf16": ("cpu", "bfloat16"),
    "cuda-bf16": ("cuda", "bfloat16"),
}
AUTO = "auto"  # cpu-fp32, cpu-bf16, and cuda-bf16 when a CUDA device is visible

# Where the edge path and the llama.cpp peer run (bench --device): cpu = ONNX Runtime's CPU provider + llama.cpp on
# the CPU; cuda / tensorrt = that ONNX Runtime provider (TensorRT: fp16 kernels, engine cache) + every LLM layer on
# the GPU (the peer: libmtmd and every layer on the GPU; llama.cpp has no TensorRT, so one GPU peer for both).
EDGE_DEVICES = ("cpu", "cuda", "tensorrt")
GPU_LAYERS = 999  # llama.cpp n_gpu_layers: every layer

SYNTHETIC_QUANTS = ("f16", "q8_0", "q4_0", "q4_0_pure", "q4_k_m")
SYNTHETIC_VISION = ("fp32", "int8", "mmproj")  # mmproj: the llama.cpp peer's vision encoder
TINY = "tiny"  # --synthetic tiny: facellm_edge.export.synthetic.SyntheticSpec() defaults (test size, not in the registry)

DEFAULT_QUESTION = "Describe this person's face: apparent age, expression and accessories."
DEFAULT_FOLLOWUP = "Is the person smiling?"

# Targets of the edge runtime, shown as met / missed in the Markdown report: key -> (op, threshold, label). The
# keys are the results' own names (stages of the edge configurations, facellm_edge.timings; live-loop runs).
TARGETS = {
    "ttft_cold_ms": ("<=", 1000.0, "cold TTFT (new face)"),
    "ttft_warm_ms": ("<=", 150.0, "warm TTFT (follow-up, image prefix cached)"),
    "decode_tok_s": (">=", 80.0, "decode rate"),
    "peak_rss_mb": ("<=", 1024.0, "runtime peak RSS"),
    "live_fps_busy": (">=", 25.0, "frame loop FPS at 640x480 while the VLM is busy"),
    "live_p99_busy_ms": ("<", 80.0, "frame loop p99 latency while the VLM is busy"),
}


@dataclass(frozen=True)
class LiveBenchConfig:
    """The live-loop benchmark (the runtime's ``run_live``, headless): clips made from the benchmark photo, or the
    frames of a video file. Not :class:`facellm_edge.runtime.live.loop.LiveConfig`, the loop's own settings."""

    enabled: bool = True
    video: Path | None = None
    frames: int = 120  # measured frames per run
    width: int = 640  # synthetic clips' frame size
    height: int = 480
    llama_threads: tuple[int, ...] = (1, 2)  # llama.cpp thread policies, each with the VLM worker busy

    def __post_init__(self) -> None:
        if self.frames < 10:
            raise UsageError(f"--live-frames must be >= 10, got {self.frames}")
        if self.width < 160 or self.height < 120:
            raise UsageError(f"live clip size {self.width}x{self.height} is too small (at least 160x120)")
        if not self.llama_threads or any(k < 1 for k in self.llama_threads):
            raise UsageError(f"live llama.cpp threads must be >= 1, got {self.llama_threads}")



@dataclass(frozen=True)
class BenchConfig:
    out: Path | None = None  # None: benchmarks/results/<timestamp>-<machine>
    bundle: Path | None = None  # benchmark an existing bundle ...
    synthetic: str | None = None  # ... or build + export a random-weight model with a registry name's dims
    tokenizer: Path | None = None  # Qwen2 tokenizer dir for --synthetic (None: the hub's Qwen/Qwen2.5-0.5B)
    checkpoint: Path | None = None  # transformers checkpoint for the naive baselines (--bundle mode)
    quants: tuple[str, ...] | None = None  # GGUF quants; None: the bundle's all / SYNTHETIC_QUANTS
    vision: tuple[str, ...] | None = None  # ONNX vision precisions; None: the bundle's all / ("fp32", "int8")
    naive: tuple[str, ...] = (AUTO,)
    image: Path | None = None  # photo; None: insightface's t1.jpg (6 faces)
    question: str = DEFAULT_QUESTION
    followup: str = DEFAULT_FOLLOWUP
    runs: int = 3
    warmup: int = 1
    decode_tokens: int = 32
    threads: int | None = None  # llama.cpp / ORT / torch threads; None: physical cores
    vision_prepack: str = "auto"  # ONNX vision encoder's weight pre-packing + arena: auto | on | off (EncoderConfig)
    devices: tuple[str, ...] = ("cpu",)  # where the edge path and the peer run: EDGE_DEVICES
    detector_model: Path | None = None  # YuNet .onnx; None: the detector's cached default
    profiles: bool = True
    faces: bool = True  # the photo's faces answered one after another vs together (facellm_edge.bench.faces)
    roofline: bool = True  # measure this machine's ceilings and bound every edge configuration by them
    verify: bool = True  # --synthetic: verify the export, so every quant's logit agreement is reported as quality
    live: LiveBenchConfig = field(default_factory=LiveBenchConfig)
    config_timeout_s: float = 1800.0  # one isolated configuration
    force: bool = False  # replace an existing --out

    def __post_init__(self) -> None:
        if (self.bundle is None) == (self.synthetic is None):
            raise UsageError("pass exactly one of --bundle DIR or --synthetic NAME")
        if self.runs < 1:
            raise UsageError(f"--runs must be >= 1, got {self.runs}")
        if self.warmup < 0:
            raise UsageError(f"--warmup must be >= 0, got {self.warmup}")
        if self.decode_tokens < 2:
            raise UsageError(f"--decode-tokens must be >= 2 (the decode rate needs tokens after the first), "
                             f"got {self.decode_tokens}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {self.threads}")
        from facellm_edge.runtime.encode import check_prepack

        check_prepack(self.vision_prepack)
        bad = [d for d in self.devices if d not in EDGE_DEVICES]
        if bad or not self.devices:
            raise UsageError(f"unknown --device '{bad[0] if bad else ''}'; choose from {', '.join(EDGE_DEVICES)}")
        for n in self.naive:
            if n not in NAIVE_TARGETS and n not in (AUTO, "none"):
                raise UsageError(f"unknown naive baseline '{n}'; choose from {AUTO}, none, {', '.join(NAIVE_TARGETS)}")


def parse_csv(value: str, what: str) -> tuple[str, ...]:
    items = [v.strip().lower() for v in value.split(",") if v.strip()]
    if not items:
        raise UsageError(f"no {what} given")
    return tuple(dict.fromkeys(items))


def resolve_naive(requested: tuple[str, ...], *, cuda: bool, native_bf16: bool
                  ) -> tuple[tuple[str, ...], list[dict[str, str]]]:
    """Expand ``auto`` into (targets, skipped-with-reason).

    ``auto`` = cpu-fp32, cpu-bf16 when the CPU has native bf16 matmuls (AVX512-BF16 / AMX; without them torch
    emulates bf16 and it is several times slower than fp32), cuda-bf16 when torch sees a CUDA device. What ``auto``
    leaves out is recorded in the results. An explicit ``cuda-*`` without a CUDA device is a usage error.
    """
    out: list[str] = []
    skipped: list[dict[str, str]] = []
    for name in requested:
        if name == "none":
            continue
        if name == AUTO:
            out.append("cpu-fp32")
            if native_bf16:
                out.append("cpu-bf16")
            else:
                skipped.append({"name": "cpu-bf16", "reason": "no native bf16 on this CPU (no avx512_bf16/amx_bf16); "
                                "pass --naive cpu-fp32,cpu-bf16 to measure it anyway"})
            if cuda:
                out.append("cuda-bf16")
            else:
                skipped.append({"name": "cuda-bf16", "reason": "torch sees no CUDA device"})
            continue
        if NAIVE_TARGETS[name][0] == "cuda" and not cuda:
            raise UsageError(f"naive baseline '{name}' needs a CUDA device and torch sees none; drop it from --naive")
        out.append(name)
    targets = tuple(dict.fromkeys(out))
    return targets, [s for s in skipped if s["name"] not in targets]
