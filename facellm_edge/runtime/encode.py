"""The vision encoder: the bundle's ONNX (vision tower + pixel shuffle + projector) in ONNX Runtime.

``pixel_values`` float32 [B, 3, S, S] -> ``image_embeds`` float32 [B, num_image_tokens, llm_hidden]; all faces
of a frame are handed over at once (one ORT call on GPUs, face by face on CPUs: see :meth:`VisionEncoder.encode`).
Execution providers: ``auto`` = TensorRT -> CUDA -> CPU (whatever this onnxruntime build has); asking for a GPU
provider that is not there is an error, never a silent CPU fallback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facellm_edge.bundle import Bundle
from facellm_edge.errors import BundleError, RuntimeStageError, UsageError
from facellm_edge.onnxrt import onnxruntime_module

log = logging.getLogger(__name__)

DEVICES: dict[str, tuple[str, ...]] = {
    "auto": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
GPU_FIX = ("pip uninstall -y onnxruntime && pip install 'facellm-edge[gpu]' (or [gpu-headless] on a headless "
           "install)")
SPIN_STOP = "session.force_spinning_stop"  # ORT session option: the thread pool stops spinning when Run returns
PREPACK = ("auto", "on", "off")  # EncoderConfig.prepack: ORT's weight pre-packing + CPU memory arena
# Flags (/proc/cpuinfo) of the int8 dot-product instructions ONNX Runtime's int8 GEMMs (MLAS) use: x86 VNNI
# (AVX-512 or AVX encoding) and AMX int8 tiles; ARM64 SDOT/UDOT (asimddp) and SMMLA/UMMLA (i8mm).
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


@dataclass(frozen=True)
class EncoderConfig:
    """How ONNX Runtime runs the vision encoder."""

    device: str = "auto"  # auto | cpu | cuda | tensorrt (see DEVICES)
    precision: str | None = None  # "int8" / "fp32"; None = the bundle's preferred
    n_threads: int | None = None  # ORT intra-op threads; None = ORT default
    prepack: str = "auto"  # auto | on (pre-packing + arena: faster, more memory) | off (lean); see auto_prepack

    def __post_init__(self) -> None:  # a bad value fails before any bundle is resolved or loaded
        if self.device not in DEVICES:
            raise UsageError(f"unknown device '{self.device}'; choose one of: {', '.join(DEVICES)}")
        if self.n_threads is not None and self.n_threads < 1:
            raise UsageError(f"vision threads {self.n_threads} must be >= 1 (or unset)")
        check_prepack(self.prepack)


def check_prepack(value: str) -> str:
    """``value`` if it is one of :data:`PREPACK`, else a one-line :class:`UsageError` (exit 2)."""
    if value not in PREPACK:
        raise UsageError(f"unknown vision prepack setting '{value}'; choose one of: {', '.join(PREPACK)}")
    return value


def select_providers(device: str, available: list[str]) -> list[str]:
    """The provider list for ``device`` given what this onnxruntime build offers."""
    if device not in DEVICES:
        raise UsageError(f"unknown device '{device}'; choose one of: {', '.join(DEVICES)}")
    if device == "auto":
        return [p for p in DEVICES["auto"] if p in available]
    wanted = DEVICES[device][0]
    if wanted not in available:
        raise RuntimeStageError(
            f"--device {device} needs onnxruntime's {wanted}, but this onnxruntime has only "
            f"{', '.join(available)}; install the GPU build: {GPU_FIX}"
        )
    return [p for p in DEVICES[device] if p in available]


def check_session_providers(device: str, used: list[str]) -> None:
    """ONNX Runtime lists a provider as available when its library ships, yet a session falls back to the next one
    (and only logs) when the provider cannot start (TensorRT without libnvinfer, CUDA without cuDNN). ``device``
    named a provider: the session must run on it, else a one-line :class:`RuntimeStageError`."""
    if device == "auto":
        return
    wanted = DEVICES[device][0]
    if not used or used[0] != wanted:
        raise RuntimeStageError(
            f"--device {device}: onnxruntime could not start its {wanted} (the session runs on "
            f"{', '.join(used) or 'nothing'}); check the GPU libraries it needs (onnxruntime's log above says "
            f"which), or choose another --device"
        )


def auto_prepack(flags: set[str] | frozenset[str], precision: str) -> tuple[bool, str]:
    """``prepack="auto"`` on a CPU-only session: (pre-packing + memory arena on?, why), from the CPU's flags.

    Measured on the FaceLLM-1B int8 graph. AVX2 box (no int8 dot products): on is only ~5 % faster (encode 3.82 vs
    4.00 s, median of 6 interleaved) for ~380 MB more resident memory (a second, packed copy of every int8 weight
    and an arena holding the largest call's activations): off. VNNI box, 2 threads, medians of 5: on 1,493-1,539 ms
    vs off 1,728-1,737 ms (13 % faster) for +24...150 MB peak RSS: on. So: on where the CPU has int8 dot-product
    instructions (:data:`INT8_DOT_FLAGS`), off otherwise; fp32 graphs were not measured and stay lean."""
    found = sorted(f for f in INT8_DOT_FLAGS if f in flags)
    if not found:
        return False, f"auto: no int8 dot-product instructions on this CPU (none of {', '.join(INT8_DOT_FLAGS)})"
    if precision != "int8":
        return False, f"auto: the {precision} graph was not measured with pre-packing; int8 graphs use it"
    return True, f"auto: the CPU has int8 dot products ({', '.join(found)}) and the graph is int8"


def resolve_prepack(setting: str, *, cpu_only: bool, precision: str) -> tuple[bool, str]:
    """(pre-packing + memory arena on?, why) for ``EncoderConfig.prepack`` on this machine. ``on`` / ``off`` are
    what was asked; ``auto`` keeps ORT's defaults where a GPU provider runs the graph, else :func:`auto_prepack`
    on this CPU's flags."""
    if check_prepack(setting) != "auto":
        return setting == "on", f"prepack={setting} asked for"
    if not cpu_only:
        return True, "auto: a GPU provider runs the graph (ONNX Runtime's defaults)"
    from facellm_edge.cpu import cpuinfo

    return auto_prepack(cpuinfo()[1], precision)


TRT_MAX_BATCH = 8  # faces per frame in one TensorRT engine profile


def provider_options(providers: list[str], onnx_path: Path,
                     image_size: int | None) -> list[str | tuple[str, dict[str, str]]]:
    """Attach options to GPU providers. TensorRT: an engine cache in the user cache (the first build of an engine
    takes minutes; later starts load it in seconds), fp16 kernels, and (tile size known) one optimisation profile
    for 1..8 faces."""
    out: list[str | tuple[str, dict[str, str]]] = []
    for name in providers:
        if name == "TensorrtExecutionProvider":
            from facellm_edge.io import user_cache_dir

            cache = user_cache_dir() / "tensorrt" / f"{onnx_path.parent.parent.name}-{onnx_path.stem}"
            cache.mkdir(parents=True, exist_ok=True)
            opts = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache), "trt_fp16_enable": "True"}
            if image_size:
                tile = f"3x{image_size}x{image_size}"
                one, most = f"pixel_values:1x{tile}", f"pixel_values:{TRT_MAX_BATCH}x{tile}"
                opts.update(trt_profile_min_shapes=one, trt_profile_opt_shapes=one, trt_profile_max_shapes=most)
            out.append((name, opts))
        else:
            out.append(name)
    return out


