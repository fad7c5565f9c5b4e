"""Orchestration of ``facellm-edge bench``: prepare the model, run every configuration isolated, write results.

Order: machine info -> (``--synthetic``: build a random-weight checkpoint + export a bundle into a temporary
directory) -> naive baselines -> edge configurations (vision precision x GGUF quant, through ``FaceLLM``) -> the
llama.cpp peer -> roofline -> profiles and the live loop (``run_live``) on the fastest edge configuration -> ratios
and targets -> results.json / results.md / stages.png (atomically).
Each configuration runs ``--runs`` rounds, each in its own fresh subprocess (``stages.run_isolated``), round-robin
with the other configurations so that a drifting machine shifts them all alike (``stages.merge_rounds`` pools them). Temporary files (checkpoint,
bundle, the aligned face crop given to the naive path) live in a temporary directory removed at the end: nothing
but the results is written, and the results hold no pixels.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from facellm_edge.bench import report, roofline
from facellm_edge.bench.config import SYNTHETIC_QUANTS, SYNTHETIC_VISION, TINY, BenchConfig, resolve_naive
from facellm_edge.bench.edge import PEER, aligned_face_crop, config_name, edge_payload
from facellm_edge.bench.faces import faces_payload
from facellm_edge.bench.live import live_payload
from facellm_edge.bench.naive import naive_payload
from facellm_edge.bench.stages import merge_rounds, run_isolated
from facellm_edge.bench.system import machine_info, machine_slug, physical_cores, versions
from facellm_edge.errors import BundleError, FaceLLMEdgeError, InputError, RuntimeStageError, UsageError
from facellm_edge.io import check_replaceable, temporary_directory

log = logging.getLogger(__name__)

DEFAULT_TOKENIZER_REPO = "Qwen/Qwen2.5-0.5B"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


def default_out(root: Path, info: dict[str, Any]) -> Path:
    return root / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{machine_slug(info)}"


def default_image() -> Path:
    """insightface's t1.jpg (6 faces; ships with insightface, the [insightface] extra)."""
    try:
        import insightface
    except ImportError:
        raise InputError("the default benchmark photo is insightface's t1.jpg, which needs the [insightface] extra; "
                         "pass --image PHOTO (a photo with faces)") from None

    path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    if not path.is_file():
        raise InputError(f"insightface's sample photo {path} is missing; pass --image PHOTO")
    return path


def tokenizer_dir(given: Path | None) -> Path:
    if given is not None:
        missing = [f for f in TOKENIZER_FILES if not (Path(given) / f).is_file()]
        if missing:
            raise InputError(f"--tokenizer {given} is not a Qwen2 tokenizer directory (missing {', '.join(missing)})")
        return Path(given)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(DEFAULT_TOKENIZER_REPO, allow_patterns=list(TOKENIZER_FILES)))
    except Exception as exc:  # huggingface_hub raises many types (offline, HTTP, cache permissions)
        raise InputError(f"cannot fetch the {DEFAULT_TOKENIZER_REPO} tokenizer ({type(exc).__name__}); pass "
                         "--tokenizer DIR (a Qwen2 tokenizer folder)") from exc


def build_and_export(p: dict[str, Any]) -> dict[str, Any]:
    """Subprocess entry: build a random-weight checkpoint with ``p["name"]``'s dimensions and export it.

    Runs isolated so that the benchmark's parent process never holds torch or the model's weights.
    """
    from facellm_edge.export.exporter import ExportConfig, export_bundle
    from facellm_edge.export.synthetic import SyntheticSpec, build_checkpoint

    work = Path(p["work"])
    spec = SyntheticSpec() if p["name"] == TINY else SyntheticSpec.from_registry(p["name"])
    t0 = time.perf_counter()
    ckpt = build_checkpoint(work / "checkpoint", Path(p["tokenizer"]), spec)
    build_s = time.perf_counter() - t0
    res = export_bundle(ExportConfig(model=str(ckpt), out=work / "bundle", quants=tuple(p["quants"]),
                                     vision=tuple(p["vision"]), verify=bool(p["verify"]), force=True,
                                     threads=int(p["threads"])))
    steps = {"build checkpoint": round(build_s, 1), **{s.name: round(s.seconds, 1) for s in res.steps}}
    return {"checkpoint": str(ckpt), "bundle": str(res.out), "seconds": round(sum(steps.values()), 1),
            "steps": steps}


