"""A :class:`FaceSession`: one conversation about one face (or one set of whole images) in the LLM's KV cache.

:class:`~facellm_edge.runtime.pipeline.FaceLLM` opens it (the image is encoded and its prompt prefix decoded once);
every question after that (:meth:`FaceSession.ask`, :meth:`FaceSession.stream`) decodes only its own tokens on top
of the cached prefix, so a follow-up costs a warm time to first token, not a new encode. :meth:`FaceSession.close`
frees the cache cells; when more sessions are open than the cache keeps (``max_slots``, or the context is full),
the least recently used one is evicted, and using it afterwards raises :class:`SessionError` saying so.

The language model's generator owns the KV slots and their lock: a session is only a handle (its ``id`` is the
slot's key), safe to use from any thread; calls on one model are served one at a time, a stream holding the model
until it is exhausted or closed. Session ids are random (``secrets``), so a server can hand them to clients.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Collection, Iterator, Sequence

from facellm_edge.errors import UsageError
from facellm_edge.llm.decoding import drain
from facellm_edge.llm.generator import Answer, MissingSlot, check_question
from facellm_edge.llm.sampling import GenerationConfig
from facellm_edge.runtime.faces import Face

if TYPE_CHECKING:
    from facellm_edge.llm.generator import Generator

__all__ = ["FaceSession", "Opened", "SessionError", "answer_together", "answer_together_checked", "new_session_id",
           "stream_together", "stream_together_checked"]


def new_session_id() -> str:
    """A random, unguessable session id (the conversation's key in the KV cache)."""
    return secrets.token_urlsafe(12)


class SessionError(UsageError):
    """The session was closed, or evicted from the KV cache (more sessions than it keeps); open a new one."""


@dataclass(frozen=True)
class Opened:
    """How a session's image prefix was made: its tokens, tiles per image (whole images), stage timings (ms)."""

    n_prefix: int
    tiles: tuple[int, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)


class FaceSession:
    """One face's (or one set of images') conversation. Use as a context manager, or call :meth:`close`."""

    def __init__(self, generator: "Generator", defaults: GenerationConfig, face: Face | None, opened: Opened,
                 *, session_id: str, index: int = 0) -> None:
        self.id = session_id
        self.face = face  # the face record (box, landmarks, crop, timings of its stages); None for whole images
        self.index = index  # the face's position among the faces of its image (0 for whole images)
        self.n_prefix = opened.n_prefix  # tokens of the cached prefix (image blocks + template up to the question)
        self.tiles = opened.tiles
        self.timings = opened.timings  # how opening it went: preprocess, encode, image_prefill (ms)
        self.turns = 0  # questions answered in this conversation
        self._gen = generator
        self._defaults = defaults
        self._closed = False

    # -- questions ----------------------------------------------------------------------------------------
    def ask(self, question: str, *, max_tokens: int | None = None, temperature: float | None = None,
            generation: GenerationConfig | None = None, on_token: Callable[[str], None] | None = None) -> Answer:
        """Answer ``question`` in this conversation (the first question, or a follow-up). ``generation`` replaces
        the model's generation settings for this call; ``max_tokens`` / ``temperature`` override single fields.
        ``on_token`` gets each text piece as it is decoded."""
        return self.answer_checked(check_question(question), self._generation(generation, max_tokens, temperature),
                                   on_token)

    def stream(self, question: str, *, max_tokens: int | None = None, temperature: float | None = None,
               generation: GenerationConfig | None = None) -> Iterator[str]:
        """Yield the answer's text pieces as they are decoded; the final ``StopIteration.value`` is the
        :class:`~facellm_edge.llm.generator.Answer`. Other callers of the model wait until it ends or is closed."""
        gen = self._generation(generation, max_tokens, temperature)
        return self.stream_checked(check_question(question), gen)

    def answer_checked(self, question: str, gen: GenerationConfig,
                       on_token: Callable[[str], None] | None = None) -> Answer:
        """:meth:`ask` for a question and settings the caller has already checked (the runtime's own entry points)."""
        self._check_open()
        try:
            ans = self._gen.answer_checked(self.id, question, gen, on_token)
        except MissingSlot as exc:
            raise self._evicted() from exc
        self.turns += 1
        return ans

    def stream_checked(self, question: str, gen: GenerationConfig) -> Iterator[str]:
        self._check_open()
        try:
            ans = yield from self._gen.stream_checked(self.id, question, gen)
        except MissingSlot as exc:
            raise self._evicted() from exc
        self.turns += 1
        return ans

    # -- lifetime -----------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def cached(self) -> bool:
        """Whether the conversation is still in the KV cache (False once closed, evicted, or its model closed)."""
        if self._closed or self._gen.closed:
            return False
        try:
            return self._gen.has(self.id)
        except UsageError:
            if self._gen.closed:  # the model was closed on another thread since the check above
                return False
            raise

    def close(self) -> None:
        """Free this conversation's KV cells (idempotent)."""
        if not self._closed:
            if not self._gen.closed:
                self._gen.drop(self.id)  # may refuse (inside this session's own stream): then it stays open
            self._closed = True

    def __enter__(self) -> "FaceSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"FaceSession(id={self.id!r}, index={self.index}, turns={self.turns}, {state})"

    # -- internals ----------------------------------------------------------------------------------------
    def _generation(self, generation: GenerationConfig | None, max_tokens: int | None,
                    temperature: float | None) -> GenerationConfig:
        if generation is not None and not isinstance(generation, GenerationConfig):
            raise UsageError(f"generation must be a GenerationConfig, got {type(generation).__name__}")
        return (self._defaults if generation is None else generation).with_overrides(max_tokens, temperature)

    def _check_open(self) -> None:
        if self._closed:
            raise SessionError(f"session {self.id} is closed; open a new one (ask about the image again)")

    def _evicted(self) -> SessionError:
        self._closed = True
        return SessionError(
            f"session {self.id} was evicted from the KV cache: more conversations were opened than it keeps "
            f"(max_slots={self._gen.max_slots}, n_ctx={self._gen.n_ctx}); ask about the image again, or raise "
            "the context (--ctx / EngineConfig.n_ctx) and max_slots"
        )


def answer_together(sessions: Sequence[FaceSession], question: str, gen: GenerationConfig,
                    on_token: Callable[[int, str], None] | None = None) -> list[Answer]:
    """One question in several sessions of one model at once (e.g. every face of a frame): one llama_decode per
    step for all of them (:meth:`~facellm_edge.llm.generator.Generator.answer_many`). ``on_token(i, piece)`` gets
    ``sessions[i]``'s pieces. The question is checked here (:func:`check_question`)."""
    return answer_together_checked(sessions, check_question(question), gen, on_token)


def answer_together_checked(sessions: Sequence[FaceSession], question: str, gen: GenerationConfig,
                            on_token: Callable[[int, str], None] | None = None) -> list[Answer]:
    """:func:`answer_together` for a question its caller has already checked (the runtime's own entry points:
    ``FaceLLM.ask``, the live loop's ``LiveConfig`` / ``LiveControl``, the server's routes)."""
    return drain(stream_together_checked(sessions, question, gen),
                 None if on_token is None else lambda item: on_token(*item))


def stream_together(sessions: Sequence[FaceSession], question: str, gen: GenerationConfig,
                    cut: Collection[int] = ()) -> Iterator[tuple[int, str]]:
    """:func:`answer_together` as an iterator of (index into ``sessions``, text piece); its
    ``StopIteration.value`` is the answers. ``cut``: indices the caller adds while iterating stop there
    (:meth:`~facellm_edge.llm.generator.Generator.stream_many`). The question is checked here."""
    return (yield from stream_together_checked(sessions, check_question(question), gen, cut))


def stream_together_checked(sessions: Sequence[FaceSession], question: str, gen: GenerationConfig,
                            cut: Collection[int] = ()) -> Iterator[tuple[int, str]]:
    """:func:`stream_together` for a question its caller has already checked (:func:`check_question`)."""
    if not sessions:
        return []
    generators = {id(s._gen) for s in sessions}
    if len(generators) != 1:
        raise UsageError("sessions answered together must belong to one model")
    for s in sessions:
        s._check_open()
    try:
        answers = yield from sessions[0]._gen.stream_many_checked([s.id for s in sessions], question, gen, cut)
    except MissingSlot as exc:
        missing = next((s for s in sessions if not s._gen.has(s.id)), sessions[0])
        raise missing._evicted() from exc
    for s in sessions:
        s.turns += 1
    return answers
