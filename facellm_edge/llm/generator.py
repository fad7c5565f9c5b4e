"""The llama.cpp generation engine of the runtime: image prefix per face in the KV cache, multi-turn questions.

A face's prompt prefix (``prompt.first`` up to the question, with the vision encoder's embeddings in place of the
``<IMG_CONTEXT>`` tokens, InternVL semantics) is decoded once into its own llama.cpp sequence by
:meth:`Generator.prefill_image`; :meth:`Generator.prefill_images` puts several images into one prompt (one
``<img>…</img>`` block per image, in order, joined by ``prompt.image_separator``, as the chat template renders
several images of one turn). Each question then decodes only its own tokens after it, and a follow-up decodes
only ``prompt.followup``. A system message (``prompt.system``) is tokenised as plain text inside the template's
system turn (``prompt.first_system``). Answers are sampled inside llama.cpp (:mod:`facellm_edge.llm.sampling`).
The KV layout is documented in :mod:`facellm_edge.llm.engine`.

Conversation invariants, per slot: the cache holds exactly ``n_past`` positions; the last generated token of an
answer that stopped on ``max_tokens`` is kept as ``pending`` and decoded with the next question; an end-of-turn
token is never decoded (``prompt.followup`` starts with it). Prompt text is tokenised with special tokens parsed;
the user's question is tokenised as plain text, so it cannot inject control tokens.
"""

from __future__ import annotations

import codecs
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable, Iterator, Sequence

import numpy as np

from facellm_edge.bundle import PromptSpec, TokenSpec
from facellm_edge.errors import BundleError, RuntimeStageError, UsageError
from facellm_edge.llm.engine import EngineConfig, LlamaEngine
from facellm_edge.llm.sampling import GenerationConfig, SamplerChain, schema_to_grammar
from facellm_edge.llm.slots import MissingSlot, Slot, SlotTable
from facellm_edge.llm.template import PromptTemplate

if TYPE_CHECKING:
    from facellm_edge.bundle import Bundle

__all__ = ["Answer", "EngineConfig", "GenerationConfig", "Generator", "MissingSlot", "check_question",
           "schema_to_grammar"]

log = logging.getLogger(__name__)


def check_question(question: object) -> str:
    """The question, or :class:`UsageError` when it is not a non-blank string (checked once, at the entry point)."""
    if not isinstance(question, str) or not question.strip():
        raise UsageError("the question is empty; ask something")
    return question


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


