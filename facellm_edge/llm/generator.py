"""The llama.cpp generation engine of the runtime: image prefix per face in the KV cache, multi-turn questions.

A face's prompt prefix (``prompt.first`` up to the last image's embeddings, which stand in place of the
``<IMG_CONTEXT>`` tokens, InternVL semantics) is decoded once into its own llama.cpp sequence by
:meth:`Generator.prefill_image`; :meth:`Generator.prefill_images` puts several images into one prompt (one
``<img>…</img>`` block per image, in order, joined by ``prompt.image_separator``, as the chat template renders
several images of one turn). The first question then decodes the rest of the first turn (``</img>``, the text up
to the question, the question, the assistant header: llama.cpp's own mtmd helpers split a turn the same way), and
a follow-up decodes only ``prompt.followup``. A system message (``prompt.system``) is tokenised as plain text
inside the template's system turn (``prompt.first_system``). Answers are sampled inside llama.cpp
(:mod:`facellm_edge.llm.sampling`). The KV layout is documented in :mod:`facellm_edge.llm.engine`.

Conversation invariants, per slot: the cache holds exactly ``n_past`` positions; the last generated token of an
answer that stopped on ``max_tokens`` is kept as ``pending`` and decoded with the next question; an end-of-turn
token is never decoded (``prompt.followup`` starts with it). Prompt text is tokenised with special tokens parsed;
the user's question is tokenised as plain text, so it cannot inject control tokens.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Collection, Hashable, Iterator, Sequence

import numpy as np

from facellm_edge.bundle import PromptSpec, TokenSpec
from facellm_edge.errors import BundleError, RuntimeStageError, UsageError
from facellm_edge.llm.decoding import Answer, FaceRun, drain, finish, sample_step
from facellm_edge.llm.engine import EngineConfig, LlamaEngine
from facellm_edge.llm.sampling import GenerationConfig, SamplerChain, schema_to_grammar
from facellm_edge.llm.slots import MissingSlot, Slot, SlotTable
from facellm_edge.llm.template import PromptTemplate

if TYPE_CHECKING:
    from facellm_edge.bundle import Bundle

__all__ = ["Answer", "Generator", "MissingSlot", "check_question", "schema_to_grammar"]

log = logging.getLogger(__name__)


def check_question(question: object) -> str:
    """The question, or :class:`UsageError` when it is not a non-blank string of text (checked once, at the entry
    point, so a bad question fails before any image work)."""
    if not isinstance(question, str) or not question.strip():
        raise UsageError("the question is empty; ask something")
    try:
        question.encode("utf-8")  # the tokenizer takes UTF-8: a lone surrogate would fail only after the prefill
    except UnicodeEncodeError as exc:
        # chained: the CLI turns it into its own message naming the argument whose bytes were not UTF-8
        raise UsageError(f"the question is not valid text: it holds {question[exc.start]!r} at character "
                         f"{exc.start}, half of a surrogate pair; send it as UTF-8") from exc
    return question


class Generator:
    """Answer questions about faces with a GGUF language model; one conversation (KV slot) per face key."""

    def __init__(self, gguf_path: Path, tokens: TokenSpec, prompt: PromptSpec, config: EngineConfig) -> None:
        self.tokens = tokens
        self.prompt = prompt
        self.config = config
        self._lock = threading.Lock()
        self._owner: int | None = None
        # Conversations prefilled for an answer that has not run yet, and the thread that prefilled them: not
        # evicted meanwhile (another thread's prefill waits on _unpinned instead), or a one-shot ask on one thread
        # lost the faces it had just opened to a prefill on another (prefill_many's ``pin``)
        self._pins: dict[Hashable, int] = {}
        self._unpinned = threading.Condition(self._lock)
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
            raise UsageError("the model is closed; load the bundle again (FaceLLM.load)")

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
            self._unpin_all()
        finally:
            self._release()

    def _evict(self, key: Hashable) -> None:
        slot = self._slots.remove(key)
        self._engine.seq_clear(slot.seq)
        if self._pins.pop(key, None) is not None:
            self._unpinned.notify_all()
        log.debug("evicted KV slot of %r (%d positions)", key, slot.n_past)

    def unpin(self, keys: Collection[Hashable]) -> None:
        """End ``keys``' pins (see :meth:`prefill_many`) without an answer: a caller that pinned them and will not
        ask in them after all."""
        self._acquire()
        try:
            if any([self._pins.pop(k, None) is not None for k in keys]):
                self._unpinned.notify_all()
        finally:
            self._release()

    def _unpin_all(self) -> None:
        self._pins.clear()
        self._unpinned.notify_all()

    def _wait_for_unpin(self) -> None:
        """Wait (the lock released meanwhile) until another thread's pinned conversations are answered or dropped.
        Pins of this thread alone cannot go while it waits: that is a usage error, not a deadlock."""
        me = threading.get_ident()
        if all(owner == me for owner in self._pins.values()):
            raise UsageError(f"all {self._slots.capacity} KV slots (max_slots) hold conversations opened for an "
                             "answer that has not run yet; answer or close them first")
        self._owner = None
        try:
            self._unpinned.wait()
        finally:
            self._owner = me
        if self._engine.closed:
            raise UsageError("the model was closed while this call waited for a KV slot")

    def _make_room(self, keys: Collection[Hashable], n_new: int) -> None:
        """Evict least recently used faces other than ``keys`` (and pinned ones) until ``n_new`` more cells fit in
        the shared cache."""
        keep = set(keys) | set(self._pins)
        while self._slots.cells_used() + n_new > self._engine.n_cells:
            victim = self._slots.lru(exclude=keep)
            if victim is None:
                return  # only these faces are left; the callers' n_ctx checks bound them
            log.info("KV cache full: evicting face %r", victim)
            self._evict(victim)

    # -- prefill ------------------------------------------------------------------------------------------
    def prefill_image(self, key: Hashable, image_embeds: np.ndarray) -> int:
        """Decode the prompt prefix with ``image_embeds`` into ``key``'s slot (replacing it); returns its length."""
        return self.prefill_images(key, [image_embeds])

    def prefill_images(self, key: Hashable, images_embeds: Sequence[np.ndarray], *, pin: bool = False) -> int:
        """Decode the prompt prefix with several images (each ``[tiles * tokens, n_embd]``, in order, one
        ``<img>…</img>`` block each) into ``key``'s slot (replacing it); returns the prefix length in tokens.
        ``pin``: as :meth:`prefill_many`."""
        if isinstance(images_embeds, np.ndarray) or not images_embeds:
            raise UsageError("prefill_images takes a non-empty list of image embeddings (one array per image)")
        return self.prefill_many([(key, images_embeds)], pin=pin)[0]

    def prefill_many(self, items: Sequence[tuple[Hashable, Sequence[np.ndarray]]], *,
                     pin: bool = False) -> list[int]:
        """Prefill several conversations at once (e.g. every new face of a frame): ``items`` are (key, the images'
        embeddings), each as :meth:`prefill_images` takes them. The faces' rows share each ``llama_decode`` call.
        At most ``max_slots`` keys, all different, each with the same number of images. Returns the prefix
        lengths. ``pin``: the new conversations are not evicted until their first answer has run (or they are
        dropped) — a prefill on another thread that needs their slots waits meanwhile."""
        keys = [k for k, _ in items]
        if not items or len(set(keys)) != len(keys) or len(keys) > self._slots.capacity:
            raise UsageError(f"prefill_many takes 1..{self._slots.capacity} (max_slots) different keys, "
                             f"got {len(keys)}")
        t = self._template
        n_images = {len(e) for _, e in items}
        if len(n_images) != 1 or 0 in n_images:
            raise UsageError("prefill_many: every key needs the same, non-zero number of images")
        texts = t.image_texts(n_images.pop())  # the template's layout: pre <img> | image | </img> sep <img> | ...
        embeds = [[self._check_embeds(e) for e in images] for _, images in items]
        segments = [[x for text, e in zip(texts, images) for x in (text, e)] for images in embeds]
        lengths = [sum(len(x) for x in segs) for segs in segments]
        if max(lengths) >= self.n_ctx:
            raise RuntimeStageError(
                f"the image prompt needs {max(lengths)} tokens but the context holds {self.n_ctx}; "
                "use fewer or smaller images (fewer tiles) or a larger --ctx"
            )
        self._acquire()
        try:
            for k in keys:
                if k in self._slots:
                    self._evict(k)
            while self._slots.capacity - len(self._slots) < len(keys):
                victim = self._slots.lru(exclude=self._pins)
                if victim is None:  # every slot holds a conversation another thread is about to answer
                    self._wait_for_unpin()
                    continue
                log.info("%d face slots in use: evicting face %r", self._slots.capacity, victim)
                self._evict(victim)
            self._make_room(keys, sum(lengths))
            slots = [self._slots.add(k) for k in keys]
            if pin:
                self._pins.update((k, threading.get_ident()) for k in keys)
            with self._evicted_on_failure(keys):
                pos = [0] * len(slots)
                for j in range(len(segments[0])):
                    self._engine.decode_packed([(segs[j], s.seq, p) for segs, s, p in zip(segments, slots, pos)],
                                               logits_last=False)
                    pos = [p + len(segs[j]) for segs, p in zip(segments, pos)]
                # a GPU backend returns before the work is done: the prefill's time (and a failure) is its own,
                # not the first question's
                self._engine.synchronize()
            for s, n in zip(slots, lengths):
                s.n_past = n
            return lengths
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
        return drain(self._run(key, question, gen), on_token)

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
        # the first question also decodes the end of the image prefix (see prefill_many)
        seg = (t.f_pre + q + t.f_post) if slot.asked else (t.question_head() + q + t.post)
        return ([slot.pending] if slot.pending is not None else []) + seg

    def answer_many(self, keys: Sequence[Hashable], question: str, gen: GenerationConfig = GenerationConfig(),
                    on_token: Callable[[int, str], None] | None = None) -> list[Answer]:
        """Answer ``question`` about several faces at once: their question tokens are decoded in one batch and
        every decoding step samples one token per face (each face with its own sampler, stop and length) in one
        ``llama_decode``. ``on_token(i, piece)`` gets face ``keys[i]``'s text pieces as they are decoded. Greedy
        answers are each face's own (:meth:`ask`), up to llama.cpp's float differences between batch groupings at
        near-ties."""
        return drain(self._run_many(list(keys), check_question(question), gen),
                     None if on_token is None else lambda item: on_token(*item))

    def stream_many(self, keys: Sequence[Hashable], question: str, gen: GenerationConfig = GenerationConfig(),
                    cut: Collection[int] = ()) -> Iterator[tuple[int, str]]:
        """:meth:`answer_many` as an iterator of (face index, text piece); ``StopIteration.value`` is the answers.
        ``cut``: a collection the caller may add face indices to while iterating (e.g. a stop string was seen):
        those faces stop before their next token (stop reason "stop"; their last token stays pending, as when a
        one-face stream is closed) while the others go on."""
        return (yield from self._run_many(list(keys), check_question(question), gen, cut))

    def stream_many_checked(self, keys: Sequence[Hashable], question: str, gen: GenerationConfig,
                            cut: Collection[int] = ()) -> Iterator[tuple[int, str]]:
        """:meth:`stream_many` for a question its caller has already checked (:func:`check_question`)."""
        return (yield from self._run_many(list(keys), question, gen, cut))

    def _run(self, key: Hashable, question: str, gen: GenerationConfig) -> Iterator[str]:
        run = self._run_many([key], question, gen)
        try:
            while True:
                yield next(run)[1]
        except StopIteration as stop:
            return stop.value[0]
        finally:
            run.close()

    def _run_many(self, keys: list[Hashable], question: str, gen: GenerationConfig,
                  cut: Collection[int] = ()) -> Iterator[tuple[int, str]]:
        if not keys or len(set(keys)) != len(keys):
            raise UsageError("answer_many takes one or more different face keys")
        self._acquire()
        t0 = time.perf_counter()  # after the lock: timings measure these answers, not the wait for another one
        chains: list[SamplerChain] = []
        try:
            runs = []
            for key in keys:
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
                        f"the question needs {len(seg)} tokens but this conversation already holds {slot.n_past} of "
                        f"its {self.n_ctx}-token context; ask in a new session (ask about the image again), with a "
                        "shorter question, or use a larger --ctx" if slot.asked else
                        f"question needs {len(seg)} tokens but only {remain} remain in the {self.n_ctx}-token "
                        "context; use a shorter question or a larger --ctx"
                    )
                runs.append(FaceRun(key, slot, seg))
            eng = self._engine
            for _ in keys:
                chains.append(SamplerChain(eng.lib, eng.vocab, eng.n_vocab, gen, self.config.seed))
            self._make_room(keys, sum(len(r.segment) for r in runs))
            with self._evicted_on_failure(keys):
                rows = self._engine.decode_packed([(r.segment, r.slot.seq, r.slot.n_past) for r in runs],
                                                  logits_last=True)
            for r in runs:
                r.prefilled()
            t_prefill = time.perf_counter()
            active = list(range(len(runs)))
            while active:
                active = yield from sample_step(eng, chains, runs, active, rows, eos=self._eos, gen=gen, cut=cut,
                                                n_ctx=self.n_ctx)
                if not active:
                    break
                self._make_room(keys, len(active))
                if self._slots.cells_used() + len(active) > eng.n_cells:
                    log.warning("the KV cache is full with %d faces answering; answers cut", len(active))
                    for i in active:
                        runs[i].stopped()
                    break
                with self._evicted_on_failure([keys[i] for i in active]):
                    rows = self._engine.decode_packed([([runs[i].slot.pending], runs[i].slot.seq, runs[i].slot.n_past)
                                                       for i in active], logits_last=True)
                for i in active:
                    runs[i].decoded()
            return (yield from finish(runs, t0, t_prefill))
        finally:
            for chain in chains:
                chain.close()
            unpinned = [self._pins.pop(key, None) for key in keys]  # answered (or failed): evictable again
            if any(owner is not None for owner in unpinned):
                self._unpinned.notify_all()
            self._release()

    @contextmanager
    def _evicted_on_failure(self, keys: Collection[Hashable]) -> Iterator[None]:
        """A decode into these faces' sequences that fails leaves their caches in an unknown state: evict them."""
        try:
            yield
        except BaseException:
            for key in keys:
                if key in self._slots:
                    self._evict(key)
            raise

    # -- lifetime -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the model and context (idempotent; waits for a running answer on another thread)."""
        if self._owner == threading.get_ident():
            raise UsageError("Generator closed from inside its own on_token callback or stream; finish that first")
        with self._lock:
            self._slots.clear()
            self._engine.close()
            self._unpin_all()  # threads waiting for a slot wake up and see the model closed

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shape(x: object) -> str:
    return str(getattr(x, "shape", type(x).__name__))
