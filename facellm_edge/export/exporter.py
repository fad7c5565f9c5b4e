"""Export orchestration: checkpoint -> verified bundle, written atomically.

Steps (each timed and sized, reported through ``on_step``):
  load checkpoint (+ merge LoRA) -> vision ONNX fp32 (+ int8) (+ llama.cpp mmproj GGUF) -> LLM GGUF (f32 master)
  -> llama.cpp quantisation -> verification (ONNX vs torch, mmproj through libmtmd vs torch, GGUF vs transformers
  logits with injected image embeddings, tokenizer parity) -> manifest.json.
Everything is written into a hidden temporary directory that is renamed to ``out`` only at the very end.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from facellm_edge import __version__
from facellm_edge.bundle import BUNDLE, MANIFEST, SCHEMA_VERSION, Manifest, file_entry
from facellm_edge.io import atomic_directory, atomic_write_text, check_replaceable, clean_stale_temps, output_path
from facellm_edge.errors import ExportError, FaceLLMEdgeError, OutputError, UsageError, require
from facellm_edge.llm.system_prompt import DEFAULT as DEFAULT_SYSTEM, resolve_system

log = logging.getLogger(__name__)

# Vision export targets: precision -> how it is produced.
VISION_TARGETS: dict[str, str] = {
    "fp32": "torch.onnx export of vision tower + pixel shuffle + projector",
    "int8": "ONNX Runtime dynamic quantisation of the fp32 graph (QInt8 weights, MatMul)",
    "mmproj": "llama.cpp clip/mtmd InternVL projector GGUF (f16), for llama.cpp/ollama peers",
}
# Targets that are ONNX graphs (manifest.vision, read by the ONNX runtime); "mmproj" goes to manifest.mmproj.
ONNX_VISION = ("fp32", "int8")
# Verification gates: a mismatch beyond these is a bug in the export, so it fails the export.
FP32_ONNX_MAX_ABS = 1e-3
# GGUF f32 vs transformers: max |logit difference| relative to the largest logit. Measured: f32 2e-4 (tiny);
# f16 4.5-4.7e-3 at FaceLLM-1B dimensions (bench quality column; the f32 file shares llama.cpp's f16 KV cache).
# A wrong tensor, RoPE or norm gives O(0.1..1).
# Top-1 agreement is reported but not gated: on random weights the logits are nearly flat, and f16 rounding alone
# flipped 1.1 % of the argmaxes at 1B size.
F32_GGUF_MAX_REL = 0.05
# mmproj (f16 matrices, ggml's GELU) vs torch, per image token. Measured on the tiny test models: worst token cosine
# 0.9999998 (f16 and f32); a position table left in InternViT's CLS-first order gives 0.15 (tests/test_mmproj.py).
# 0.999 leaves room for f16 rounding at FaceLLM sizes (see the 1B measurement in export/README.md) and still catches
# layout errors.
MMPROJ_MIN_TOKEN_COSINE = 0.999


@dataclass(frozen=True)
class ExportConfig:
    model: str  # local checkpoint dir or hub id
    out: Path
    quants: tuple[str, ...] = ("q4_k_m",)
    vision: tuple[str, ...] = ("fp32", "int8")
    adapter: Path | None = None
    revision: str | None = None
    verify: bool = True
    force: bool = False
    threads: int | None = None
    system: str = DEFAULT_SYSTEM  # the bundle's default system message: none | intern_vl | the text (prompt.system)


@dataclass(frozen=True)
class StepEvent:
    name: str
    seconds: float
    bytes: int = 0
    detail: str = ""


@dataclass
class ExportResult:
    out: Path
    manifest: Manifest
    steps: list[StepEvent] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)


def parse_list(value: str | tuple[str, ...] | list[str], what: str) -> tuple[str, ...]:
    items = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if not items:
        raise UsageError(f"no {what} given")
    return tuple(dict.fromkeys(items))


def validate(cfg: ExportConfig) -> ExportConfig:
    """Check every argument before any work starts."""
    from facellm_edge.export.quantize import validate_quants

    quants = validate_quants(",".join(cfg.quants))
    vision = parse_list(cfg.vision, "vision precision")
    unknown = [v for v in vision if v not in VISION_TARGETS]
    if unknown:
        raise UsageError(f"unknown vision precision '{unknown[0]}'; choose from {', '.join(VISION_TARGETS)}")
    resolve_system(cfg.system)
    out = output_path(cfg.out)  # out/NEW/.. is out: checked as it will be written
    check_replaceable(out, force=cfg.force, kind=BUNDLE)  # --force replaces only a bundle whose manifest parses
    if cfg.adapter is not None and not Path(cfg.adapter).is_dir():
        raise UsageError(f"adapter directory not found: {cfg.adapter}")
    return ExportConfig(**{**asdict(cfg), "quants": tuple(quants), "vision": vision, "out": out})


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"facellm-edge": __version__}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "gguf", "llama-cpp-python", "peft"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


class _Steps:
    def __init__(self, on_step: Callable[[StepEvent], None] | None) -> None:
        self.events: list[StepEvent] = []
        self._on_step = on_step

    def run(self, name: str, fn: Callable[[], Any], size_of: Callable[[Any], int] | None = None,
            detail: Callable[[Any], str] | None = None) -> Any:
        t0 = time.perf_counter()
        try:
            result = fn()
        except (FaceLLMEdgeError, OSError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a library failed (torch.onnx, gguf, tokenizers, ...): name the step
            raise ExportError(f"{name} failed: {type(exc).__name__}: {exc}") from exc
        ev = StepEvent(name, time.perf_counter() - t0, size_of(result) if size_of else 0,
                       detail(result) if detail else "")
        self.events.append(ev)
        log.info("%s: %.1f s %s", name, ev.seconds, ev.detail)
        if self._on_step:
            self._on_step(ev)
        return result


def export_bundle(cfg: ExportConfig, on_step: Callable[[StepEvent], None] | None = None) -> ExportResult:
    require("torch", "export")
    cfg = validate(cfg)
    clean_stale_temps(cfg.out)  # temp dirs of exports killed before they could clean up (kill -9, power cut)
    require("transformers", "export").logging.disable_progress_bar()  # our own step lines report progress
    from facellm_edge.export import checkpoint as ckpt

    ckpt_dir, source = ckpt.resolve_checkpoint(cfg.model, cfg.revision)
    ckpt.inspect_config(ckpt_dir)
    steps = _Steps(on_step)
    loaded = steps.run("load checkpoint", lambda: ckpt.load_model(ckpt_dir, cfg.adapter),
                       detail=lambda _: f"{ckpt_dir}" + (f" + adapter {cfg.adapter}" if cfg.adapter else ""))
    if cfg.adapter is not None:
        source = {**source, "adapter": str(Path(cfg.adapter).resolve())}
    try:
        with atomic_directory(cfg.out, force=cfg.force, kind=BUNDLE) as tmp:
            manifest = _export_into(tmp, cfg, loaded, source, ckpt_dir, steps)
            atomic_write_text(tmp / MANIFEST, manifest.to_json())
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OutputError(f"disk full (or file size limit reached) while exporting to {cfg.out}; "
                              "nothing was written — free space and retry") from exc
        raise OutputError(f"cannot write the bundle to {cfg.out}: {exc.strerror or exc}") from exc
    return ExportResult(out=cfg.out, manifest=manifest, steps=steps.events)


def _export_into(tmp: Path, cfg: ExportConfig, loaded: Any, source: dict[str, Any], ckpt_dir: Path,
                 steps: _Steps) -> Manifest:
    from facellm_edge.export import gguf_llm, onnx_vision, prompt, quantize

    image = prompt.image_spec(loaded.processor)
    tokens = prompt.token_spec(loaded.processor, loaded.config, ckpt_dir)
    arch = prompt.arch_spec(loaded.config)
    prompt_spec = prompt.prompt_spec(loaded.processor, system=resolve_system(cfg.system))

    # -- vision ---------------------------------------------------------------------------------------------
    (tmp / "vision").mkdir()
    vision_paths: dict[str, Path] = {}
    fp32 = tmp / "vision" / "fp32.onnx"
    def onnx_bytes(p: Path) -> int:  # the graph plus its external weight files (large vision towers)
        return sum(f.stat().st_size for f in onnx_vision.onnx_files(p))

    # The fp32 graph is the source of int8 and the verification reference: made unless neither is needed.
    need_fp32 = cfg.verify or any(v in cfg.vision for v in ONNX_VISION)
    if need_fp32:
        steps.run("vision -> ONNX fp32", lambda: onnx_vision.export_vision_onnx(
            loaded.model, fp32, image_size=image.size, mean=image.mean, std=image.std,
            source_model=source.get("model")), size_of=onnx_bytes)
        vision_paths["fp32"] = fp32
    if "int8" in cfg.vision:
        int8 = tmp / "vision" / "int8.onnx"
        steps.run("vision -> ONNX int8", lambda: onnx_vision.quantize_vision_int8(fp32, int8), size_of=onnx_bytes)
        vision_paths["int8"] = int8
    mmproj_path: Path | None = None
    mmproj_report: dict[str, Any] = {}
    if "mmproj" in cfg.vision:
        from facellm_edge.export import mmproj

        mmproj_path = tmp / "vision" / mmproj.MMPROJ_FILE
        mmproj_report = steps.run("vision -> mmproj GGUF f16", lambda: mmproj.write_mmproj_gguf(
            loaded.model, loaded.processor, mmproj_path, ftype="f16"),
                                  size_of=lambda _: mmproj_path.stat().st_size,
                                  detail=lambda r: f"{r['tensors']} tensors ({r['n_f16']} f16)")

    # -- LLM ------------------------------------------------------------------------------------------------
    (tmp / "llm").mkdir()
    master = tmp / "llm" / "f32.gguf"
    steps.run("LLM -> GGUF f32", lambda: gguf_llm.write_llm_gguf(loaded.model, loaded.tokenizer, master, ftype="f32"),
              size_of=lambda _: master.stat().st_size)
    llm_paths: dict[str, Path] = {}
    quant_reports: dict[str, Any] = {}
    for q in cfg.quants:
        if q == "f32":
            llm_paths[q] = master
            continue
        dst = tmp / "llm" / f"{q}.gguf"
        rep = steps.run(f"quantise {q}", lambda q=q, dst=dst: quantize.quantize_gguf(master, dst, q, cfg.threads or os.cpu_count() or 1),
                        size_of=lambda _, dst=dst: dst.stat().st_size, detail=lambda r: _quant_detail(r))
        llm_paths[q] = dst
        quant_reports[q] = rep

    # -- verification ---------------------------------------------------------------------------------------
    verification: dict[str, Any] = {}
    if cfg.verify:
        verification = steps.run("verify", lambda: _verify(loaded, vision_paths, llm_paths, master,
                                                           tokens.num_image_tokens, cfg.threads, mmproj_path),
                                 detail=lambda v: "ok")
    # Intermediate files the user did not ask for are not part of the bundle.
    if "fp32" not in cfg.vision and "fp32" in vision_paths:
        for f in onnx_vision.onnx_files(fp32):
            f.unlink()
        del vision_paths["fp32"]
    if "f32" not in cfg.quants:
        master.unlink()

    return Manifest(
        schema_version=SCHEMA_VERSION,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source=source,
        arch=arch,
        image=image,
        tokens=tokens,
        prompt=prompt_spec,
        vision={k: _onnx_entry(tmp, p, onnx_vision.onnx_files(p)[1:]) for k, p in vision_paths.items()},
        llm={k: file_entry(tmp, p, **_quant_extra(quant_reports.get(k))) for k, p in llm_paths.items()},
        tools=_tool_versions(),
        verification=verification,
        mmproj=(file_entry(tmp, mmproj_path, projector="internvl", ftype=mmproj_report["ftype"],
                           preproc_tiles=mmproj_report["preproc_tiles"]) if mmproj_path is not None else None),
    )


def _onnx_entry(root: Path, graph: Path, external: list[Path]):
    # Graphs over 2 GB keep their weights in external data files: those are hashed and listed too.
    return file_entry(root, graph, external_data=[asdict(file_entry(root, f)) for f in external])


def _quant_extra(report: Any) -> dict[str, Any]:
    if report is None:
        return {}
    d = asdict(report) if hasattr(report, "__dataclass_fields__") else dict(report)
    return {k: v for k, v in d.items() if k in ("bits_per_weight", "bits_per_weight_2d", "type_histogram", "fallbacks")}


def _quant_detail(report: Any) -> str:
    extra = _quant_extra(report)
    bpw = extra.get("bits_per_weight")
    fb = extra.get("fallbacks") or {}
    parts = [f"{bpw:.2f} bits/w" if isinstance(bpw, (int, float)) else ""]
    if fb:
        parts.append(f"{len(fb)} tensors fell back")
    return ", ".join(p for p in parts if p)


def check_f32_logits(report: dict[str, Any]) -> None:
    """The export gate on the f32 GGUF: raises when its logits are not transformers' (a conversion bug)."""
    if report["max_rel_diff"] > F32_GGUF_MAX_REL:
        raise ExportError(f"GGUF f32 logits differ from transformers by {report['max_rel_diff']:.3g} of the largest "
                          f"logit (> {F32_GGUF_MAX_REL}; top-1 agreement {report['top1_agreement']:.1%}); "
                          "this is an export bug — please report it")


