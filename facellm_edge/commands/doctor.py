"""``facellm-edge doctor``: what this machine and this install can run, and what is wrong.

Every check runs for real (versions, CPU features, ONNX Runtime providers on a tiny model, llama.cpp's build, the
detector, display, cameras, cache folders and free disk, a bundle's sha256s); the report goes to stdout (text, or
one JSON object with ``--json``). The exit code is non-zero when something asked for cannot work: no runtime
flavour (7), a ``--bundle`` that is missing or damaged (3), a ``--camera`` that does not open (3), a ``--device``
whose provider does not initialise (6), a ``--detector`` whose extra is not installed (7).
"""

from __future__ import annotations

import json
from typing import Optional

import typer


def doctor_cmd(
    bundle: Optional[str] = typer.Option(None, "--bundle", help="Also check this bundle (what ask/run accept: a "
                                         "folder or a pulled name): every file's size and sha256."),
    camera: list[int] = typer.Option([], "--camera", min=0, help="Open this camera index and read a frame "
                                     "(repeatable); fails when it does not open."),
    cameras: bool = typer.Option(False, "--cameras", help="Open every camera device listed (default: cameras are "
                                 "only listed, not opened)."),
    device: Optional[str] = typer.Option(None, "--device", help="The --device you will run with "
                                         "(auto|cpu|cuda|tensorrt): its ONNX Runtime provider must initialise."),
    detector: Optional[str] = typer.Option(None, "--detector", help="The --detector you will run with (yunet|scrfd): "
                                           "it must be installed."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (schema facellm-edge-doctor/1)."),
) -> None:
    from facellm_edge.doctor.report import DoctorConfig, DoctorError
    from facellm_edge.doctor.run import run_doctor
    from facellm_edge.errors import UsageError
    from facellm_edge.runtime.detect import check_name
    from facellm_edge.runtime.encode import DEVICES

    if device is not None and device not in DEVICES:
        raise UsageError(f"unknown device '{device}'; choose one of: {', '.join(DEVICES)}")
    if detector is not None:
        check_name(detector)
    config = DoctorConfig(bundle=bundle, cameras=tuple(camera), scan_cameras=cameras, device=device,
                          detector=detector)
    report = run_doctor(config, resolve_bundle=_resolve_bundle)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.to_text())
    if report.failures:
        raise DoctorError(report.failures)


def _resolve_bundle(spec: str):
    """``--bundle`` as ask and run resolve it (a pulled name without network, an uncached hub id pulled)."""
    from facellm_edge.commands.runtime_options import resolve_bundle

    return resolve_bundle(spec)
