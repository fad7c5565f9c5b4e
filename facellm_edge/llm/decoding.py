"""One answer being decoded: the per-face state of :meth:`facellm_edge.llm.generator.Generator.answer_many`'s
decoding loop (its tokens, text pieces, UTF-8 decoder, stop reason and clock), and the :class:`Answer` it becomes.
The loop decodes one token per face per step for every face still answering; each face stops on its own."""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Callable, Generator, TypeVar

from facellm_edge.llm.slots import Slot

__all__ = ["Answer", "FaceRun", "drain"]

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
    """The answer of one face in progress (``slot``: its conversation; ``segment``: the question's tokens)."""

    def __init__(self, slot: Slot, segment: list[int]) -> None:
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