def gpu_first(device: str) -> bool:
    """Whether ``device`` puts a GPU provider first in this onnxruntime build (then fp32 beats int8)."""
    ort = onnxruntime_module()

    return select_providers(device, ort.get_available_providers())[0] != "CPUExecutionProvider"


class VisionEncoder:
    """One ONNX Runtime session of the bundle's vision file. ``providers``: what ORT runs it on; ``prepack``: whether
    ORT pre-packs the weights and keeps its CPU memory arena (``EncoderConfig.prepack`` resolved on this machine)."""

    def __init__(self, path: Path, *, precision: str, config: EncoderConfig, num_image_tokens: int,
                 width: int, image_size: int | None = None) -> None:
        ort = onnxruntime_module()

        self.path = Path(path)
        self.precision = precision
        self.config = config
        providers = provider_options(select_providers(config.device, ort.get_available_providers()), self.path,
                                     image_size)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if config.n_threads is not None:
            opts.intra_op_num_threads = int(config.n_threads)
            opts.inter_op_num_threads = 1
        # ORT's intra-op threads keep spinning for work after a Run returns, on the cores where llama.cpp prefills
        # the face's image next. Measured on the 2-core AVX-512 EPYC (FaceLLM-1B int8 + q4_0, one process, two
        # models alternated, 10 rounds): image prefill 784 vs 840 ms, encode 1,572 vs 1,566 ms, cold path 0.98x.
        # Spinning stops at the end of each Run; within a Run ORT spins as it always does.
        opts.add_session_config_entry(SPIN_STOP, "1")
        cpu_only = providers == ["CPUExecutionProvider"]
        # Off: no second, packed copy of every int8 weight (+255 MB resident for FaceLLM-1B's 316 MB graph) and no
        # arena keeping the largest call's ~150 MB of activations (benchmarks/README "memory"); on: ORT's defaults,
        # faster where the CPU has int8 dot products. Which one this machine gets: auto_prepack.
        self.prepack, why = resolve_prepack(config.prepack, cpu_only=cpu_only, precision=precision)
        if not self.prepack:
            opts.add_session_config_entry("session.disable_prepacking", "1")
            opts.enable_cpu_mem_arena = False
        log.info("vision encoder weight pre-packing + memory arena %s (%s)", "on" if self.prepack else "off", why)
        if cpu_only:
            from facellm_edge.runtime.memory import return_large_frees_to_os

            return_large_frees_to_os()
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise BundleError(f"cannot load vision encoder {self.path}: {str(exc).splitlines()[0]}") from exc
        self.providers = list(self._session.get_providers())
        check_session_providers(config.device, self.providers)
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        if "pixel_values" not in inputs or "image_embeds" not in outputs:
            raise BundleError(
                f"{self.path} must map 'pixel_values' -> 'image_embeds' (has inputs {list(inputs)}, "
                f"outputs {list(outputs)}); re-export the bundle"
            )
        side = [d for d in inputs["pixel_values"].shape[2:] if isinstance(d, int)]
        if image_size and side and set(side) != {image_size}:  # the manifest's tile size drives preprocessing
            raise BundleError(f"vision encoder {self.path.name} takes {side} px tiles but the manifest says "
                              f"image.size {image_size}; the bundle mixes two models: re-export it")
        out_shape = outputs["image_embeds"].shape
        onnx_width = out_shape[-1] if isinstance(out_shape[-1], int) else None
        self.num_image_tokens = num_image_tokens
        self.width = onnx_width if onnx_width is not None else width
        if onnx_width is not None and onnx_width != width:
            raise BundleError(
                f"vision encoder {self.path.name} outputs width {onnx_width} but the LLM's n_embd is {width}; "
                "the bundle mixes two models: re-export it"
            )
        log.info("vision encoder %s (%s) on %s", self.path.name, precision, ", ".join(self.providers))

    @classmethod
    def from_bundle(cls, bundle: Bundle, config: EncoderConfig = EncoderConfig(), *,
                    llm_width: int | None = None) -> "VisionEncoder":
        """Load the bundle's vision file; ``llm_width`` (the GGUF's n_embd) must equal the ONNX output width."""
        want = config.precision
        if want is None and "fp32" in bundle.manifest.vision and gpu_first(config.device):
            want = "fp32"  # int8 dynamic quantisation is a CPU (VNNI) optimisation; GPUs run fp32 (TensorRT: fp16)
        precision, path = bundle.vision_file(want)
        m = bundle.manifest
        width = llm_width if llm_width is not None else m.arch.llm_hidden
        if llm_width is not None and m.arch.llm_hidden != llm_width:
            raise BundleError(
                f"bundle manifest says llm_hidden {m.arch.llm_hidden} but the GGUF's n_embd is {llm_width}; "
                "re-export the bundle"
            )
        return cls(path, precision=precision, config=config, num_image_tokens=m.tokens.num_image_tokens, width=width,
                   image_size=m.image.size)

    def encode(self, pixel_values: np.ndarray, *, one_call: bool | None = None) -> np.ndarray:
        """[B, 3, S, S] float32 -> [B, num_image_tokens, width] float32.

        ``one_call=None`` (the default policy): on GPU providers the whole batch is one ORT call; on the CPU faces
        go one by one — measured at FaceLLM-1B size on 2 cores (benchmarks/results), 3.5 s per face one by one against
        4.5 s per face in one call of 6. ``one_call=True`` forces a single call (the benchmark's comparison)."""
        session = self._session  # one reference per call: close() on another thread lets this run finish
        if session is None:
            raise UsageError("the vision encoder is closed (its FaceLLM was closed); load the bundle again")
        x = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise RuntimeStageError(f"pixel_values must be [B, 3, H, W], got {list(x.shape)}")
        if one_call is None:
            one_call = self.providers[0] != "CPUExecutionProvider"
        if not one_call and x.shape[0] > 1:
            return np.concatenate([self.encode(x[i:i + 1]) for i in range(x.shape[0])], axis=0)
        try:
            (out,) = session.run(["image_embeds"], {"pixel_values": x})
        except Exception as exc:
            raise RuntimeStageError(f"vision encoder failed on {list(x.shape)}: {str(exc).splitlines()[0]}") from exc
        if out.shape[-1] != self.width or out.shape[1] != self.num_image_tokens:
            raise BundleError(
                f"vision encoder gave {list(out.shape)}, expected [B, {self.num_image_tokens}, {self.width}] "
                "(ONNX width vs GGUF n_embd or token count mismatch); re-export the bundle"
            )
        return out

    def close(self) -> None:
        """Free the ONNX Runtime session, its weights and arena (idempotent); :meth:`encode` then raises. A closed
        model a program still references would otherwise keep the whole graph resident."""
        self._session = None