def synthetic_bundle(name: str, tok_dir: Path, work: Path, quants: tuple[str, ...], vision: tuple[str, ...],
                     threads: int, timeout_s: float, verify: bool) -> tuple[Path, Path, dict[str, Any]]:
    """(checkpoint, bundle, export timings) of a synthetic model, built and exported in a fresh process."""
    r = run_isolated("facellm_edge.bench.runner:build_and_export",
                     {"name": name, "tokenizer": str(tok_dir), "work": str(work), "quants": list(quants),
                      "vision": list(vision), "threads": threads, "verify": verify}, timeout_s=timeout_s, label=f"export {name}")
    info = {"seconds": r["seconds"], "steps": r["steps"], "peak_rss_mb": r["memory"]["peak_rss_mb"]}
    return Path(r["checkpoint"]), Path(r["bundle"]), info


def naive_checkpoint(cfg: BenchConfig, source: dict[str, Any]) -> str:
    if cfg.checkpoint is not None:
        return str(cfg.checkpoint)
    path = source.get("path")
    if path and Path(path).is_dir():
        return str(path)
    if source.get("model"):
        return str(source["model"])
    raise UsageError("the bundle does not record its checkpoint; pass --checkpoint DIR|HUB_ID or --naive none")


def fastest(edge: list[dict[str, Any]]) -> dict[str, Any]:
    """The edge configuration with the lowest median end-to-end time (the one profiles, live and faces run)."""
    return min(edge, key=lambda c: report.median(c, "end_to_end_ms") or float("inf"))


def _summary(c: dict[str, Any]) -> str:
    m = report.median
    return (f"  {c['name']}: TTFT cold {m(c, 'ttft_cold_ms'):.0f} ms, warm {m(c, 'ttft_warm_ms'):.0f} ms, decode "
            f"{m(c, 'decode_tok_s'):.1f} tok/s, peak RSS {c['memory']['peak_rss_mb']:.0f} MB ({c['wall_s']:.0f} s)")


def _pick(requested: tuple[str, ...] | None, available: dict[str, Any], what: str) -> tuple[str, ...]:
    if requested is None:
        return tuple(available)
    missing = [q for q in requested if q not in available]
    if missing:
        raise BundleError(f"the bundle has no {what} '{missing[0]}'; it has: {', '.join(available)}")
    return requested


def _cuda_available(requested: tuple[str, ...]) -> bool:
    """Whether torch sees a CUDA device; torch is imported only when a naive baseline is requested."""
    if all(n == "none" for n in requested):
        return False
    from facellm_edge.errors import require

    return bool(require("torch", "bench").cuda.is_available())


def check_devices(devices: tuple[str, ...]) -> None:
    """A GPU ``--device`` needs ONNX Runtime's provider for it and a llama.cpp that offloads to a GPU: checked
    before minutes of export, never a row measured on the CPU under a GPU's name."""
    gpu = [d for d in devices if d != "cpu"]
    if not gpu:
        return
    import llama_cpp

    from facellm_edge.onnxrt import onnxruntime_module
    from facellm_edge.runtime.encode import select_providers

    available = onnxruntime_module().get_available_providers()
    for d in gpu:
        select_providers(d, available)  # RuntimeStageError naming the GPU build to install
    from facellm_edge.llm.engine import require_gpu_offload

    require_gpu_offload(llama_cpp, f"--device {gpu[0]} (the LLM on the GPU)")


