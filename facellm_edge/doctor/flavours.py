"""Runtime flavours: which ONNX Runtime and OpenCV distributions a runtime install is made of.

ONNX Runtime and OpenCV each come as several distributions that install into one folder (``onnxruntime/``,
``cv2/``): two of them in one environment overwrite each other's files, the last installed wins, and uninstalling
either breaks both. pip cannot drop a base requirement for an extra, so neither is a base dependency of
facellm-edge: an install names exactly one flavour (``pip install 'facellm-edge[cpu]'``), and this module says
which one is there, what is missing, and what clashes.
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import PackageNotFoundError, version

from facellm_edge.errors import FaceLLMEdgeError, MissingExtraError

log = logging.getLogger(__name__)

# extra -> (its ONNX Runtime distribution, its OpenCV distribution); pyproject.toml [project.optional-dependencies]
FLAVOURS: dict[str, tuple[str, str]] = {
    "cpu": ("onnxruntime", "opencv-python"),
    "gpu": ("onnxruntime-gpu", "opencv-python"),
    "headless": ("onnxruntime", "opencv-python-headless"),
    "gpu-headless": ("onnxruntime-gpu", "opencv-python-headless"),
}
# every distribution that installs the importable package (module name -> distributions)
PROVIDERS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
                    "onnxruntime-rocm", "onnxruntime-qnn"),
    "cv2": ("opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"),
}
WHAT = {"onnxruntime": "ONNX Runtime", "cv2": "OpenCV"}
INSTALL_HINT = "pip install 'facellm-edge[cpu]' (or [gpu], [headless], [gpu-headless]; README 'Install')"


class MissingRuntimeError(MissingExtraError):
    """ONNX Runtime or OpenCV is missing (or broken): no runtime flavour is installed. Exit code 7, as every
    missing extra."""

    def __init__(self, module: str, cause: BaseException | None = None) -> None:
        what = WHAT.get(module, module)
        if cause is None or (isinstance(cause, ModuleNotFoundError) and cause.name == module):
            msg = f"{what} is not installed ({module} cannot be imported): install one runtime flavour: {INSTALL_HINT}"
        else:  # installed but unusable: typically what is left after uninstalling one of two clashing flavours
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            dists = " ".join(PROVIDERS.get(module, (module,))[:2])
            msg = (f"{what} is installed but cannot be imported ({first}); reinstall one flavour: "
                   f"pip uninstall -y {dists} && {INSTALL_HINT}")
            if module == "cv2" and "libGL" in first:  # opencv-python on a machine without X11/OpenGL libraries
                msg += "; without a display, choose [headless]"
        FaceLLMEdgeError.__init__(self, msg)
        self.module = module


def missing_runtime(exc: ImportError) -> MissingRuntimeError | None:
    """The one-line error for an ImportError of ONNX Runtime or OpenCV (None for any other module): for the CLI's
    error handler, where a command module's ``import cv2`` fails before any facellm-edge code could say why."""
    name = (exc.name or "").split(".")[0]
    return MissingRuntimeError(name, exc) if name in PROVIDERS else None


def installed(module: str) -> dict[str, str]:
    """The distributions installed that provide ``module`` (``onnxruntime`` or ``cv2``): name -> version."""
    found = {}
    for dist in PROVIDERS[module]:
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found


def flavour() -> str | None:
    """The extra this environment matches (``cpu``, ``gpu``, ...), or None (none, or a mix)."""
    ort, cv = set(installed("onnxruntime")), set(installed("cv2"))
    for name, (want_ort, want_cv) in FLAVOURS.items():
        if ort == {want_ort} and cv == {want_cv}:
            return name
    return None


def clashes() -> list[str]:
    """One line per package installed by more than one distribution, with the fix."""
    out = []
    for module, what in WHAT.items():
        dists = installed(module)
        if len(dists) > 1:
            names = " ".join(dists)
            out.append(f"{len(dists)} {what} distributions share {module}/ ({', '.join(dists)}): the last installed "
                       f"overwrote the others; keep one: pip uninstall -y {names} && {INSTALL_HINT}")
    return out


@functools.lru_cache(maxsize=1)
def warn_clashes_once() -> None:
    for line in clashes():
        log.warning(line)
