"""The model work of a request, run in the model's worker thread (:class:`~facellm_edge.serve.runner.ModelRunner`):
find the faces of an image, open or continue their sessions, answer the question in each, and report what happened
as events the routes turn into JSON or server-sent events.

Everything here blocks; nothing here runs on the event loop. Events:

* :class:`FaceOpened` — a face's session is ready (new, or a kept conversation continued);
* :class:`Piece` — a piece of its answer's text, as decoded;
* :class:`Replied` — its answer is complete (:class:`Reply`: text, finish reason, token counts, timings);
* :class:`NoFace` — the image has no face.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Union

from facellm_edge.errors import RuntimeStageError
from facellm_edge.llm.sampling import GenerationConfig
from facellm_edge.runtime.answers import FaceAnswer
from facellm_edge.runtime.session import FaceSession, SessionError, stream_together_checked
from facellm_edge.serve.errors import APIError
from facellm_edge.serve.images import ImageBytes, decode
from facellm_edge.serve.sessions import Entry, SessionStore, Turns

if TYPE_CHECKING:
    import numpy as np

    from facellm_edge.runtime.faces import Face
    from facellm_edge.runtime.pipeline import FaceLLM

__all__ = ["FaceChoice", "FaceOpened", "NoFace", "Piece", "Replied", "Reply", "StopScanner", "Task", "face_record",
           "faces_job", "followup_job", "parse_face_choice"]

log = logging.getLogger(__name__)

FaceChoice = Union[str, int]  # "largest" | "all" | a face index in detection order (most confident first)
EVICTED = "was evicted from the model's KV cache (more conversations than it keeps)"


def parse_face_choice(value: object, default: FaceChoice = "largest", param: str = "face") -> FaceChoice:
    """``"all"``, ``"largest"`` or a face index >= 0 (also as text); a 400 otherwise."""
    if value is None:
        return default
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not (value in ("all", "largest") or (isinstance(value, int) and value >= 0)):
        raise APIError(400, f"{param} must be \"all\", \"largest\" or a face index >= 0, got {value!r}",
                       code="invalid_face", param=param)
    return value


@dataclass(frozen=True)
class Reply:
    """One answer as the server reports it. ``finish_reason`` is OpenAI's (``stop`` | ``length``); ``stop_reason``
    the runtime's (``eos`` | ``length`` | ``grammar``, or ``stop`` when a stop string cut it)."""

    text: str
    finish_reason: str
    stop_reason: str
    n_prompt: int  # the image prefix + this question's tokens
    n_cached: int  # of those, already in the KV cache (a continued conversation's prefix)
    n_generated: int
    token_ids: tuple[int, ...]
    timings: dict[str, float]
    tokens_per_s: float


@dataclass(frozen=True)
class FaceOpened:
    choice: int  # the position of this face among the request's answers
    session: FaceSession
    continued: bool  # a kept conversation (no encode, no image prefill)
    reset: bool  # the client sent earlier turns but no kept conversation matched them: a new one was started


@dataclass(frozen=True)
class Piece:
    choice: int
    text: str


@dataclass(frozen=True)
class Replied:
    choice: int
    session: FaceSession
    reply: Reply
    first: bool  # the session's first answer (its record carries the image stages' timings)


@dataclass(frozen=True)
class NoFace:
    pass


Event = Union[FaceOpened, Piece, Replied, NoFace]


@dataclass(frozen=True)
class Task:
    """A question about the faces of one image. ``turns``: the conversation so far as the client holds it (chat
    completions); ``index``: keep the sessions findable by image, face and turns (chat) or by id only (native).
    ``question`` is checked by the route that makes the task (:func:`~facellm_edge.llm.generator.check_question`)."""

    image: ImageBytes
    question: str
    face: FaceChoice
    generation: GenerationConfig
    stops: tuple[str, ...] = ()
    turns: Turns = ()
    index: bool = True
    max_pixels: int = 0