def _validate_early(cfg: BenchConfig) -> None:
    """Catch bad names and missing GPU builds before minutes of checkpoint building and export."""
    check_devices(cfg.devices)
    if cfg.synthetic is not None:
        from facellm_edge.export.exporter import VISION_TARGETS
        from facellm_edge.export.quantize import validate_quants
        from facellm_edge.export.synthetic import SyntheticSpec

        if cfg.synthetic != TINY:
            SyntheticSpec.from_registry(cfg.synthetic)  # UsageError naming the known models
        validate_quants(list(cfg.quants or SYNTHETIC_QUANTS))
        bad = [v for v in (cfg.vision or ()) if v not in VISION_TARGETS]
        if bad:
            raise UsageError(f"unknown vision precision '{bad[0]}'; choose from {', '.join(VISION_TARGETS)}")


def _document(head: dict[str, Any], configs: list[dict[str, Any]], failed: dict[str, str],
              profiles: list[dict[str, Any]], live: dict[str, Any] | None, faces: dict[str, Any] | None,
              roof: dict[str, Any] | None) -> dict[str, Any]:
    """results.json: ``head`` (settings, machine, versions, export) with what was measured."""
    best = fastest([c for c in configs if c["kind"] == "edge"])
    return {**head, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings": {**head["settings"], "best_edge": best["name"]},
            "configs": configs, "ratios": report.compute_ratios(configs), "profiles": profiles, "live": live,
            "faces": faces, "roofline": roof, "targets": report.evaluate_targets(configs, live),
            "failed": [{"name": label, "error": why} for label, why in failed.items()]}


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] = lambda _msg: None) -> Path:
    """Run the whole benchmark; returns the output directory."""
    from facellm_edge.bundle import load_bundle

    _validate_early(cfg)
    info, vers = machine_info(), versions()
    threads = cfg.threads or physical_cores()
    out = cfg.out if cfg.out is not None else default_out(Path("benchmarks/results"), info)
    check_replaceable(out, force=cfg.force, kind=report.BENCH)  # before any work, not after the whole run
    image = Path(cfg.image) if cfg.image is not None else default_image()
    if not image.is_file():
        raise InputError(f"image not found: {image}")
    if cfg.live.video is not None and not Path(cfg.live.video).is_file():
        raise InputError(f"video not found: {cfg.live.video}")
    flags = info["cpu_flags"]
    naive, skipped = resolve_naive(cfg.naive, cuda=_cuda_available(cfg.naive),
                                   native_bf16=bool(flags.get("avx512_bf16") or flags.get("amx_bf16")))
    for s in skipped:
        log.warning("naive %s skipped: %s", s["name"], s["reason"])

    with temporary_directory(prefix="facellm-bench-") as tmp:
        work = Path(tmp)
        export_info = None
        if cfg.synthetic is not None:
            progress(f"building a random-weight '{cfg.synthetic}' checkpoint and exporting it")
            ckpt, bundle_dir, export_info = synthetic_bundle(
                cfg.synthetic, tokenizer_dir(cfg.tokenizer), work, cfg.quants or SYNTHETIC_QUANTS,
                cfg.vision or SYNTHETIC_VISION, threads, cfg.config_timeout_s, cfg.verify)
            bundle = load_bundle(bundle_dir)
            dims = "test-size dimensions" if cfg.synthetic == TINY else "the real model's dimensions"
            model = f"synthetic {cfg.synthetic} (random weights, {dims})"
            ckpt_ref = str(ckpt)
        else:
            bundle = load_bundle(cfg.bundle)
            bundle_dir = bundle.root
            model = f"bundle {bundle.root.name} ({bundle.manifest.source.get('model')})"
            ckpt_ref = naive_checkpoint(cfg, bundle.manifest.source) if naive else ""
        quants = _pick(cfg.quants, bundle.manifest.llm, "GGUF quant")
        onnx_wanted = None if cfg.vision is None else tuple(v for v in cfg.vision if v != PEER) or None
        visions = _pick(onnx_wanted, bundle.manifest.vision, "vision precision")
        # The llama.cpp peer (libmtmd + the bundle's mmproj) runs when the bundle has one, unless --vision excludes it.
        peer = bundle.manifest.mmproj is not None and (cfg.vision is None or PEER in cfg.vision)
        if cfg.vision is not None and PEER in cfg.vision and bundle.manifest.mmproj is None:
            raise BundleError("the bundle has no mmproj; export it with --vision ...,mmproj or drop mmproj")
        common = dict(question=cfg.question, followup=cfg.followup, runs=cfg.runs, warmup=cfg.warmup,
                      decode_tokens=cfg.decode_tokens, threads=threads)
        head = {"schema": report.SCHEMA, "created": None,
                "settings": {"model": model, "random_weights": cfg.synthetic is not None, "runs": cfg.runs,
                             "warmup": cfg.warmup, "decode_tokens": cfg.decode_tokens, "threads": threads,
                             "question": cfg.question, "followup": cfg.followup, "image": image.name,
                             "quants": list(quants), "vision": list(visions) + ([PEER] if peer else []),
                             "naive": list(naive), "naive_skipped": skipped, "best_edge": None,
                             "vision_prepack": cfg.vision_prepack, "devices": list(cfg.devices)},
                "machine": info, "versions": vers, "export": export_info}

        # Every configuration runs --runs rounds, one fresh process per round, round-robin with the others
        # (naive, edge..., peer; naive, edge..., peer; ...): a machine whose speed drifts over the minutes of a run
        # (shared hosts, thermals) shifts every configuration alike, so the ratios compare like with like.
        one_round = {**common, "runs": 1}
        jobs: list[tuple[str, str, dict[str, Any]]] = []  # (label, subprocess entry, payload)
        if naive:
            crop_path = work / "face.png"  # the aligned face both paths see; deleted with the temporary dir
            import cv2

            cv2.imwrite(str(crop_path), aligned_face_crop(image, cfg.detector_model, bundle.manifest.image.size))
            jobs += [(f"naive {t}", "facellm_edge.bench.naive:run_naive", naive_payload(ckpt_ref, t, crop_path,
                                                                                        **one_round)) for t in naive]

        def edge_job(vision: str, quant: str, device: str) -> tuple[str, str, dict[str, Any]]:
            kind = "peer" if vision == PEER else "edge"
            label = config_name(kind, vision, quant, device)
            return label, "facellm_edge.bench.edge:run_edge", edge_payload(
                bundle_dir, vision, quant, image, **one_round, detector_model=cfg.detector_model,
                vision_prepack=cfg.vision_prepack, device=device)

        jobs += [edge_job(v, q, d) for d in cfg.devices for v in visions for q in quants]
        rounds: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in jobs}
        failed: dict[str, str] = {}  # label -> why: a configuration that crashed, timed out or raised in its process

        def run_job(job: tuple[str, str, dict[str, Any]], r: int) -> None:
            label, target, payload = job
            if label in failed:  # not again in later rounds
                return
            progress(f"{label} (round {r + 1} of {cfg.runs})")
            started = round(time.time(), 3)
            try:
                result = run_isolated(target, payload, timeout_s=cfg.config_timeout_s, label=label)
            except FaceLLMEdgeError as exc:  # that configuration's own failure: the others are measured all the same
                failed[label] = str(exc)
                log.error("%s; the other configurations go on", exc)
                return
            rounds[label].append({**result, "started": started})

        roof, live, faces = None, None, None  # measured after the rounds, each once
        profiles: list[dict[str, Any]] = []
        try:
            for r in range(cfg.runs):
                for job in list(jobs):
                    run_job(job, r)
                if r == 0 and peer:  # the same LLM quant as the fastest edge configuration: only the code differs
                    # one peer on the CPU, one on the GPU (llama.cpp has no TensorRT: its GPU path is CUDA for both)
                    for where in dict.fromkeys("cpu" if d == "cpu" else "cuda" for d in cfg.devices):
                        same = [parts[0] for label, parts in rounds.items() if parts and label not in failed
                                and parts[0]["kind"] == "edge" and (parts[0]["device"] == "cpu") == (where == "cpu")]
                        jobs.append(edge_job(PEER, fastest(same)["quant"] if same else quants[0], where))
                        rounds[jobs[-1][0]] = []
                        run_job(jobs[-1], r)
            configs = [merge_rounds(rounds[label]) for label, _, _ in jobs if label not in failed]
            for c in configs:
                progress(_summary(c))
            edge = [c for c in configs if c["kind"] == "edge"]
            if not edge:  # nothing of the edge path to report on
                raise RuntimeStageError(next(iter(failed.values())))
            if cfg.roofline:
                progress("roofline: this machine's ceilings and the model's work")
                roof = run_isolated("facellm_edge.bench.roofline:run_roofline",
                                    {"bundle": str(bundle_dir), "threads": threads, "vision": list(visions),
                                     "quants": list(quants), "image_tokens": edge[0]["image_prefix_tokens"],
                                     "question_tokens": edge[0]["question_tokens"]},
                                    timeout_s=cfg.config_timeout_s, label="roofline")
                roofline.attach_bounds(roof, configs)
            best = fastest(edge)
            on_cpu = [c for c in edge if c["device"] == "cpu"]
            if cfg.profiles and not on_cpu:
                log.warning("profiles skipped: they compare CPU threads and ONNX Runtime CPU settings, and no "
                            "configuration ran on the CPU (add cpu to --device)")
            elif cfg.profiles:
                cpu_best = fastest(on_cpu)
                progress(f"profiles on {cpu_best['name']}")
                payload = {**edge_payload(bundle_dir, cpu_best["vision"], cpu_best["quant"], image, **common,
                                          detector_model=cfg.detector_model, vision_prepack=cfg.vision_prepack),
                           "max_threads": max(threads, physical_cores())}
                profiles = run_isolated("facellm_edge.bench.profiles:run_profiles", payload,
                                        timeout_s=cfg.config_timeout_s, label="profiles")["profiles"]
            if cfg.live.enabled:
                progress(f"live loop with {best['name']}")
                live = run_isolated("facellm_edge.bench.live:bench_live",
                                    live_payload(bundle_dir, best["vision"], best["quant"], image, cfg.live.video,
                                                 cfg.live.frames, cfg.live.width, cfg.live.height,
                                                 cfg.live.llama_threads, cfg.decode_tokens, cfg.question,
                                                 cfg.detector_model, threads, runs=cfg.runs, device=best["device"]),
                                    timeout_s=cfg.config_timeout_s, label="live")
                live["config"] = best["name"]

            if cfg.faces:
                progress(f"many faces at once with {best['name']}: one after another vs together")
                faces = run_isolated("facellm_edge.bench.faces:run_faces",
                                     faces_payload(bundle_dir, best["vision"], best["quant"], image, cfg.question,
                                                   cfg.runs, cfg.warmup, cfg.decode_tokens, threads,
                                                   cfg.detector_model, cfg.vision_prepack, device=best["device"]),
                                     timeout_s=cfg.config_timeout_s, label="faces")
                faces["config"] = best["name"]
        except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM: what was measured so far is results too
            done = [merge_rounds(rounds[label]) for label, _, _ in jobs if rounds[label] and label not in failed]
            if any(c["kind"] == "edge" for c in done):
                if roof is not None:
                    roofline.attach_bounds(roof, done)
                doc = _document(head, done, failed, profiles, live, faces, roof)
                doc["partial"] = {"rounds": {c["name"]: c["rounds"] for c in done}, "of": cfg.runs,
                                  "stopped": "interrupted (Ctrl-C or SIGTERM)"}
                report.write_results(doc, out, force=cfg.force)
                log.warning("stopped: what was measured so far is written to %s (partial)", out)
            raise exc

    results = _document(head, configs, failed, profiles, live, faces, roof)
    progress(f"writing {out}")
    report.write_results(results, out, force=cfg.force)
    if failed:  # the results of the others are kept; the run still did not do all it was asked
        raise RuntimeStageError(f"{len(failed)} of {len(jobs)} configurations failed ({'; '.join(failed.values())}); "
                                f"the others' results are written to {out}")
    return out
