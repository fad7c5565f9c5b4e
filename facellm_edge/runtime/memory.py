"""Process memory policy of the runtime (glibc only; a no-op elsewhere).

glibc serves allocations above a *dynamic* threshold with mmap and returns them to the OS on free; but each free
of such a block raises the threshold (up to 32 MiB), after which big blocks come from the heap and freed heap
memory stays resident. Loading ONNX Runtime's vision session after llama.cpp's model hit exactly that: the
session's transient copies of the 316 MB int8 graph stayed resident (+190 MB peak RSS for FaceLLM-1B,
benchmarks/README "memory"). A fixed threshold keeps big blocks on mmap, so freed activations and load buffers go back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
MMAP_THRESHOLD_BYTES = 1 << 20  # blocks >= 1 MiB: image activations, weights being loaded, not small objects
_done: list[bool] = []
_lock = threading.Lock()


def return_large_frees_to_os() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (once per process). Returns whether the policy is in effect."""
    with _lock:
        if _done:
            return _done[0]
        ok = False
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            if libc is not None:
                libc.gnu_get_libc_version  # glibc only: AttributeError on musl, macOS, Windows
                ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
        except (OSError, AttributeError):  # not glibc: its allocator has its own policy
            ok = False
        log.debug("glibc mmap threshold fixed at %d bytes: %s", MMAP_THRESHOLD_BYTES, ok)
        _done.append(ok)
        return ok
