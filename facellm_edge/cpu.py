"""The CPU's model name and feature flags, read once here for everyone who needs them: the vision encoder's
pre-packing rule (:mod:`facellm_edge.runtime.encode`), ``doctor``'s CPU check and the benchmark's machine record.
Standard library only: the runtime imports it."""

from __future__ import annotations

import platform
from pathlib import Path


def cpuinfo() -> tuple[str, set[str]]:
    """(CPU model name, its feature flags) from /proc/cpuinfo (x86 ``flags``, ARM ``Features``); elsewhere the
    platform's processor name and no flags."""
    model, flags = platform.processor() or platform.machine(), set()
    p = Path("/proc/cpuinfo")
    if p.is_file():
        for line in p.read_text(errors="replace").splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = val.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(val.split())
    return model, flags
