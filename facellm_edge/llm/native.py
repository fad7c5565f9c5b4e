"""llama.cpp process-wide plumbing: its log hook routed to :mod:`logging`, and Ctrl-C / SIGTERM held during long
llama.cpp calls (model loads, context creation) so they cancel cleanly. Used by the engine, export and bench."""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from typing import Any

from facellm_edge.signals import call_holding_signals, signal_held

__all__ = ["install_log_hook", "load_model", "progress_callback"]


# -- llama.cpp log routing ------------------------------------------------------------------------------
# ggml log levels of this llama.cpp: 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous message.
_LEVELS = {3: logging.WARNING, 4: logging.ERROR}
# Load-time warnings every Qwen2 GGUF triggers (e.g. "'</s>' was not control-type"): harmless, logged at DEBUG.
_BENIGN = (b"load: control-looking token",)
_llama_log = logging.getLogger("facellm_edge.llama_cpp")
_log_state = {"forward": False, "level": 0}
_log_lock = threading.Lock()
_log_installed: list[object] = []  # keeps the ctypes callback alive; llama.cpp's log hook is process-wide


def install_log_hook(llama_cpp) -> Any:
    """Route llama.cpp's stderr chatter to :mod:`logging`: warnings and errors only, debug/info dropped.

    llama.cpp has one process-wide log hook; it is (re)installed whenever an engine is created and another hook is
    active, so a Generator's loads are always routed this way. Returns the ctypes callback (libmtmd takes the same
    one: ``mtmd_log_set``)."""
    with _log_lock:
        if not _log_installed:

            @llama_cpp.llama_log_callback
            def _callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
                if level == 5:
                    forward = _log_state["forward"]
                    py_level = _log_state["level"]
                else:
                    py_level = _LEVELS.get(level, 0)
                    if py_level and text.startswith(_BENIGN):
                        py_level = logging.DEBUG
                    forward = py_level > 0
                    _log_state["forward"] = forward
                    _log_state["level"] = py_level
                if forward and _llama_log.isEnabledFor(py_level):
                    msg = text.decode("utf-8", errors="replace").rstrip("\n")
                    if msg:
                        _llama_log.log(py_level, "%s", msg)

            _log_installed.append(_callback)
            llama_cpp.llama_backend_init()
        ours = _log_installed[0]
        current = llama_cpp.llama_log_callback()
        user = ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(current), ctypes.byref(user))
        if ctypes.cast(current, ctypes.c_void_p).value != ctypes.cast(ours, ctypes.c_void_p).value:
            llama_cpp.llama_log_set(ours, ctypes.c_void_p(0))
        return ours


# -- Ctrl-C / SIGTERM during long llama.cpp calls --------------------------------------------------------
# Python runs a signal's handler at the next bytecode of the main thread. During a model load that is inside
# llama.cpp's ctypes log callback: the KeyboardInterrupt is raised there, ctypes prints "Exception ignored on calling
# ctypes callback function" and the load carries on. So while llama.cpp works, SIGINT/SIGTERM only note the signal
# (facellm_edge.signals.call_holding_signals); the load's progress callback then returns false (llama.cpp cancels
# the load), and once the C call has returned the signal's own handler runs (KeyboardInterrupt, or the CLI's SIGTERM
# handling).
_progress_installed: list[object] = []  # keeps the ctypes progress callback alive


def progress_callback(llama_cpp) -> Any:
    """llama.cpp model-load progress callback that cancels the load once Ctrl-C / SIGTERM arrived."""
    if not _progress_installed:

        @llama_cpp.llama_progress_callback
        def _progress(_progress: float, _user: ctypes.c_void_p) -> bool:
            return not signal_held()

        _progress_installed.append(_progress)
    return _progress_installed[0]


def load_model(llama_cpp, path: Path, mparams) -> Any:
    """``llama_model_load_from_file`` that Ctrl-C / SIGTERM cancel (raising KeyboardInterrupt); NULL on failure."""
    mparams.progress_callback = progress_callback(llama_cpp)
    return call_holding_signals(lambda: llama_cpp.llama_model_load_from_file(str(path).encode(), mparams),
                                llama_cpp.llama_model_free)
