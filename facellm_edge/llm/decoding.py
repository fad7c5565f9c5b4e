"""One answer being decoded: the per-face state of :meth:`facellm_edge.llm.generator.Generator.answer_many`'s
decoding loop (its tokens, text pieces, UTF-8 decoder, stop reason and clock), the :class:`Answer` it becomes, and
the loop's sampling step (:func:`sample_step`). The loop decodes one token per face per step for every face still
answering; each face stops on its own. The KV cache (slots, eviction, ``llama_decode``) stays the generator's."""

from __future__ import annotations

import codecs
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Collection, Generator, Hashable, Sequence, TypeVar

from facellm_edge.llm.slots import Slot

if TYPE_CHECKING:
    from facellm_edge.llm.engine import LlamaEngine
    from facellm_edge.llm.sampling import GenerationConfig, SamplerChain

__all__ = ["Answer", "FaceRun", "drain", "finish", "sample_step"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def drain(run: Generator[T, None, R], on_item: Callable[[T], None] | None = None) -> R:
    """Exhaust a streaming generator, handing each item to ``on_item``; return its return value. The generator is
    closed whatever happens (an exception from ``on_item`` abandons the stream cleanly)."""
    try:
        while True:
            item = next(run)
            if on_item is not None:
                on_item(item)
    except StopIteration as stop:
        return stop.value
    finally:
        run.close()


@dataclass(frozen=True)
class Answer:
    """One answer. ``timings`` (ms, :mod:`facellm_edge.timings` names): question_prefill, ttft, decode."""

    text: str
    token_ids: tuple[int, ...]  # generated tokens (an end-of-generation token that stopped it is not included)
    n_prefilled: int  # tokens decoded for this question (what it cost on top of the cached prefix)
    n_generated: int
    stop_reason: str  # "eos" | "length" | "grammar"
    timings: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0  # decode rate: tokens decoded after the first / decode time


class FaceRun:
    """The answer of one face in progress (``key``: the face; ``slot``: its conversation; ``segment``: the
    question's tokens)."""

    def __init__(self, key: Hashable, slot: Slot, segment: list[int]) -> None:
        self.key = key
        self.slot = slot
        self.segment = segment
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.stop = "length"
        self.steps = 0  # tokens decoded into the cache after the first sampled one
        self.t_first: float | None = None
        self.t_done: float | None = None
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def first_sampled(self) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()

    def stopped(self, reason: str | None = None) -> None:
        """This face is finished (``reason`` replaces the default "length")."""
        if reason is not None:
            self.stop = reason
        self.t_done = time.perf_counter()

    def take(self, token: int, piece: bytes) -> str:
        """A sampled token that belongs to the answer: kept pending (sampled, not yet in the cache, so a closed
        stream leaves the conversation consistent); returns its text (may be '' inside a UTF-8 sequence)."""
        self.tokens.append(token)
        self.slot.pending = token
        text = self._utf8.decode(piece)
        if text:
            self.pieces.append(text)
        return text

    def prefilled(self) -> None:
        """The question's tokens (and a pending token before them) are now in the cache."""
        self.slot.n_past += len(self.segment)
        self.slot.pending = None
        self.slot.asked = True

    def decoded(self) -> None:
        """The pending token is now in the cache."""
        self.slot.n_past += 1
        self.slot.pending = None
        self.steps += 1

    def flush(self) -> str:
        tail = self._utf8.decode(b"", final=True)
        if tail:
            self.pieces.append(tail)
        return tail

    def answer(self, t0: float, t_prefill: float) -> Answer:
        t_end = self.t_done or time.perf_counter()
        decode_s = t_end - (self.t_first or t_end)
        return Answer(
            text="".join(self.pieces), token_ids=tuple(self.tokens), n_prefilled=len(self.segment),
            n_generated=len(self.tokens), stop_reason=self.stop,
            timings={"question_prefill": (t_prefill - t0) * 1e3, "ttft": ((self.t_first or t_end) - t0) * 1e3,
                     "decode": decode_s * 1e3},
            tokens_per_s=self.steps / decode_s if self.steps and decode_s > 0 else 0.0,
        )


def sample_step(engine: "LlamaEngine", chains: Sequence["SamplerChain"], runs: Sequence[FaceRun],
                active: Sequence[int], rows: Sequence[int], *, eos: Collection[int], gen: "GenerationConfig",
                cut: Collection[int], n_ctx: int) -> Generator[tuple[int, str], None, list[int]]:
    """One step of the decoding loop: a token for each face still answering (``active``, indices into ``runs``;
    ``rows``: their logits rows of the last ``llama_decode``), each from its own sampler chain. Yields (face index,
    text piece); returns the faces that go on. A face stops on an end-of-generation token (when ``gen`` stops
    there), at ``gen.max_tokens``, when the ``n_ctx``-token context is full, or when the caller adds it to ``cut``
    (before this step, or on the piece it just got)."""
    going = []
    for i, row in zip(active, rows):
        r = runs[i]
        if i in cut:
            r.stopped("stop")
            continue
        token = engine.sample_at(chains[i].handle, row)
        r.first_sampled()
        if (token in eos or engine.is_eog(token)) and (gen.stop_at_eos or gen.grammar is not None):
            r.stopped("grammar" if gen.grammar is not None else "eos")
            continue
        text = r.take(token, engine.piece(token))
        if text:
            yield i, text
        if i in cut:  # the caller stopped this face on what it just got
            r.stopped("stop")
        elif len(r.tokens) >= gen.max_tokens:
            r.stopped()
        elif r.slot.n_past >= n_ctx:
            log.warning("face %r: the %d-token context is full; answer cut", r.key, n_ctx)
            r.stopped()
        else:
            going.append(i)
    return going


def finish(runs: Sequence[FaceRun], t0: float, t_prefill: float) -> Generator[tuple[int, str], None, list[Answer]]:
    """The end of the loop: yields each face's last text (a UTF-8 sequence cut short); returns the answers
    (``t0``: when the question's prefill began; ``t_prefill``: when it ended)."""
    for i, r in enumerate(runs):
        tail = r.flush()
        if tail:
            yield i, tail
    return [r.answer(t0, t_prefill) for r in runs]