class StopScanner:
    """Cuts streamed text at the first of ``stops``: text that may be the start of a stop string is held back until
    the next piece shows it is not. Only the end of the text that can still start a stop string is held (shorter
    than the longest stop), so the work per piece is bounded by the stops' lengths, not the answer's."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        """The text that is safe to send now (the cut answer's text once a stop string is found)."""
        if self.hit:
            return ""
        if not self.stops:
            return piece
        text = self._held + piece
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.hit, self._held = True, ""
            return text[:min(cuts)]
        keep = max(_partial(text, s) for s in self.stops)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _partial(text: str, stop: str) -> int:
    """The length of the longest end of ``text`` that ``stop`` starts with (and is shorter than ``stop``; a whole
    stop was looked for already): the text that must be held back."""
    i = text.find(stop[0], max(0, len(text) - len(stop) + 1))  # only the last len(stop) - 1 characters can start it
    while i >= 0:
        if stop.startswith(text[i:]):  # the first such position is the longest end
            return len(text) - i
        i = text.find(stop[0], i + 1)
    return 0


def answer(sessions: list[FaceSession], question: str, gen: GenerationConfig, stops: tuple[str, ...],
           choices: list[int], cached: list[int]) -> Iterator[Piece]:
    """Stream the answers to ``question`` in ``sessions`` (together: one llama_decode per step for all) as
    :class:`Piece` events of ``choices``; returns one :class:`Reply` each. A stop string ends only its own answer
    (the generator's per-face ``cut``: it stops at once, its last token pending). ``cached``: prompt tokens
    already in the KV cache per session (a continued conversation's prefix)."""
    scanners, parts = [StopScanner(stops) for _ in sessions], [[] for _ in sessions]
    cut: set[int] = set()
    run = stream_together_checked(sessions, question, gen, cut)
    try:
        while True:
            i, piece = next(run)
            text = scanners[i].feed(piece)
            if scanners[i].hit:
                cut.add(i)
            if text:
                parts[i].append(text)
                yield Piece(choices[i], text)
    except StopIteration as stop:
        answers = stop.value
    except RuntimeStageError as exc:
        if any(parts):
            raise
        raise APIError(400, str(exc), code="context_length_exceeded", param="messages") from None
    finally:
        run.close()
    replies = []
    for i, (session, ans) in enumerate(zip(sessions, answers)):
        tail = scanners[i].flush()
        if tail:
            parts[i].append(tail)
            yield Piece(choices[i], tail)
        cut_here = ans.stop_reason == "stop"  # by a stop string: the text is cut, so no token ids are reported
        replies.append(Reply("".join(parts[i]), "length" if ans.stop_reason == "length" else "stop",
                             ans.stop_reason, session.n_prefix + ans.n_prefilled, cached[i], ans.n_generated,
                             () if cut_here else ans.token_ids, dict(ans.timings), ans.tokens_per_s))
    return replies


def faces_job(model: "FaceLLM", store: SessionStore, task: Task) -> Iterator[Event]:
    """A question about one image: open (or continue) the chosen faces' sessions and answer in each."""
    sha, turns = task.image.sha256, task.turns
    if task.face != "all" and task.index and turns:
        entry = _claim(store, (sha, str(task.face)), turns)
        if entry is not None:  # a kept conversation: no decode, no detection, no encode
            yield from _converse(store, entry, 0, task, turns, continued=True)
            return
    image = decode(task.image, task.max_pixels)
    faces = model.detect(image)  # checks the image, once: the stages after it take it as checked
    picked = _pick(faces, task.face)
    if not picked:
        yield NoFace()
        return
    keys = {i: (sha, f"all:{i}" if task.face == "all" else str(task.face)) for i in picked}
    claimed = {i: _claim(store, keys[i], turns) for i in picked} if task.index and turns else {}
    if 1 < len(picked) <= model.generator.max_slots and not any(claimed.values()):
        yield from _converse_together(model, store, image, [faces[i] for i in picked], [keys[i] for i in picked],
                                      task)
        return
    try:
        model.encode_faces_checked(image, [faces[i] for i in picked if claimed.get(i) is None])
        for choice, i in enumerate(picked):
            entry = claimed.pop(i, None)
            continued = entry is not None
            if entry is None:
                entry = store.add(model.open_face(faces[i], index=i), keys[i] if task.index else None)
            yield from _converse(store, entry, choice, task, turns, continued=continued)
    finally:
        for entry in claimed.values():
            if entry is not None:  # not reached (an error, or the client went away): free them again
                store.release(entry)


def followup_job(model: "FaceLLM", store: SessionStore, session_id: str, question: str,
                 gen: GenerationConfig) -> Iterator[Event]:
    """A follow-up question in a kept session (native API)."""
    entry = store.acquire(session_id)
    task = Task(ImageBytes(b"", "the session's image"), question, entry.session.index, gen, index=False)
    yield from _converse(store, entry, 0, task, entry.turns, continued=True)


def _converse_together(model: "FaceLLM", store: SessionStore, image: "np.ndarray", faces: list["Face"],
                       keys: list[tuple[str, str]], task: Task) -> Iterator[Event]:
    """The picked faces of a new image answered together, as ``FaceLLM.ask`` does: encoded together (one encoder
    call on a GPU, face by face on the CPU), their image prefixes and every decoding step in shared llama_decode
    calls; a stop string ends only its own face."""
    model.encode_faces_checked(image, faces)  # checked by model.detect in faces_job
    sessions = model.open_encoded(faces)
    entries = [store.add(s, key if task.index else None) for s, key in zip(sessions, keys)]
    afters: dict[int, Turns] = {}
    try:
        for choice, s in enumerate(sessions):
            yield FaceOpened(choice, s, False, reset=bool(task.turns))
        replies = yield from answer(sessions, task.question, task.generation, task.stops,
                                    list(range(len(sessions))), [0] * len(sessions))
        for choice, (s, reply) in enumerate(zip(sessions, replies)):
            afters[choice] = task.turns + ((task.question, reply.text),)
            yield Replied(choice, s, reply, True)
    except SessionError:
        for s in sessions:
            if not s.cached:
                store.forget(s.id, EVICTED)
        raise
    finally:
        for choice, entry in enumerate(entries):
            store.release(entry, afters.get(choice))


def _claim(store: SessionStore, key: tuple[str, str], turns: Turns) -> Entry | None:
    entry = store.claim(key, turns)
    if entry is not None and not entry.session.cached:  # evicted by the model's own LRU meanwhile
        store.forget(entry.session.id, EVICTED)
        return None
    return entry


def _pick(faces: list["Face"], choice: FaceChoice) -> list[int]:
    if not faces:
        return []
    if choice == "all":
        return list(range(len(faces)))
    if choice == "largest":
        return [max(range(len(faces)), key=lambda i: faces[i].width * faces[i].height)]
    if choice >= len(faces):
        raise APIError(400, f"face {choice} was asked for but the image has {len(faces)} face"
                       f"{'s' if len(faces) != 1 else ''} (indices from 0, most confident first)",
                       code="invalid_face", param="face")
    return [choice]


def _converse(store: SessionStore, entry: Entry, choice: int, task: Task, before: Turns, *,
              continued: bool) -> Iterator[Event]:
    """Answer in ``entry``'s session; it is released (indexed under ``before`` + this turn when the answer is
    complete) whatever happens, and forgotten when the model had evicted it."""
    session, first = entry.session, entry.session.turns == 0
    after = None
    try:
        yield FaceOpened(choice, session, continued, reset=bool(task.turns) and not continued)
        (reply,) = yield from answer([session], task.question, task.generation, task.stops, [choice],
                                     [session.n_prefix if continued else 0])
        after = before + ((task.question, reply.text),)
        yield Replied(choice, session, reply, first)
    except SessionError:
        store.forget(session.id, EVICTED)
        raise
    finally:
        store.release(entry, after)


def face_record(session: FaceSession, reply: Reply, first: bool) -> dict:
    """The per-face JSON of ``ask --json`` (box, landmarks, score, answer, timings, session id). A session's first
    answer carries the image stages' timings too (detect, align, preprocess, encode, image_prefill)."""
    face = session.face
    timings = {**face.timings, **reply.timings} if first else dict(reply.timings)
    return FaceAnswer(index=session.index, box=tuple(float(v) for v in face.box), score=face.score,
                      landmarks=tuple((float(x), float(y)) for x, y in face.landmarks), text=reply.text,
                      token_ids=reply.token_ids, stop_reason=reply.stop_reason, timings=timings, session=session,
                      track_id=face.track_id).to_dict()
