"""The CPU's model name and feature flags, read once here for everyone who needs them: the vision encoder's
pre-packing rule (:mod:`facellm_edge.runtime.encode`), ``doctor``'s CPU check and the benchmark's machine record;
and how many cores this process may use (the live loop's small-CPU policy). Standard library only: the runtime
imports it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# At or below this many usable cores the live loop's detector runs on every 3rd frame by default
# (runtime.live.tracker.resolve_detect_every).
SMALL_CPU_CORES = 4


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one: a container's cpuset counts)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def small_cpu(cores: int | None = None) -> bool:
    return (cores or usable_cores()) <= SMALL_CPU_CORES


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
