"""Machine description recorded with every benchmark: CPU, cores, RAM, GPU, ORT providers, library versions."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from facellm_edge.cpu import cpuinfo, usable_cores

log = logging.getLogger(__name__)

VERSIONED = ("facellm-edge", "torch", "torchvision", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu",
             "llama-cpp-python", "gguf", "opencv-python", "opencv-python-headless", "insightface", "numpy",
             "psutil", "matplotlib")
# CPU features that decide which kernels run (bf16 matmuls in torch, int8 VNNI in ORT / llama.cpp).
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


def gpu_info() -> list[dict[str, str]]:
    """GPUs reported by ``nvidia-smi`` (empty when there is none)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed: %s", exc)
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "memory": parts[1], "driver": parts[2]})
    return gpus


def versions() -> dict[str, str]:
    out = {}
    for dist in VERSIONED:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    out["python"] = platform.python_version()
    return out


def ort_providers() -> list[str]:
    from facellm_edge.errors import MissingExtraError
    from facellm_edge.onnxrt import onnxruntime_module  # telemetry off

    try:
        ort = onnxruntime_module()
    except MissingExtraError:  # no runtime flavour installed
        return []
    return list(ort.get_available_providers())


def physical_cores() -> int:
    """Physical cores: psutil's count, else the distinct (package, core) pairs of /proc/cpuinfo, else os.cpu_count()
    (psutil is optional: `bench --bundle` runs on a device without it)."""
    try:
        import psutil
    except ImportError:
        return _cpuinfo_cores() or os.cpu_count() or 1
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _cpuinfo_cores() -> int | None:
    p = Path("/proc/cpuinfo")
    if not p.is_file():
        return None
    cores, package = set(), ""
    for line in p.read_text(errors="replace").splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = val.strip()
        elif key == "core id":
            cores.add((package, val.strip()))
    return len(cores) or None  # ARM kernels list no core ids


def ram_gb() -> float:
    """Total RAM (psutil when installed, else the OS's page count)."""
    try:
        import psutil
    except ImportError:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return round(psutil.virtual_memory().total / 2**30, 1)


def torch_cpu_capability() -> str | None:
    """The SIMD level torch's CPU kernels dispatch to (AVX2, AVX512, ...); None without torch."""
    try:
        import torch
    except ImportError:
        return None
    return str(torch.backends.cpu.get_cpu_capability())


def llama_cpu_build() -> list[str] | None:
    """The CPU features llama.cpp was compiled with (``llama_print_system_info``: AVX2, AVX512_VNNI, AMX_INT8, ...);
    None without llama-cpp-python. A CPU row's LLM speed depends on the build as much as on the CPU: a portable
    build leaves a machine's AVX-512 unused, a native one on an AMX CPU runs the AMX kernels (benchmarks/README)."""
    try:
        import llama_cpp
    except Exception:  # noqa: BLE001 - ImportError, or OSError from a shared library that does not load
        return None
    from facellm_edge.doctor.engines import built_in, llama_system_info

    cpu = llama_system_info(llama_cpp).get("CPU", {})
    return [name for name in cpu if built_in(cpu, name)]


def machine_info() -> dict[str, Any]:
    model, flags = cpuinfo()
    affinity = usable_cores()
    return {
        "hostname": socket.gethostname(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu_model": model,
        "cpu_arch": platform.machine(),
        "physical_cores": physical_cores(),
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,
        "cpu_flags": {f: f in flags for f in CPU_FLAGS},
        "torch_cpu_capability": torch_cpu_capability(),
        "llama_cpu_build": llama_cpu_build(),
        "ram_gb": ram_gb(),
        "gpus": gpu_info(),
        "ort_providers": ort_providers(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else [],
    }


def machine_slug(info: dict[str, Any]) -> str:
    """Short file-system-safe name for the default output folder, e.g. ``amd-epyc-2c``."""
    words = [w for w in info.get("cpu_model", "cpu").lower().replace("(r)", "").replace("(tm)", "").split()
             if w not in ("processor", "cpu", "core", "@")][:2]
    slug = "-".join("".join(ch for ch in w if ch.isalnum()) for w in words) or "cpu"
    slug += f"-{info.get('usable_cores', 0)}c"
    if info.get("gpus"):
        slug += "-" + "".join(ch for ch in info["gpus"][0]["name"].lower().split()[-1] if ch.isalnum())
    return slug
