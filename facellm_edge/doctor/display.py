"""Whether ``run`` can open a window here: a display to draw on, and an OpenCV built with a GUI.

On Linux (and the BSDs) Qt, which opencv-python's ``imshow`` runs on, aborts the whole process (SIGABRT, exit code
134) when there is nothing to draw on. Qt draws on X11 (``DISPLAY``), Wayland (``WAYLAND_DISPLAY``) or whatever
``QT_QPA_PLATFORM`` names (``eglfs`` / ``linuxfb`` on a kiosk's framebuffer, ``offscreen``); with none of them,
``run`` goes headless instead. opencv-python-headless (the ``[headless]`` flavours) has no GUI at all.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

DISPLAY_VARIABLES = ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")


def opencv_gui(build_information: str | None = None) -> str | None:
    """The GUI backend OpenCV was built with (``QT5``, ``GTK3``, ``COCOA``, ``WIN32UI``...), None when it has none
    (opencv-python-headless) or when OpenCV is not installed."""
    if build_information is None:
        try:
            import cv2
        except ImportError:
            return None
        build_information = cv2.getBuildInformation()
    lines = build_information.splitlines()
    for i, line in enumerate(lines):
        key, _, value = line.strip().partition(":")
        if key != "GUI":
            continue
        value = value.strip()
        if value:
            return None if value.upper() in ("NONE", "NO") else value
        for sub in lines[i + 1:]:  # older builds: "GUI:" then one line per toolkit ("GTK+: YES (ver 3.24)")
            name, _, state = sub.strip().partition(":")
            if not sub.strip() or not sub.startswith("    "):
                break
            if state.strip().upper().startswith("YES"):
                return name.strip()
        return None
    return None


def display_problem(env: Mapping[str, str] | None = None, platform: str | None = None,
                    gui: str | None | bool = True) -> str | None:
    """Why a window cannot open here (one phrase), or None when it can.

    ``gui``: the OpenCV GUI backend (:func:`opencv_gui`), or True to look it up."""
    env = os.environ if env is None else env
    platform = sys.platform if platform is None else platform
    if (platform.startswith("linux") or "bsd" in platform) and not any(env.get(v) for v in DISPLAY_VARIABLES):
        return "no display (DISPLAY, WAYLAND_DISPLAY and QT_QPA_PLATFORM are unset)"
    if gui is True:
        gui = opencv_gui()
    if not gui:
        return "this OpenCV has no GUI (opencv-python-headless, or none; the [cpu] and [gpu] flavours have one)"
    return None