class Generator:
    """Answer questions about faces with a GGUF language model; one conversation (KV slot) per face key."""

    def __init__(self, gguf_path: Path, tokens: TokenSpec, prompt: PromptSpec, config: EngineConfig) -> None:
        self.tokens = tokens
        self.prompt = prompt
        self.config = config
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._engine = LlamaEngine(Path(gguf_path), config)
        try:
            self._template = PromptTemplate.build(prompt, tokens, self._engine)
        except BaseException:
            self._engine.close()
            raise
        self._eos = frozenset(tokens.eos_ids)
        self._slots = SlotTable(config.slots)

    @classmethod
    def from_bundle(cls, bundle: "Bundle", config: EngineConfig = EngineConfig(),
                    prompt: PromptSpec | None = None) -> "Generator":
        """The bundle's GGUF (``config.quant``) with its tokens and prompt (``prompt``: e.g.
        ``manifest.prompt.with_system(...)``)."""
        name, path = bundle.llm_file(config.quant)
        m = bundle.manifest
        gen = cls(path, m.tokens, m.prompt if prompt is None else prompt, config)
        if gen.n_embd != m.arch.llm_hidden:
            gen.close()
            raise BundleError(
                f"bundle {bundle.root}: llm/{name} has n_embd {gen.n_embd} but the manifest says "
                f"{m.arch.llm_hidden}; re-export the bundle"
            )
        return gen

    @property
    def n_embd(self) -> int:
        return self._engine.n_embd

    @property
    def n_ctx(self) -> int:
        return self._engine.n_ctx

    @property
    def closed(self) -> bool:
        return self._engine.closed

    @property
    def n_cached(self) -> int:
        """Conversations in the KV cache now."""
        self._acquire()
        try:
            return len(self._slots)
        finally:
            self._release()

    @property
    def max_slots(self) -> int:
        """Conversations the KV cache keeps at once (the least recently used is evicted beyond that)."""
        return self._slots.capacity

    # -- locking ------------------------------------------------------------------------------------------
    def _acquire(self) -> None:
        if self._owner == threading.get_ident():
            raise UsageError("Generator called from inside its own on_token callback or stream; finish that first")
        self._lock.acquire()
        self._owner = threading.get_ident()
        if self._engine.closed:
            self._release()
            raise UsageError("this Generator is closed")

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    # -- slots --------------------------------------------------------------------------------------------
    def has(self, key: Hashable) -> bool:
        self._acquire()
        try:
            return key in self._slots
        finally:
            self._release()

    def drop(self, key: Hashable) -> None:
        """Forget a face's conversation (no-op for an unknown key)."""
        self._acquire()
        try:
            if key in self._slots:
                self._evict(key)
        finally:
            self._release()

    def reset(self) -> None:
        """Forget every conversation."""
        self._acquire()
        try:
            self._slots.clear()
            self._engine.clear()
        finally:
            self._release()

    def _evict(self, key: Hashable) -> None:
        slot = self._slots.remove(key)
        self._engine.seq_clear(slot.seq)
        log.debug("evicted KV slot of %r (%d positions)", key, slot.n_past)

    def _make_room(self, key: Hashable, n_new: int) -> None:
        """Evict least recently used other faces until ``n_new`` more cells fit in the shared cache."""
        while self._slots.cells_used() + n_new > self._engine.n_cells:
            victim = self._slots.lru(exclude=key)
            if victim is None:
                return  # only this face is left; the callers' n_ctx checks bound it
            log.info("KV cache full: evicting face %r", victim)
            self._evict(victim)

    # -- prefill ------------------------------------------------------------------------------------------
    def prefill_image(self, key: Hashable, image_embeds: np.ndarray) -> int:
        """Decode the prompt prefix with ``image_embeds`` into ``key``'s slot (replacing it); returns its length."""
        return self.prefill_images(key, [image_embeds])

    def prefill_images(self, key: Hashable, images_embeds: Sequence[np.ndarray]) -> int:
        """Decode the prompt prefix with several images (each ``[tiles * tokens, n_embd]``, in order, one
        ``<img>…</img>`` block each) into ``key``'s slot (replacing it); returns the prefix length in tokens."""
        if isinstance(images_embeds, np.ndarray) or not images_embeds:
            raise UsageError("prefill_images takes a non-empty list of image embeddings (one array per image)")
        t = self._template
        if len(images_embeds) > 1 and t.sep is None:
            raise BundleError("this bundle's chat template cannot show several images in one question "
                              "(prompt.image_separator is null); ask about one image at a time")
        embeds = [self._check_embeds(e) for e in images_embeds]
        sep = t.sep or []
        n = len(t.pre) + sum(2 + e.shape[0] for e in embeds) + len(sep) * (len(embeds) - 1) + len(t.mid)
        if n >= self.n_ctx:
            raise RuntimeStageError(
                f"the image prompt needs {n} tokens but the context holds {self.n_ctx}; "
                "use fewer or smaller images (fewer tiles) or a larger --ctx"
            )
        self._acquire()
        try:
            if key in self._slots:
                self._evict(key)
            elif self._slots.full():
                victim = self._slots.lru()
                log.info("%d face slots in use: evicting face %r", self._slots.capacity, victim)
                self._evict(victim)
            self._make_room(key, n)
            slot = self._slots.add(key)
            eng, tk = self._engine, self.tokens
            try:
                pos, lead = 0, t.pre
                for e in embeds:
                    eng.decode_tokens(lead + [tk.image_start_id], slot.seq, pos, logits_last=False)
                    pos += len(lead) + 1
                    eng.decode_embeddings(e, slot.seq, pos, logits_last=False)
                    pos += e.shape[0]
                    lead = [tk.image_end_id] + sep
                eng.decode_tokens([tk.image_end_id] + t.mid, slot.seq, pos, logits_last=False)
            except BaseException:
                self._evict(key)
                raise
            slot.n_past = n
            return n
        finally:
            self._release()

    def prompt_tokens(self, image_rows: Sequence[int], question: str) -> list[int]:
        """The first turn as token ids, with ``image_context`` ids where :meth:`prefill_images` puts each image's
        embedding rows (``image_rows``: rows per image): what the checkpoint's processor makes ``input_ids`` of."""
        return self._template.first_turn(image_rows, self._engine.tokenize(question, special=False))

    def _check_embeds(self, image_embeds: np.ndarray) -> np.ndarray:
        if not isinstance(image_embeds, np.ndarray) or image_embeds.ndim != 2:
            raise UsageError(f"image_embeds must be a 2-D array [tokens, {self.n_embd}], got {_shape(image_embeds)}")
        rows, width = image_embeds.shape
        if width != self.n_embd:
            raise BundleError(
                f"image_embeds are {width} wide but the GGUF's n_embd is {self.n_embd}: the vision encoder and the "
                "LLM come from different models; re-export the bundle"
            )
        per_tile = self.tokens.num_image_tokens
        if rows == 0 or rows % per_tile:
            raise UsageError(f"image_embeds has {rows} rows; expected a positive multiple of {per_tile} (per tile)")
        if not np.isfinite(image_embeds).all():
            raise RuntimeStageError("image_embeds contain NaN or Inf; the vision encoder output is broken")
        return np.ascontiguousarray(image_embeds, dtype=np.float32)

    # -- questions ----------------------------------------------------------------------------------------
    def ask(self, key: Hashable, question: str, gen: GenerationConfig = GenerationConfig(),
            on_token: Callable[[str], None] | None = None) -> Answer:
        """Answer ``question`` about the face ``key`` (continuing its conversation); ``on_token`` gets text pieces."""
        return self.answer_checked(key, check_question(question), gen, on_token)

    def answer_checked(self, key: Hashable, question: str, gen: GenerationConfig,
                       on_token: Callable[[str], None] | None = None) -> Answer:
        """:meth:`ask` for a question its caller has already checked (:func:`check_question`)."""
        run = self._run(key, question, gen)
        try:
            while True:
                piece = next(run)
                if on_token is not None:
                    on_token(piece)
        except StopIteration as stop:
            return stop.value
        finally:
            run.close()

    def stream(self, key: Hashable, question: str, gen: GenerationConfig = GenerationConfig()) -> Iterator[str]:
        """Yield the answer's text pieces as they are decoded (UTF-8 safe); the final ``StopIteration.value`` is the
        :class:`Answer`. The Generator is busy (other callers wait) until the iterator is exhausted or closed; a
        closed-early answer stays in the conversation as far as it was generated."""
        return (yield from self._run(key, check_question(question), gen))

    def stream_checked(self, key: Hashable, question: str, gen: GenerationConfig) -> Iterator[str]:
        """:meth:`stream` for a question its caller has already checked (:func:`check_question`)."""
        return (yield from self._run(key, question, gen))

    def _question_tokens(self, slot: Slot, question: str) -> list[int]:
        t = self._template
        q = self._engine.tokenize(question, special=False)
        seg = (t.f_pre + q + t.f_post) if slot.asked else (q + t.post)
        return ([slot.pending] if slot.pending is not None else []) + seg

    def _run(self, key: Hashable, question: str, gen: GenerationConfig) -> Iterator[str]:
        self._acquire()
        t0 = time.perf_counter()  # after the lock: timings measure this answer, not the wait for another one
        try:
            if key not in self._slots:
                raise MissingSlot(
                    f"no image prefilled for face {key!r} (never prefilled, dropped, or evicted: max_slots="
                    f"{self._slots.capacity}); call prefill_image first"
                )
            slot = self._slots.touch(key)
            seg = self._question_tokens(slot, question)
            remain = self.n_ctx - slot.n_past
            if len(seg) > remain:
                raise RuntimeStageError(
                    f"question needs {len(seg)} tokens but only {remain} remain in the {self.n_ctx}-token context; "
                    "use a shorter question or a larger --ctx"
                )
            eng = self._engine
            with SamplerChain(eng.lib, eng.vocab, eng.n_vocab, gen, self.config.seed) as chain:
                self._make_room(key, len(seg))
                try:
                    eng.decode_tokens(seg, slot.seq, slot.n_past, logits_last=True)
                except BaseException:
                    self._evict(key)  # a partly decoded question leaves the cache in an unknown state
                    raise
                slot.n_past += len(seg)
                slot.pending = None
                slot.asked = True
                t_prefill = time.perf_counter()
                out: list[int] = []
                pieces: list[str] = []
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                t_first = None
                steps = 0
                stop = "length"
                while True:
                    token = eng.sample(chain.handle)
                    if t_first is None:
                        t_first = time.perf_counter()
                    if (token in self._eos or eng.is_eog(token)) and (gen.stop_at_eos or gen.grammar is not None):
                        stop = "grammar" if gen.grammar is not None else "eos"
                        break
                    out.append(token)
                    slot.pending = token  # sampled, not yet in the cache: stays consistent if the stream is closed
                    text = decoder.decode(eng.piece(token))
                    if text:
                        pieces.append(text)
                        yield text
                    if len(out) >= gen.max_tokens:
                        break
                    if slot.n_past >= self.n_ctx:
                        log.warning("face %r: the %d-token context is full; answer cut", key, self.n_ctx)
                        break
                    self._make_room(key, 1)
                    try:
                        eng.decode_tokens([token], slot.seq, slot.n_past, logits_last=True)
                    except BaseException:
                        self._evict(key)
                        raise
                    slot.n_past += 1
                    slot.pending = None
                    steps += 1
                tail = decoder.decode(b"", final=True)
                if tail:
                    pieces.append(tail)
                    yield tail
            t_end = time.perf_counter()
            decode_s = t_end - (t_first or t_end)
            return Answer(
                text="".join(pieces),
                token_ids=tuple(out),
                n_prefilled=len(seg),
                n_generated=len(out),
                stop_reason=stop,
                timings={"question_prefill": (t_prefill - t0) * 1e3, "ttft": ((t_first or t_end) - t0) * 1e3,
                         "decode": decode_s * 1e3},
                tokens_per_s=steps / decode_s if steps and decode_s > 0 else 0.0,
            )
        finally:
            self._release()

    # -- lifetime -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the model and context (idempotent; waits for a running answer on another thread)."""
        if self._owner == threading.get_ident():
            raise UsageError("Generator closed from inside its own on_token callback or stream; finish that first")
        with self._lock:
            self._slots.clear()
            self._engine.close()

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shape(x: object) -> str:
    return str(getattr(x, "shape", type(x).__name__))
