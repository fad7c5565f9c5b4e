"""`facellm-edge bench`: per-stage latency and memory of the edge path beside the naive transformers path."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facellm_edge.bench.config import (
    AUTO, NAIVE_TARGETS, SYNTHETIC_QUANTS, SYNTHETIC_VISION, BenchConfig, LiveBenchConfig, parse_csv,
)
from facellm_edge.commands.defaults import field_default


def _default(name: str) -> object:
    return field_default(BenchConfig, name)


_LIVE = LiveBenchConfig()


def bench_cmd(
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", help="Benchmark this bundle."),
    synthetic: Optional[str] = typer.Option(
        None, "--synthetic", help="Build a random-weight model with a registry model's dimensions (facellm-1b, "
        "facellm-8b, facellm-38b; 'tiny' = test size), export it, benchmark it. No download but the tokenizer."),
    tokenizer: Optional[Path] = typer.Option(
        None, "--tokenizer", help="Qwen2 tokenizer directory for --synthetic (default: the hub's Qwen/Qwen2.5-0.5B)."),
    checkpoint: Optional[str] = typer.Option(
        None, "--checkpoint", help="transformers checkpoint (dir or hub id) for the naive baselines with --bundle "
        "(default: the one the bundle was exported from)."),
    quant: Optional[str] = typer.Option(
        None, "--quant", "-q", help="GGUF quants, comma-separated (default: all in the bundle; --synthetic: "
        f"{','.join(SYNTHETIC_QUANTS)})."),
    vision: Optional[str] = typer.Option(
        None, "--vision", help="Vision encoders: ONNX fp32,int8 and mmproj (the llama.cpp libmtmd peer) (default: "
        f"all the bundle has; --synthetic: {','.join(SYNTHETIC_VISION)})."),
    naive: str = typer.Option(
        ",".join(_default("naive")), "--naive", help=f"Naive baselines: {AUTO}, none, or {','.join(NAIVE_TARGETS)} "
        f"({AUTO}: cpu-fp32, cpu-bf16 where the CPU has native bf16, cuda-bf16 where there is a GPU)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Photo with a face (default: insightface's t1.jpg)."),
    video: Optional[Path] = typer.Option(None, "--video", help="Video for the live loop (default: a clip made "
                                         "from --image)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: "
                                       "benchmarks/results/<timestamp>-<machine>)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    runs: int = typer.Option(_default("runs"), "--runs", help="Measured runs per configuration."),
    warmup: int = typer.Option(_default("warmup"), "--warmup", help="Warm-up runs per configuration (not measured)."),
    decode_tokens: int = typer.Option(_default("decode_tokens"), "--decode-tokens", help="Tokens decoded per answer "
                                      "(end-of-sequence ignored, so runs compare)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads (default: physical cores)."),
    vision_prepack: str = typer.Option(_default("vision_prepack"), "--vision-prepack", help="ONNX vision encoder's "
                                       "weight pre-packing + memory arena: auto | on | off (as ask/run/serve); the "
                                       "resolved setting is recorded per configuration. Run once with on and once "
                                       "with off to compare."),
    device: str = typer.Option(",".join(_default("devices")), "--device", help="Where the edge path and the "
                               "llama.cpp peer run, comma-separated: cpu; cuda (ONNX Runtime's CUDA provider + every "
                               "LLM layer on the GPU); tensorrt (ONNX Runtime's TensorRT provider, fp16, engine "
                               "cache + every LLM layer on the GPU). GPUs need the GPU builds (README \"GPU\"); "
                               "use --vision fp32 there."),
    detector_model: Optional[Path] = typer.Option(None, "--detector-model", help="Local YuNet .onnx."),
    profiles: bool = typer.Option(_default("profiles"), "--profiles/--no-profiles", help="Compare threads, ORT "
                                  "optimisation, KV-cache type and face batching."),
    faces: bool = typer.Option(_default("faces"), "--faces/--no-faces", help="Answer the photo's faces (1, 2, 4, 6) "
                               "one after another and together (one llama_decode per step for all): time, ratio, "
                               "aggregate tok/s."),
    roofline: bool = typer.Option(_default("roofline"), "--roofline/--no-roofline", help="Measure this machine's "
                                  "memory bandwidth and GEMM throughput and show the best time each stage could "
                                  "reach."),
    verify: bool = typer.Option(_default("verify"), "--verify/--no-verify", help="--synthetic: verify the export, so "
                                "each quant's logit agreement with transformers is reported beside its speed."),
    live: bool = typer.Option(_LIVE.enabled, "--live/--no-live",
                              help="Benchmark the real live loop (run_live, headless): idle, and busy answering new people."),
    live_frames: int = typer.Option(_LIVE.frames, "--live-frames", help="Frames per live-loop measurement."),
    live_llama_threads: str = typer.Option(",".join(map(str, _LIVE.llama_threads)), "--live-llama-threads",
                                           help="llama.cpp thread counts to compare while the frame loop runs "
                                                "(comma-separated)."),
    serve: bool = typer.Option(False, "--serve", help="Benchmark `facellm-edge serve` instead, on one quant and "
                               "vision: overhead vs in-process, 1/4/16 concurrent clients, frame-loop FPS while "
                               "serving (uses --bundle/--synthetic, --quant, --vision, --image, --video, --runs, "
                               "--warmup, --decode-tokens, --threads, --detector-model, --out, --force)."),
) -> None:
    """Measure detection, alignment, encode, image and question prefill, TTFT (cold/warm), decode and peak memory:
    edge path (ONNX Runtime + llama.cpp) per precision beside transformers. Writes results.json, results.md and
    stages.png."""
    from rich.console import Console

    console = Console(stderr=True)
    if serve:
        if parse_csv(device, "device") != ("cpu",):
            from facellm_edge.errors import UsageError

            raise UsageError("--serve measures the service on the CPU; drop --device")
        from facellm_edge.bench.serve import ServeBenchConfig, run_serve_bench

        result = run_serve_bench(ServeBenchConfig(
            bundle=bundle, synthetic=synthetic.lower() if synthetic else None, tokenizer=tokenizer, out=out,
            force=force, quant=quant, vision=vision, image=image, video=video, runs=runs, warmup=warmup,
            decode_tokens=decode_tokens, threads=threads, detector_model=detector_model),
            progress=lambda msg: console.print(f"[cyan]•[/] {msg}"))
        console.print((result / "results.md").read_text(encoding="utf-8"), markup=False, highlight=False,
                      soft_wrap=True)
        console.print(f"results written to [bold]{result}[/] (results.json, results.md)")
        return
    if bundle is not None:  # a missing or damaged bundle fails before torch is imported or anything is measured
        from facellm_edge.bundle import load_bundle

        load_bundle(bundle, check_hashes=False)  # the run re-checks every hash
    from facellm_edge.bench.runner import run_bench

    cfg = BenchConfig(
        out=out, bundle=bundle, synthetic=synthetic.lower() if synthetic else None, tokenizer=tokenizer,
        checkpoint=checkpoint, quants=parse_csv(quant, "quant") if quant else None,
        vision=parse_csv(vision, "vision precision") if vision else None, naive=parse_csv(naive, "naive baseline"),
        image=image, runs=runs, warmup=warmup, decode_tokens=decode_tokens, threads=threads,
        vision_prepack=vision_prepack, devices=parse_csv(device, "device"), detector_model=detector_model,
        profiles=profiles, faces=faces,
        roofline=roofline,
        verify=verify, force=force,
        live=LiveBenchConfig(enabled=live, video=video, frames=live_frames,
                             llama_threads=_thread_list(live_llama_threads)),
    )
    result = run_bench(cfg, progress=lambda msg: console.print(f"[cyan]•[/] {msg}"))
    console.print((result / "results.md").read_text(encoding="utf-8"), markup=False, highlight=False,
                  soft_wrap=True)
    console.print(f"results written to [bold]{result}[/] (results.json, results.md, stages.png)")


def _thread_list(value: str) -> tuple[int, ...]:
    from facellm_edge.errors import UsageError

    try:
        threads = tuple(int(v) for v in parse_csv(value, "thread count"))
    except ValueError as exc:
        raise UsageError(f"--live-llama-threads takes whole numbers like 1,2; got '{value}'") from exc
    if any(t < 1 for t in threads):
        raise UsageError(f"--live-llama-threads must be >= 1; got '{value}'")
    return threads

