"""``facellm-edge ask`` (one photo) and ``facellm-edge run`` (live: camera, video, images, stream).

Heavy libraries (cv2, onnxruntime, llama_cpp) are imported inside the command bodies only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from facellm_edge.errors import BundleError
from facellm_edge.io import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from facellm_edge.runtime.pipeline import RuntimeConfig

log = logging.getLogger(__name__)

DEFAULT_MODEL = "Idiap/FaceLLM-1B"
DEFAULT_QUANT = "q4_k_m"

_BUNDLE_HELP = ("Bundle folder, or a hub repo id of a published bundle. Default: FaceLLM-1B at q4_k_m in the user "
                "cache, exported on first use (needs the 'export' extra).")


_MAX_PIXELS = DEFAULT_MAX_PIXELS
_MAX_PIXELS_HELP = ("Refuse image files larger than this many pixels, read from the file's header before decoding "
                    "(0 = no limit).")


def default_bundle_dir() -> Path:
    from facellm_edge.runtime.detect.yunet import user_cache_dir

    return user_cache_dir() / "bundles" / f"{DEFAULT_MODEL.split('/')[-1]}-{DEFAULT_QUANT}"


def resolve_bundle(spec: Optional[str]) -> Path:
    """A local bundle folder, a hub repo id (snapshot_download), or the cached default bundle (built on first use)."""
    from facellm_edge.bundle import MANIFEST, resolve_bundle_spec

    if spec is None:
        dest = default_bundle_dir()
        if (dest / MANIFEST).is_file():
            return dest
        from facellm_edge.errors import require

        require("torch", "export")
        from facellm_edge.export.pipeline import ExportConfig, export_bundle

        log.warning("no --bundle: exporting %s (%s) to %s (first use only; this takes a while)",
                    DEFAULT_MODEL, DEFAULT_QUANT, dest)
        return export_bundle(ExportConfig(model=DEFAULT_MODEL, out=dest, quants=(DEFAULT_QUANT,))).out
    return resolve_bundle_spec(spec)  # a local folder, or a hub id only when it cannot be a path the user meant


def _grammar(schema: Optional[Path]) -> Optional[str]:
    """``--schema FILE`` (a JSON schema) -> a llama.cpp grammar that forces every answer to match it."""
    if schema is None:
        return None
    from facellm_edge.errors import InputError
    from facellm_edge.llm.generator import schema_to_grammar

    try:
        text = schema.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the JSON schema {schema}: {exc}") from exc
    return schema_to_grammar(text)


_SYSTEM_HELP = "System message for this run (default: the bundle's own, none unless exported with --system). " \
    "none | intern_vl (the InternVL identity text FaceLLM was trained with) | the message text."


def _config(live: bool, *, detector: str, detector_model: Optional[Path], device: str, quant: Optional[str],
            precision: Optional[str], threads: Optional[int], max_tokens: int, temperature: float, max_faces: int,
            ctx: int, max_pixels: int, schema: Optional[Path] = None, system: Optional[str] = None) -> "RuntimeConfig":
    from facellm_edge.runtime.pipeline import RuntimeConfig

    cfg = RuntimeConfig(detector=detector, detector_model=detector_model, device=device, llm_quant=quant,
                        vision_precision=precision, max_tokens=max_tokens, temperature=temperature,
                        max_faces=max_faces, n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                        max_pixels=max_pixels, grammar=_grammar(schema), system=system)
    return cfg.for_live() if live else cfg


def register(app: typer.Typer) -> None:
    @app.command("ask")
    def ask(
        image: Path = typer.Argument(..., help="A photo (jpg/png/...)."),
        question: str = typer.Argument(..., help="The question, asked about every face."),
        bundle: Optional[str] = typer.Option(None, "--bundle", help=_BUNDLE_HELP),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
        max_tokens: int = typer.Option(128, "--max-tokens", min=1, help="Max tokens per answer."),
        temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
        detector: str = typer.Option("yunet", "--detector", help="yunet (MIT, default) or scrfd (non-commercial)."),
        detector_model: Optional[Path] = typer.Option(None, "--detector-model", help="Local detector model file."),
        save_crops: Optional[Path] = typer.Option(None, "--save-crops", help="Write the aligned crops here."),
        whole_image: bool = typer.Option(False, "--whole-image",
                                         help="No detection: the whole image is the face crop."),
        device: str = typer.Option("auto", "--device", help="Vision encoder: auto | cpu | cuda | tensorrt."),
        quant: Optional[str] = typer.Option(None, "--quant", help="LLM quant in the bundle (default: its best)."),
        precision: Optional[str] = typer.Option(None, "--precision", help="Vision precision (int8 | fp32)."),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help="llama.cpp threads."),
        max_faces: int = typer.Option(0, "--max-faces", min=0, help="Answer about at most N faces (0 = all)."),
        ctx: int = typer.Option(4096, "--ctx", min=16, help="LLM context size."),
        schema: Optional[Path] = typer.Option(None, "--schema",
                                              help="JSON schema file: answers are constrained to match it."),
        max_pixels: int = typer.Option(_MAX_PIXELS, "--max-pixels", min=0, help=_MAX_PIXELS_HELP),
        system: Optional[str] = typer.Option(None, "--system", help=_SYSTEM_HELP),
    ) -> None:
        """Answer a question about every face in a photo."""
        from facellm_edge.runtime.detect import check_name
        from facellm_edge.io import read_image
        from facellm_edge.runtime.pipeline import FaceLLM

        check_name(detector)
        cfg = _config(False, detector=detector, detector_model=detector_model, device=device, quant=quant,
                      precision=precision, threads=threads, max_tokens=max_tokens, temperature=temperature,
                      max_faces=max_faces, ctx=ctx, max_pixels=max_pixels, schema=schema, system=system)
        img = read_image(image, cfg.max_pixels)  # before the bundle loads: a bad photo fails at once
        with FaceLLM.load(resolve_bundle(bundle), cfg) as model:
            if whole_image:
                answers = [model.ask_crop(img, question)]
            else:
                answers = model.ask(img, question, save_crops=save_crops)
        records = [a.to_dict() for a in answers]
        if as_json:
            typer.echo(json.dumps({"image": str(image), "question": question, "faces": records,
                                   "no_face": not records}))
            return
        if not records:
            typer.echo(f"no face found in {image}")
            return
        for r in records:
            t = r["timings_ms"]
            typer.echo(f"face {r['face']} {r['box']}: {r['answer'].strip()}")
            typer.echo("  " + ", ".join(f"{k} {v:.0f} ms" for k, v in t.items()))

    @app.command("run")
    def run(
        source: Optional[str] = typer.Option(None, "--source",
                                             help="Camera index, video file, image, folder of images, or "
                                                  "rtsp:// / http:// URL."),
        camera: Optional[int] = typer.Option(None, "--camera", min=0, help="Camera index (alias of --source N)."),
        question: str = typer.Option(..., "--question", "-q", help="Asked once about every new face."),
        bundle: Optional[str] = typer.Option(None, "--bundle", help=_BUNDLE_HELP),
        no_display: bool = typer.Option(False, "--no-display", help="Headless: no window."),
        jsonl: Optional[Path] = typer.Option(None, "--jsonl",
                                             help="Write one JSON line per answered face, each flushed to disk as "
                                                  "it is made. An existing file is refused unless --append."),
        append: bool = typer.Option(False, "--append", help="Add to an existing --jsonl file."),
        output: Optional[Path] = typer.Option(None, "--output",
                                              help="Write the annotated video (mp4). An existing file is refused "
                                                   "unless --force."),
        force: bool = typer.Option(False, "--force", help="Replace an existing --output video."),
        max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Max tokens per answer."),
        temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
        detector: str = typer.Option("yunet", "--detector", help="yunet (MIT, default) or scrfd (non-commercial)."),
        detector_model: Optional[Path] = typer.Option(None, "--detector-model", help="Local detector model file."),
        device: str = typer.Option("auto", "--device", help="Vision encoder: auto | cpu | cuda | tensorrt."),
        quant: Optional[str] = typer.Option(None, "--quant", help="LLM quant in the bundle."),
        precision: Optional[str] = typer.Option(None, "--precision", help="Vision precision (int8 | fp32)."),
        threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                              help="llama.cpp threads (live default 1, beside 1 detector thread)."),
        max_faces: int = typer.Option(0, "--max-faces", min=0, help="Track at most N faces per frame (0 = all)."),
        max_frames: int = typer.Option(0, "--max-frames", min=0, help="Stop after N frames (0 = no limit)."),
        ctx: int = typer.Option(4096, "--ctx", min=16, help="LLM context size."),
        schema: Optional[Path] = typer.Option(None, "--schema",
                                              help="JSON schema file: answers are constrained to match it."),
        max_pixels: int = typer.Option(_MAX_PIXELS, "--max-pixels", min=0, help=_MAX_PIXELS_HELP),
        system: Optional[str] = typer.Option(None, "--system", help=_SYSTEM_HELP),
    ) -> None:
        """Live loop: detect and track faces every frame, answer about each new face, stream the answers."""
        from facellm_edge.runtime.detect import check_name
        from facellm_edge.errors import UsageError
        from facellm_edge.runtime.live.loop import LiveConfig, check_outputs, run_live
        from facellm_edge.runtime.live.sources import open_source
        from facellm_edge.runtime.pipeline import FaceLLM

        if (source is None) == (camera is None):
            raise UsageError("give exactly one of --source (file, folder, URL, camera index) or --camera N")
        if append and jsonl is None:
            raise UsageError("--append adds to a --jsonl file; give --jsonl FILE too")
        if force and output is None:
            raise UsageError("--force replaces an existing --output video; give --output FILE too")
        check_name(detector)
        cfg = _config(True, detector=detector, detector_model=detector_model, device=device, quant=quant,
                      precision=precision, threads=threads, max_tokens=max_tokens, temperature=temperature,
                      max_faces=max_faces, ctx=ctx, max_pixels=max_pixels, schema=schema, system=system)
        live = LiveConfig(question=question, display=not no_display, jsonl=jsonl, output=output, append=append,
                          overwrite=force, max_tokens=max_tokens, temperature=temperature, max_frames=max_frames)
        check_outputs(live)  # a bad output path fails now, before the source opens and the bundle loads
        frames = open_source(camera if camera is not None else source, max_pixels=cfg.max_pixels)
        try:
            with FaceLLM.load(resolve_bundle(bundle), cfg) as model:
                model.detector  # load the detector before the first frame is processed
                echo = (lambda rec: typer.echo(json.dumps(rec))) if no_display and jsonl is None else None
                stats = run_live(model, frames, live, on_record=echo)
        finally:
            frames.close()
        if stats.skipped:
            log.warning("%d %s of %s could not be read and were skipped (see the warnings above)", stats.skipped,
                        frames.unit, frames.description)
        log.info("%d frames, %.1f FPS, %d answers", stats.frames, stats.fps, stats.answers)
