"""The doctor's checks of the install and the machine: each a small function returning one :class:`Check`.

ONNX Runtime providers and llama.cpp's build are in :mod:`.engines`, cameras in :mod:`.cameras`.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

from facellm_edge.doctor.display import display_problem, opencv_gui
from facellm_edge.doctor.flavours import FLAVOURS, MissingRuntimeError, clashes, flavour, installed, missing_runtime
from facellm_edge.doctor.report import FAIL, INFO, OK, WARN, Check
from facellm_edge.errors import InputError, MissingExtraError, require

# distributions whose versions are reported (beside the runtime flavour's ONNX Runtime and OpenCV)
VERSIONED = ("facellm-edge", "numpy", "llama-cpp-python", "pillow", "huggingface-hub", "insightface", "psutil",
             "torch", "transformers")
LOW_DISK_BYTES = 4 * 2**30  # a FaceLLM-1B bundle is ~1 GB; a TensorRT engine cache a few hundred MB

# CPU feature -> (alternatives, each a set of /proc/cpuinfo flags that must all be there; what it means for speed)
X86_FEATURES: dict[str, tuple[tuple[tuple[str, ...], ...], str]] = {
    "AVX2": ((("avx2", "fma"),), "the SIMD level llama.cpp and ONNX Runtime are tuned for; without it everything "
                                 "runs several times slower"),
    "AVX-512": ((("avx512f",),), "wider vectors: ONNX Runtime uses them at run time, llama.cpp when built with them"),
    "VNNI": ((("avx512_vnni",), ("avx_vnni",)), "int8 dot products in one instruction: the int8 vision encoder and "
                                                "quantised decode run up to ~2x faster"),
    "AMX": ((("amx_int8",), ("amx_bf16",)), "matrix tiles (Xeon 4th gen+): ONNX Runtime's int8/bf16 matmuls"),
}
ARM_FEATURES: dict[str, tuple[tuple[tuple[str, ...], ...], str]] = {
    "NEON": ((("asimd",),), "ARM64's SIMD baseline: llama.cpp and ONNX Runtime vector kernels"),
    "DOTPROD": ((("asimddp",),), "int8 dot products (SDOT): quantised decode (q4_0, q8_0) up to ~2x faster"),
    "I8MM": ((("i8mm",),), "int8 matrix multiply: llama.cpp's repacked q4_0 kernels (the fastest quant there)"),
    "FP16": ((("fphp", "asimdhp"),), "half-precision arithmetic: f16 kernels without conversion"),
    "SVE": ((("sve",),), "scalable vectors: llama.cpp's SVE kernels when built with them"),
}


def dist_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def check_versions() -> Check:
    vers = {"python": platform.python_version()}
    vers.update({name: v for name in VERSIONED if (v := dist_version(name)) is not None})
    for module in ("onnxruntime", "cv2"):
        vers.update(installed(module))
    shown = ", ".join(f"{k} {v}" for k, v in vers.items())
    return Check("versions", OK, shown, data={"versions": vers, "executable": sys.executable})


def check_flavour() -> Check:
    """One ONNX Runtime and one OpenCV, importable: the runtime flavour (README 'Install')."""
    problems, data = [], {"onnxruntime": installed("onnxruntime"), "opencv": installed("cv2"), "flavour": flavour()}
    from facellm_edge.onnxrt import onnxruntime_module

    try:
        onnxruntime_module()
    except MissingExtraError as exc:  # MissingRuntimeError: not installed, or broken
        problems.append(str(exc))
    try:
        import cv2  # noqa: F401
    except ImportError as exc:  # not installed, or its libraries do not load (libGL without a display)
        problems.append(str(MissingRuntimeError("cv2", exc)))
    if problems:
        return Check("flavour", FAIL, problems[0], tuple(problems[1:]), data, exit_code=7)
    extra = data["flavour"]
    dists = ", ".join(f"{k} {v}" for k, v in {**data["onnxruntime"], **data["opencv"]}.items())
    clash = clashes()
    if clash:
        return Check("flavour", WARN, f"clashing distributions installed: {dists}", tuple(clash), data)
    if extra is None:
        return Check("flavour", INFO, f"no named flavour ({dists}); the runtime works with it",
                     (f"the named ones: {', '.join(FLAVOURS)}",), data)
    return Check("flavour", OK, f"[{extra}]: {dists}", data=data)


def cpu_features(arch: str, flags: set[str]) -> dict[str, bool]:
    """Feature name -> present, for this architecture ({} for one without a table). NEON is part of every ARM64
    CPU (macOS has no /proc/cpuinfo to list it)."""
    if arch.lower() in ("aarch64", "arm64"):
        flags, table = flags | {"asimd"}, ARM_FEATURES
    elif arch.lower() in ("x86_64", "amd64", "i686", "x86"):
        table = X86_FEATURES
    else:
        return {}
    return {name: any(all(f in flags for f in alt) for alt in alts) for name, (alts, _) in table.items()}


def check_cpu() -> Check:
    from facellm_edge.bench.system import physical_cores
    from facellm_edge.cpu import cpuinfo, usable_cores

    model, flags = cpuinfo()
    arch = platform.machine()
    features = cpu_features(arch, flags)
    table = {**X86_FEATURES, **ARM_FEATURES}
    notes = tuple(f"{name}: {'yes' if have else 'no '} - {table[name][1]}" for name, have in features.items())
    usable = usable_cores()
    summary = f"{model} ({arch}), {physical_cores()} physical cores, {usable} usable"
    status = OK
    if not features:
        notes += ("no CPU feature table for this architecture",)
        status = INFO
    elif "AVX2" in features and not features["AVX2"]:
        status = WARN
    return Check("cpu", status, summary, notes, {"model": model, "arch": arch, "features": features,
                                                   "usable_cores": usable})


def check_display() -> Check:
    gui = opencv_gui()
    problem = display_problem(gui=gui)
    data = {"opencv_gui": gui, **{v: os.environ.get(v) for v in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}}
    if problem is None:
        where = next((f"{v}={os.environ[v]}" for v in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")
                      if os.environ.get(v)), sys.platform)
        return Check("display", OK, f"`run` opens a window ({where}, OpenCV GUI {gui})", data=data)
    return Check("display", INFO, f"{problem}: `run` runs headless (answers as JSON lines on stdout without --jsonl)",
                 data=data)


def check_storage() -> Check:
    """The cache folders this tool writes (bundles, hub downloads, TensorRT engines) and the free disk under them."""
    from facellm_edge.io import user_cache_dir

    folders = {"facellm-edge cache": user_cache_dir()}
    try:
        from huggingface_hub import constants

        folders["hub cache"] = Path(constants.HF_HUB_CACHE)
    except ImportError:
        pass
    folders["TensorRT engines"] = user_cache_dir() / "tensorrt"
    notes, data, low, unwritable = [], {}, [], []
    for label, path in folders.items():
        existing, free = free_space(path)
        notes.append(f"{label}: {path} ({free / 2**30:.1f} GB free{'' if existing == path else ', not created yet'})")
        data[label] = {"path": str(path), "free_bytes": free, "exists": existing == path}
        if free < LOW_DISK_BYTES:
            low.append(label)
        # where it is (or will be made) must be a folder this user may write: `pull` and `export` fail there else
        if not existing.is_dir():
            unwritable.append(f"{label}: {existing} is a file, not a folder")
        elif not os.access(existing, os.W_OK | os.X_OK):
            unwritable.append(f"{label}: {existing} is not writable by this user")
    if unwritable:
        return Check("storage", FAIL, f"cannot write the cache ({'; '.join(unwritable)}); set XDG_CACHE_HOME / "
                     "HF_HOME to a folder you may write", tuple(notes), data, exit_code=4)
    if low:
        return Check("storage", WARN, f"under {LOW_DISK_BYTES // 2**30} GB free for: {', '.join(low)}",
                     tuple(notes), data)
    return Check("storage", OK, f"{len(folders)} cache folders, enough free disk", tuple(notes), data)


def free_space(path: Path) -> tuple[Path, int]:
    """(the nearest existing folder at or above ``path``, its free bytes)."""
    import shutil

    p = Path(path).expanduser()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p, shutil.disk_usage(p).free


def check_detector(name: str | None) -> Check:
    """YuNet (shipped) loads in OpenCV; SCRFD needs the insightface extra. Only the one asked for can fail."""
    from facellm_edge.runtime.detect import DEFAULT_DETECTOR, DetectorConfig, check_name, create_detector

    asked = check_name(name) if name is not None else None
    notes, data, yunet_code = [], {}, 6
    try:
        create_detector(DetectorConfig(name="yunet"))  # the shipped model, its sha256 checked, in OpenCV
        data["yunet"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported as the check's result
        missing = missing_runtime(exc) if isinstance(exc, ImportError) else None  # no OpenCV: no flavour
        err = missing or exc
        data["yunet"] = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        yunet_code = getattr(err, "exit_code", 6)
    try:  # imported only when asked for (a second or two); otherwise its distribution is looked up
        if asked == "scrfd":
            require("insightface", "insightface")
        elif dist_version("insightface") is None:
            raise MissingExtraError("insightface", "insightface")
        data["scrfd"] = "ok"
    except MissingExtraError as exc:
        data["scrfd"] = str(exc)
    notes.append("yunet (MIT, shipped): " + ("loads" if data["yunet"] == "ok" else "does not load"))
    notes.append("scrfd (InsightFace, non-commercial models): " + (
        f"insightface {dist_version('insightface')}" if data["scrfd"] == "ok" else
        "pip install 'facellm-edge[insightface]' to use it"))
    which = asked or DEFAULT_DETECTOR  # the one ask/run will use: it must work
    if data[which] != "ok":
        return Check("detector", FAIL, f"{which}: {data[which]}", tuple(notes), data,
                     exit_code=7 if which == "scrfd" else yunet_code)
    if which == "scrfd":  # its model is the user's to download (non-commercial): without one, --detector-model
        from facellm_edge.runtime.detect.scrfd import resolve_model

        try:
            model = resolve_model(None)
        except InputError as exc:
            return Check("detector", WARN, "scrfd: insightface installed; no model in the default pack (pass "
                         "--detector-model PATH)", tuple(notes) + (str(exc),), data)
        return Check("detector", OK, f"scrfd ready ({model})", tuple(notes), data)
    return Check("detector", OK, f"{which} ready", tuple(notes), data)


def check_bundle(spec: str, resolve: Callable[[str], Path]) -> Check:
    """The bundle ask/run would load from ``--bundle spec``, with every file's size and sha256 checked."""
    from facellm_edge.bundle import load_bundle

    root = resolve(spec)
    bundle = load_bundle(root, check_hashes=True)  # BundleError (exit 3) when damaged: a failed check
    m = bundle.manifest
    files = list(bundle.entries())
    size = sum(e.bytes for e in files)
    summary = f"{root}: {len(files)} files, {size / 2**20:.0f} MB, every sha256 matches"
    data = {"path": str(root), "files": len(files), "bytes": size}
    notes = []
    for attr in ("vision", "llm"):  # precision / quant -> file
        notes.append(f"{attr}: {', '.join(getattr(m, attr))}")
        data[attr] = list(getattr(m, attr))
    return Check("bundle", OK, summary, tuple(notes), data)


def check_python() -> Check:
    ok = sys.version_info >= (3, 10)
    return Check("python", OK if ok else FAIL,
                 f"{platform.python_version()} ({sys.executable}) on {platform.system()} {platform.machine()}"
                 + ("" if ok else ": facellm-edge needs Python 3.10 or newer"), exit_code=0 if ok else 1)
