"""A live frame source fed from outside the process: the browser's own camera (``--source browser``).

The kiosk page grabs frames with ``getUserMedia`` and POSTs them as JPEG to ``/v1/live/frames``; the server decodes
each one and hands it to :meth:`PushedSource.push`. Like a camera, the source keeps only the newest frame: a frame
that arrives before the loop took the previous one replaces it (counted in ``dropped``; the frame index still
advances, so the loop sees the gap). The loop waits on a condition variable for the next frame (no polling);
:meth:`close` wakes it and ends the iteration.
"""

from __future__ import annotations

import threading
from typing import Iterator

import numpy as np

from facellm_edge.runtime.live.sources import Frame, FrameSource

__all__ = ["BROWSER_SOURCE", "PushedSource"]

# The ``--source`` spec that selects this source (the browser-camera mode of the kiosk page).
BROWSER_SOURCE = "browser"


class PushedSource(FrameSource):
    """Frames pushed by another thread (the HTTP handlers); iterating yields the newest one not seen yet."""

    live = True
    description = "browser camera"

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._next = 0  # index of the next pushed frame
        self._closed = False
        self.pushed = 0
        self.dropped = 0  # pushed frames replaced by a newer one before the loop took them

    def push(self, image: np.ndarray) -> int:
        """Offer a BGR frame; returns its index. Raises :class:`RuntimeError` once the source is closed."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the browser frame source is closed")
            if self._latest is not None:
                self.dropped += 1
            index = self._next
            self._latest = Frame(index, image)
            self._next += 1
            self.pushed += 1
            self._cond.notify_all()
            return index

    def take(self, timeout: float | None = None) -> Frame | None:
        """The newest frame not taken yet (waits for one); None when closed or on timeout."""
        with self._cond:
            self._cond.wait_for(lambda: self._latest is not None or self._closed, timeout=timeout)
            frame, self._latest = self._latest, None
            return None if self._closed else frame

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    def __iter__(self) -> Iterator[Frame]:
        while True:
            frame = self.take()
            if frame is None:
                return
            yield frame

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._latest = None
            self._cond.notify_all()