def _verify(loaded: Any, vision_paths: dict[str, Path], llm_paths: dict[str, Path], master: Path,
            num_image_tokens: int, threads: int | None, mmproj_path: Path | None = None) -> dict[str, Any]:
    from facellm_edge.export import onnx_vision, verify_llm

    def portable(report: dict[str, Any]) -> dict[str, Any]:
        # Reports name the files they checked; inside the manifest the precision key says which one.
        return {k: v for k, v in report.items() if k != "gguf"}

    # The probe is the real prompt shape: one tile's worth of injected image embeddings plus a question.
    probe = verify_llm.LogitProbe(n_image_tokens=num_image_tokens, n_threads=threads or os.cpu_count() or 1)
    out: dict[str, Any] = {"vision": {}, "llm": {}}
    for precision, path in vision_paths.items():
        out["vision"][precision] = onnx_vision.verify_vision(loaded.model, path)
    worst = out["vision"]["fp32"]["max_abs_diff"]
    if worst > FP32_ONNX_MAX_ABS:
        raise ExportError(f"ONNX fp32 vision output differs from torch by {worst:.3g} (> {FP32_ONNX_MAX_ABS}); "
                          "this is an export bug — please report it")
    if mmproj_path is not None:
        from facellm_edge.export import mmproj

        # libmtmd needs the LLM for its width check and <img> markers: the f32 master is always there now.
        out["mmproj"] = mmproj.verify_mmproj(loaded.model, loaded.processor, mmproj_path, master,
                                             n_threads=threads or os.cpu_count() or 1)
        worst_tok = out["mmproj"]["token_cosine_min"]
        if worst_tok < MMPROJ_MIN_TOKEN_COSINE:
            raise ExportError(f"mmproj (llama.cpp) image embeddings differ from torch: worst token cosine "
                              f"{worst_tok:.6f} (< {MMPROJ_MIN_TOKEN_COSINE}); "
                              "this is an export bug — please report it")
    for quant, path in {"f32": master, **llm_paths}.items():
        out["llm"][quant] = portable(verify_llm.compare_logits(loaded.model, loaded.tokenizer, path, probe))
    check_f32_logits(out["llm"]["f32"])
    out["tokenizer"] = portable(verify_llm.tokenizer_parity(loaded.tokenizer, master))
    if out["tokenizer"]["percent"] < 100.0:
        raise ExportError(f"llama.cpp tokenizes differently from the checkpoint's tokenizer: "
                          f"{out['tokenizer']['first_mismatch']}")
    return out
