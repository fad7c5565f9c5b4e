"""Steer a running live loop from other threads (the HTTP server, a robot program): events out; the standing
question, follow-up questions and stop in.

Events are ``on_event(kind, payload)`` calls, made from the frame loop's thread (``tracks``, ``track_appeared``,
``track_lost``) and from the VLM worker's (``token``, ``answer``); keep the callback cheap (hand the payload to a
queue). ``on_frame(image)`` gets each annotated frame (BGR, the frame loop's thread). Payloads are JSON-safe:

=================  ============================================================================================
``tracks``         ``{"frame", "tracks": [{"track_id", "box", "score"}]}`` every frame
``track_appeared`` ``{"frame", "track_id", "box"}``
``track_lost``     ``{"frame", "track_id"}``
``token``          ``{"track_id", "question", "text"}`` one streamed piece of an answer
``answer``         the answer's record (the ``--jsonl`` line: track, box, question, answer, timings, ...)
=================  ============================================================================================
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable

import numpy as np

from facellm_edge.llm.generator import check_question

if TYPE_CHECKING:
    from facellm_edge.runtime.live.worker import VlmWorker

EventSink = Callable[[str, dict], None]
FrameSink = Callable[[np.ndarray], None]


class LiveControl:
    """Handed to :func:`~facellm_edge.runtime.live.loop.run_live`; usable from any thread while it runs."""

    def __init__(self, on_event: EventSink | None = None, on_frame: FrameSink | None = None) -> None:
        self.on_event = on_event
        self.on_frame = on_frame
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._worker: "VlmWorker | None" = None
        self._question: str | None = None

    # -- in ---------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """End the loop after the current frame, or its wait for the last answers of a file (outputs are
        finalised as for the end of a source)."""
        self._stop.set()
        with self._lock:
            if self._worker is not None:
                self._worker.cancel_wait()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def set_question(self, question: str) -> None:
        """Change the standing question: faces that have no answer yet get this one."""
        check_question(question)
        with self._lock:
            self._question = question
            if self._worker is not None:
                self._worker.set_question(question)

    @property
    def question(self) -> str | None:
        with self._lock:
            return self._worker.question if self._worker is not None else self._question

    def ask_track(self, track_id: int, question: str) -> bool:
        """Ask a live track a follow-up now (in its session: no re-encoding); False when no such track is live or
        the loop is not running."""
        check_question(question)
        with self._lock:
            return self._worker is not None and self._worker.ask_track(track_id, question)

    def tracks(self) -> list[dict]:
        """The live tracks the worker has taken: id, box, question, (partial) answer, done."""
        with self._lock:
            worker = self._worker
        if worker is None:
            return []
        return [{"track_id": tid, "box": a.face.box_json(), "question": a.question, "answer": a.text, "done": a.done}
                for tid, a in sorted(worker.tracks().items())]

    # -- used by the loop ---------------------------------------------------------------------------------------
    def attach(self, worker: "VlmWorker | None") -> None:
        with self._lock:
            self._worker = worker
            if worker is not None and self._question is not None:
                worker.set_question(self._question)
            if worker is not None and self._stop.is_set():
                worker.cancel_wait()

    def emit(self, kind: str, payload: dict) -> None:
        if self.on_event is not None:
            self.on_event(kind, payload)
