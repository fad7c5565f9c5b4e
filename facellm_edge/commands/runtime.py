"""``facellm-edge ask`` (one photo) and ``facellm-edge run`` (live: camera, video, images, stream).

Both take the model options of :mod:`facellm_edge.commands.runtime_options`; heavy libraries (cv2, onnxruntime,
llama_cpp) are imported inside the command bodies only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional

import typer

from facellm_edge.commands.defaults import field_default
from facellm_edge.commands.runtime_options import DETECT_EVERY_HELP, RuntimeOptions, runtime_options
from facellm_edge.runtime.live.loop import LiveConfig

log = logging.getLogger(__name__)


@runtime_options(live=False)
def ask(
    image: Path = typer.Argument(..., help="A photo (jpg/png/...)."),
    question: str = typer.Argument(..., help="The question, asked about every face."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
    save_crops: Optional[Path] = typer.Option(None, "--save-crops", help="Write the aligned crops here."),
    whole_image: bool = typer.Option(False, "--whole-image", help="No detection: the whole image is the face crop."),
    *,
    options: RuntimeOptions,
) -> None:
    from facellm_edge.errors import UsageError
    from facellm_edge.io import read_image
    from facellm_edge.runtime.pipeline import FaceLLM

    if whole_image and save_crops is not None:  # no face is cut out: there would be nothing to write
        raise UsageError("--save-crops writes the aligned face crops; with --whole-image there are none")
    cfg = options.runtime_config()
    img = read_image(image, cfg.max_pixels)  # before the bundle loads: a bad photo fails at once
    with FaceLLM.load(options.bundle_dir(), cfg) as model:
        if whole_image:
            answers = [model.ask_crop(img, question)]
        else:
            answers = model.ask(img, question, save_crops=save_crops)
    records = [a.to_dict() for a in answers]
    if as_json:
        typer.echo(json.dumps({"image": str(image), "question": question, "faces": records, "no_face": not records}))
        return
    if not records:
        typer.echo(f"no face found in {image}")
        return
    for r in records:
        typer.echo(f"face {r['face']} {r['box']}: {r['answer'].strip()}")
        typer.echo("  " + ", ".join(f"{k} {v:.0f} ms" for k, v in r["timings_ms"].items()))


@runtime_options(live=True)
def run(
    source: Optional[List[str]] = typer.Option(None, "--source", help="Camera index, video file, image, folder of "
                                               "images, or rtsp:// / http:// URL. Repeat it (or give a .streams file, "
                                               "one source per line) to read several cameras in turn."),
    camera: Optional[int] = typer.Option(None, "--camera", min=0, help="Camera index (alias of --source N)."),
    question: str = typer.Option(..., "--question", "-q", help="Asked once about every new face."),
    no_display: Optional[bool] = typer.Option(
        None, "--no-display/--display", help="--no-display: headless, no window. --display: a window, or an error "
        "when none can open. Default: a window where there is a display (on Linux: DISPLAY, WAYLAND_DISPLAY or "
        "QT_QPA_PLATFORM set) and OpenCV has a GUI; headless otherwise, with one line saying so."),
    jsonl: Optional[Path] = typer.Option(None, "--jsonl", help="Write one JSON line per answered face, each flushed "
                                         "to disk as it is made. An existing file is refused unless --append."),
    append: bool = typer.Option(False, "--append", help="Add to an existing --jsonl file."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write the annotated video (.mp4 .m4v .mov .avi "
                                          ".mkv), or one image (.png .jpg .jpeg .bmp .webp .tif .tiff) for a one-image "
                                          "--source. An existing file is refused unless --force."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --output video."),
    max_frames: int = typer.Option(field_default(LiveConfig, "max_frames"), "--max-frames", min=0,
                                   help="Stop after N frames (0 = no limit)."),
    detect_every: int = typer.Option(field_default(LiveConfig, "detect_every"), "--detect-every", min=0, help=DETECT_EVERY_HELP),
    *,
    options: RuntimeOptions,
) -> None:
    """Headless with neither --jsonl nor a window: the JSON lines go to stdout."""
    from facellm_edge.errors import UsageError
    from facellm_edge.runtime.live.loop import check_outputs, run_live
    from facellm_edge.runtime.live.outputs import check_output_source
    from facellm_edge.runtime.live.sources import open_sources, source_files
    from facellm_edge.runtime.pipeline import FaceLLM

    if (not source) == (camera is None):
        raise UsageError("give exactly one of --source (file, folder, URL, camera index) or --camera N")
    if append and jsonl is None:
        raise UsageError("--append adds to a --jsonl file; give --jsonl FILE too")
    if force and output is None:
        raise UsageError("--force replaces an existing --output video; give --output FILE too")
    cfg = options.runtime_config()
    window = _window(no_display, jsonl)
    live = LiveConfig(question=question, display=window, jsonl=jsonl, output=output, append=append,
                      overwrite=force, max_frames=max_frames, detect_every=detect_every)
    specs = [camera] if camera is not None else list(source)
    # a bad output path (or one the sources read) fails now, before the source opens and the bundle loads
    check_outputs(live, source_files(specs))
    frames = open_sources(specs, max_pixels=cfg.max_pixels)
    try:
        check_output_source(live, frames)  # --output x.jpg needs one still image: said before the bundle loads
        with FaceLLM.load(options.bundle_dir(), cfg) as model:
            model.detector  # load the detector before the first frame is processed
            echo = (lambda rec: typer.echo(json.dumps(rec))) if not window and jsonl is None else None
            stats = run_live(model, frames, live, on_record=echo)
    finally:
        frames.close()
    if stats.skipped:
        log.warning("%d %s of %s could not be read and were skipped (see the warnings above)", stats.skipped,
                    frames.unit, frames.description)
    log.info("%d frames, %.1f FPS, %d answers", stats.frames, stats.fps, stats.answers)


def _window(no_display: Optional[bool], jsonl: Optional[Path]) -> bool:
    """Whether ``run`` opens a window: not with --no-display; with --display, or by default where one can open
    (:func:`facellm_edge.doctor.display.display_problem`). With no display Qt would abort the process (SIGABRT):
    the default goes headless with one line instead, --display is refused in one line."""
    if no_display:
        return False
    from facellm_edge.doctor.display import display_problem
    from facellm_edge.errors import UsageError

    problem = display_problem()
    if problem is None:
        return True
    if no_display is False:  # --display
        raise UsageError(f"--display cannot open a window: {problem}; drop --display to run headless")
    log.warning("%s: running headless (as --no-display)%s", problem,
                "" if jsonl is not None else "; the answers go to stdout as JSON lines")
    return False
