"""The live loop's VLM worker: answers the standing question about each new track, off the frame loop's thread.

The frame loop hands it the newest frame's unanswered faces through a :class:`DropOldestSlot` (a queue of size one
that keeps only the newest job); it encodes them together, then answers them together (up to the model's
``max_slots`` at a time: their image prefixes and every decoding step share llama_decode calls), each in its track's
own :class:`~facellm_edge.runtime.session.FaceSession`, and closes a track's session when the track ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from facellm_edge.runtime.faces import Face
from facellm_edge.runtime.session import SessionError, answer_together_checked

if TYPE_CHECKING:
    from facellm_edge.runtime.pipeline import FaceLLM
    from facellm_edge.runtime.session import FaceSession

log = logging.getLogger(__name__)


class DropOldestSlot:
    """A queue of size 1: ``put`` replaces what is waiting; ``get`` waits on a condition (no polling).

    ``cond`` lets an owner share its condition (re-entrant lock) so that taking a job and marking itself busy
    happen atomically."""

    def __init__(self, cond: threading.Condition | None = None) -> None:
        self._cond = cond if cond is not None else threading.Condition()
        self._item: Any = None
        self._closed = False
        self.dropped = 0

    def put(self, item: Any) -> None:
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self._closed, timeout=timeout)
            item, self._item = self._item, None
            return item

    def pending(self) -> bool:
        with self._cond:
            return self._item is not None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass
class TrackAnswer:
    track_id: int
    frame: int
    face: Face
    seen: float  # perf_counter of the frame loop's first sight of the track
    source: str = ""  # the source's description (which camera, file or stream)
    question: str = ""  # what this answer answers (the standing question, or a follow-up's)
    follow_up: bool = False  # a later question in the track's session (LiveControl.ask_track)
    text: str = ""
    done: bool = False
    stop_reason: str = ""
    n_tokens: int = 0
    first_token: float | None = None  # perf_counter of the first answer piece
    session: "FaceSession | None" = None


class _Stopped(Exception):
    """Raised from the token callback to abandon an answer at shutdown."""


class VlmWorker(threading.Thread):
    """Answers ``question`` once per track with a :class:`~facellm_edge.runtime.pipeline.FaceLLM`, in one
    :class:`~facellm_edge.runtime.session.FaceSession` per track (closed when the track ends). Its questions (the
    standing one, :meth:`set_question`, :meth:`ask_track`) are checked where they enter: ``LiveConfig`` and
    :class:`~facellm_edge.runtime.live.control.LiveControl`."""

    def __init__(self, model: "FaceLLM", question: str, on_answer: Callable[[TrackAnswer], None],
                 on_piece: Callable[[TrackAnswer, str], None] | None = None) -> None:
        super().__init__(name="vlm-worker", daemon=True)
        self.model = model
        self.question = question  # the standing question (set_question changes it for tracks not answered yet)
        self.on_answer = on_answer
        self.on_piece = on_piece  # each streamed text piece (worker thread; keep it cheap)
        self._followups: deque[tuple[int, str]] = deque()
        self._stop_event = threading.Event()
        self._cond = threading.Condition()  # guards answers, seen, ended, busy and the job slot
        self.jobs = DropOldestSlot(self._cond)
        self._answers: dict[int, TrackAnswer] = {}  # live tracks taken by the worker
        self._seen: dict[int, float] = {}  # live tracks offered but not taken yet -> first sight
        self._ended: set[int] = set()
        self._busy = False
        self._cancel_wait = False
        self.error: BaseException | None = None

    # -- frame-loop side ------------------------------------------------------------------------------------
    def offer(self, frame_index: int, image: np.ndarray, faces: list[Face], source: str = "") -> None:
        """Hand over the faces of this frame whose track has no answer (started) yet. ``image``: the frame they were
        found in by ``FaceLLM.detect``, which checked it (it is not checked again here)."""
        now = time.perf_counter()
        with self._cond:
            new = [f for f in faces if f.track_id not in self._answers]
            for f in new:
                self._seen.setdefault(f.track_id, now)
        if new:
            self.jobs.put((frame_index, image, new, source))

    def end_tracks(self, track_ids: list[int]) -> None:
        with self._cond:
            self._ended.update(track_ids)
            for tid in track_ids:
                self._seen.pop(tid, None)
            self._cond.notify_all()

    @property
    def busy(self) -> bool:
        """Whether the worker is answering now (a plain read for the frame loop's detection pace; no lock)."""
        return self._busy

    def texts(self) -> dict[int, str]:
        with self._cond:
            return {tid: a.text for tid, a in self._answers.items()}

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no job is waiting and nothing is being answered."""
        with self._cond:
            return self._cond.wait_for(lambda: (not self._busy and not self.jobs.pending() and not self._followups)
                                       or not self.is_alive() or self._cancel_wait, timeout=timeout)

    def unanswered(self) -> int:
        """Faces seen whose answer is not complete (offered and not taken yet, or being answered)."""
        with self._cond:
            return len(self._seen) + sum(not a.done for a in self._answers.values())

    def cancel_wait(self) -> None:
        """End any :meth:`wait_idle` now (a stop request while the loop waits for the last answers)."""
        with self._cond:
            self._cancel_wait = True
            self._cond.notify_all()

    def stop(self) -> None:
        self._stop_event.set()
        self.jobs.close()

    def set_question(self, question: str) -> None:
        with self._cond:
            self.question = question

    def ask_track(self, track_id: int, question: str) -> bool:
        """Queue a follow-up question about a live track (answered in its session after new faces); False when the
        track is not live (never seen, or ended)."""
        with self._cond:
            if track_id not in self._answers or track_id in self._ended:
                return False
            self._followups.append((track_id, question))
            self._cond.notify_all()
            return True

    def tracks(self) -> dict[int, TrackAnswer]:
        with self._cond:
            return dict(self._answers)

    # -- worker side ---------------------------------------------------------------------------------------
    def run(self) -> None:
        pending: list[TrackAnswer] = []
        try:
            while not self._stop_event.is_set():
                with self._cond:  # take the work and mark busy atomically (wait_idle sees no gap)
                    self._cond.wait_for(lambda: pending or self.jobs.pending() or self._followups
                                        or self._stop_event.is_set())
                    job = self.jobs.get(timeout=0)
                    follow = self._followups.popleft() if job is None and not pending and self._followups else None
                    self._busy = job is not None or follow is not None or bool(pending)
                if job is not None:
                    pending.extend(self._take_new(*job))  # new tracks first
                self._close_ended(pending)
                if pending and not self._stop_event.is_set():
                    n = self.model.generator.max_slots
                    group, pending[:] = pending[:n], pending[n:]
                    self._answer(group)
                elif follow is not None and not self._stop_event.is_set():
                    self._follow_up(*follow)
                with self._cond:
                    self._busy = bool(pending) or bool(self._followups)
                    self._cond.notify_all()
        except _Stopped:
            pass
        except BaseException as exc:  # surfaced by the frame loop
            self.error = exc
            log.debug("VLM worker stopped: %s", exc)  # the frame loop raises it: the caller reports it once
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
            self._close_all()

    def _take_new(self, frame_index: int, image: np.ndarray, faces: list[Face], source: str) -> list[TrackAnswer]:
        """Register the job's new tracks and encode their crops together (answered together afterwards)."""
        with self._cond:
            faces = [f for f in faces if f.track_id not in self._answers and f.track_id not in self._ended]
            for f in faces:
                seen = self._seen.pop(f.track_id, time.perf_counter())
                self._answers[f.track_id] = TrackAnswer(f.track_id, frame_index, f, seen, source=source)
        if not faces:
            return []
        self.model.encode_faces_checked(image, faces)
        for f in faces:
            f.crop = None  # the embeddings are what the answer needs: no face pixels kept while it waits
        return [self._answers[f.track_id] for f in faces]

    def _close_ended(self, pending: list[TrackAnswer]) -> None:
        """Ended tracks: close their sessions (frees the KV cells) and forget them."""
        with self._cond:
            ended, self._ended = self._ended, set()
            gone = [self._answers.pop(tid) for tid in ended if tid in self._answers]
        for item in gone:
            if item.session is not None:
                item.session.close()
        pending[:] = [p for p in pending if p.track_id not in ended]

    def _close_all(self) -> None:
        with self._cond:
            items = list(self._answers.values())
        for item in items:
            if item.session is not None and not self.model.generator.closed:
                item.session.close()

    def _answer(self, items: list[TrackAnswer]) -> None:
        """The standing question about new tracks, all together, each in a new session."""
        with self._cond:
            for item in items:
                item.question = self.question
        # pinned: a prefill on another thread (serve's requests) waits rather than evict them before their answer
        sessions = self.model.open_encoded([item.face for item in items], pin=True)
        for item, session in zip(items, sessions):
            item.session = session
            item.face.embeds = None
        try:
            self._ask(items)
        finally:  # answered, or not at all (cancelled): their slots are evictable again either way
            if not self.model.generator.closed:
                self.model.generator.unpin([s.id for s in sessions])

    def _follow_up(self, track_id: int, question: str) -> None:
        """A follow-up about a live track, in its session (re-encoded never: an evicted session says so)."""
        from dataclasses import replace

        with self._cond:
            base = self._answers.get(track_id)
        if base is None or base.session is None or not base.done:  # ended meanwhile
            log.info("follow-up about track %d dropped: the track ended", track_id)
            return
        item = replace(base, question=question, follow_up=True, text="", done=False, stop_reason="",
                       n_tokens=0, first_token=None, seen=time.perf_counter())
        item.face.timings.pop("image_prefill", None)  # a follow-up pays no image prefill
        with self._cond:
            self._answers[track_id] = item
        self._ask([item])

    def _ask(self, items: list[TrackAnswer]) -> None:
        """Answer ``items`` (one question) together in their sessions; one evicted by another user of the model
        (the server) is reported as such and the others are answered."""
        def on_token(i: int, piece: str) -> None:
            if self._stop_event.is_set():
                raise _Stopped
            item = items[i]
            with self._cond:
                item.text += piece
                if item.first_token is None:
                    item.first_token = time.perf_counter()
            if self.on_piece is not None:
                self.on_piece(item, piece)

        while items:
            try:
                answers = answer_together_checked([item.session for item in items], items[0].question,
                                                  self.model.config.generation, on_token)
                break
            except SessionError as exc:
                gone = [item for item in items if not item.session.cached]
                if not gone:
                    raise
                for item in gone:
                    log.warning("track %d: %s", item.track_id, exc)
                    with self._cond:
                        item.done, item.stop_reason = True, "evicted"
                    self.on_answer(item)
                items = [item for item in items if item not in gone]
        else:
            return
        for item, ans in zip(items, answers):
            item.face.timings.update(ans.timings)
            with self._cond:
                item.text, item.done, item.stop_reason = ans.text, True, ans.stop_reason
                item.n_tokens = ans.n_generated
            self.on_answer(item)
