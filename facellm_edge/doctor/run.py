"""Run every check of ``facellm-edge doctor`` in order and collect the :class:`~.report.Report`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from facellm_edge.doctor.report import Check, DoctorConfig, Report, guarded


def run_doctor(config: DoctorConfig, *, resolve_bundle: Callable[[str], Path] | None = None,
               camera_opener: Callable | None = None) -> Report:
    """All checks; one that raises becomes a failed check and the rest still run.

    ``resolve_bundle`` turns ``--bundle`` into a folder as ask/run do (default: a local path as given);
    ``camera_opener`` opens a camera index (default: the live loop's OpenCV opener)."""
    from facellm_edge.doctor import cameras, checks, engines

    cpu = guarded("cpu", checks.check_cpu)
    results: list[Check] = [
        guarded("python", checks.check_python),
        guarded("versions", checks.check_versions),
        guarded("flavour", checks.check_flavour),
        cpu,
        guarded("onnxruntime", lambda: engines.check_onnxruntime(config.device)),
        guarded("llama.cpp", lambda: engines.check_llama(config.device, cpu.data.get("features", {}))),
        guarded("detector", lambda: checks.check_detector(config.detector)),
        guarded("display", checks.check_display),
        guarded("cameras", lambda: cameras.check_cameras(config.cameras, config.scan_cameras, camera_opener)),
        guarded("storage", checks.check_storage),
    ]
    if config.bundle is not None:
        resolve = resolve_bundle or Path
        results.append(guarded("bundle", lambda: checks.check_bundle(config.bundle, resolve)))
    return Report(tuple(results))
