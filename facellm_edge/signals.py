"""Ctrl-C / SIGTERM held around a call that must not be cut in the middle.

Python runs a signal's handler at the next bytecode of the main thread, wherever that is: inside a ctypes callback
of a llama.cpp model load (where the KeyboardInterrupt is lost: "Exception ignored on calling ctypes callback
function"), or between the creation of a temporary file and the statement that records it for cleanup (where the
file is orphaned). :func:`call_holding_signals` notes a SIGINT/SIGTERM that arrives during the call and delivers it
to its own handler once the call has returned, after ``release(result)`` has freed what the call made.
:func:`signal_held` lets a long C call's progress callback cancel it meanwhile. Used by the llama.cpp plumbing
(:mod:`facellm_edge.llm.native`), the live loop's shutdown and the atomic writes (:mod:`facellm_edge.io.files`).
"""

from __future__ import annotations

import signal
import threading
from typing import Callable, TypeVar

__all__ = ["call_holding_signals", "signal_held"]

T = TypeVar("T")
_held_signal: list[int | None] = [None]


def signal_held() -> bool:
    """Whether a SIGINT/SIGTERM arrived during the :func:`call_holding_signals` call under way."""
    return _held_signal[0] is not None


def call_holding_signals(fn: Callable[[], T], release: Callable[[T], None] | None = None) -> T:
    """Run ``fn`` with SIGINT/SIGTERM held; a signal that arrived meanwhile is delivered to its own handler
    (KeyboardInterrupt) once ``fn`` has returned, after ``release(result)`` frees what it made. Signals whose
    handler is not a Python function (ignored, default) and calls outside the main thread are left alone."""
    if threading.current_thread() is not threading.main_thread():
        return fn()

    def hold(signum: int, _frame: object) -> None:
        if _held_signal[0] is None:
            _held_signal[0] = signum

    saved = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if callable(handler):
            saved[sig] = handler
            signal.signal(sig, hold)
    result = None
    try:
        result = fn()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)  # runs a still-pending signal's handler (``hold``) first
        signum, _held_signal[0] = _held_signal[0], None
        if signum is not None:
            if result and release is not None:
                release(result)
            saved[signum](signum, None)
    return result
