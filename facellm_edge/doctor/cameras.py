"""Cameras: the devices this machine lists, and the ones that open (one frame read, its resolution).

Opening a camera takes a moment and may switch on its light, so cameras are only listed unless asked for
(``doctor --camera N`` opens N and fails when it does not open; ``--cameras`` opens every device listed). The
opener is the live loop's (:mod:`facellm_edge.runtime.live.sources`); tests hand in their own.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path
from typing import Any, Callable

from facellm_edge.doctor.report import FAIL, INFO, OK, Check

CAP_PROP_FPS = 5  # cv2.CAP_PROP_FPS (not imported: this module lists cameras without OpenCV)
Opener = Callable[[Any], Any]  # index -> an object with isOpened / read / get / release (cv2.VideoCapture's)


def camera_devices(dev: Path = Path("/dev")) -> list[int]:
    """Indices of the V4L2 devices (``/dev/videoN``) on Linux; [] elsewhere (no way to list without opening).
    Each USB camera usually has two nodes: the picture and a metadata node that does not open."""
    if not sys.platform.startswith("linux") or not dev.is_dir():
        return []
    return sorted(int(m.group(1)) for p in dev.iterdir() if (m := re.fullmatch(r"video(\d+)", p.name)))


def probe_camera(index: int, opener: Opener) -> dict[str, Any]:
    """Open camera ``index``, read one frame: {"index", "opens", "width", "height", "fps"} or {..., "error"}."""
    result: dict[str, Any] = {"index": index, "opens": False}
    cap = None
    try:
        cap = opener(index)
        if not cap.isOpened():
            result["error"] = "does not open"
            return result
        ok, frame = cap.read()
        if not ok or frame is None:
            result["error"] = "opens but gives no frame"
            return result
        height, width = frame.shape[:2]
        fps = float(cap.get(CAP_PROP_FPS) or 0.0)
        result.update(opens=True, width=int(width), height=int(height), fps=round(fps, 1))
    except Exception as exc:  # noqa: BLE001 - an opener's failure is this camera's result
        result["error"] = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    finally:
        if cap is not None:
            cap.release()
    return result


def _describe(r: dict[str, Any]) -> str:
    if r["opens"]:
        return f"camera {r['index']}: {r['width']}x{r['height']}" + (f" at {r['fps']:g} FPS" if r["fps"] else "")
    return f"camera {r['index']}: {r['error']}"


def check_cameras(asked: tuple[int, ...] = (), scan: bool = False, opener: Opener | None = None,
                  devices: list[int] | None = None) -> Check:
    """List the camera devices; open the ``asked`` ones (each must open) and, with ``scan``, every device listed."""
    devices = camera_devices() if devices is None else devices
    data: dict[str, Any] = {"devices": devices}
    to_open = sorted(set(asked) | (set(devices) if scan else set()))
    if not to_open:
        listed = ", ".join(f"/dev/video{i}" for i in devices) if devices else "none listed"
        return Check("cameras", INFO, f"devices: {listed} (not opened; --camera N or --cameras opens them)",
                     data=data)
    if opener is None:
        from facellm_edge.runtime.live.sources import _default_opener as opener
    with _opencv_quiet():
        results = [probe_camera(i, opener) for i in to_open]
    data["probed"] = results
    failed = [r for r in results if r["index"] in asked and not r["opens"]]
    notes = tuple(_describe(r) for r in results if r not in failed)
    if failed:
        return Check("cameras", FAIL, "; ".join(_describe(r) for r in failed), notes, data, exit_code=3)
    opened = [r["index"] for r in results if r["opens"]]
    summary = f"open: {', '.join(map(str, opened))}" if opened else "none of the listed devices opens"
    return Check("cameras", OK if opened else INFO, summary, notes, data)


@contextlib.contextmanager
def _opencv_quiet():
    """OpenCV logs several lines per camera that does not open (each capture backend it tried): the check says it
    in one line instead."""
    try:
        import cv2
    except ImportError:
        cv2 = None
    logging = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging is None:
        yield
        return
    previous = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        logging.setLogLevel(previous)
