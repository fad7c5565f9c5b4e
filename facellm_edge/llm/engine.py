"""Thin owner of one llama.cpp model + context (llama-cpp-python's low-level ctypes API).

Everything that touches raw llama.cpp pointers lives here: loading, tokenising, decoding token and embedding batches
into a sequence of the KV cache, sampling with an in-llama.cpp sampler chain, and freeing it all. No conversation
logic (that is :mod:`facellm_edge.llm.generator`).

KV layout: one context with ``n_seq_max = max_slots`` and ``kv_unified = True``, one sequence per face. With a
unified cache every sequence may use the whole ``n_ctx`` (``llama_n_ctx_seq == n_ctx``) and the cells are shared, so
memory stays at one ``n_ctx`` cache however many faces are kept; the generator evicts the least recently used face
when the cells run out. Alternatives considered, measured with SmolLM2-135M (30 layers) on this 2-core box, 262
positions per face, 1 thread, under load: a non-unified cache splits ``n_ctx`` into ``n_ctx / n_seq_max`` per sequence
(a 4096 context would leave each face 1024 positions) or needs ``max_slots`` times the memory; per-face state blobs
(``llama_state_seq_get/set_data``) are 6 MB per face here (~3.2 MB at FaceLLM-1B) and cost ~0.8 ms to save plus
~0.8 ms to restore on every face switch, while switching between resident sequences costs nothing and dropping one
(``llama_memory_seq_rm``) ~0.06 ms. Price of residency: attention spans all used cells (masked), a 17-token
question's TTFT went 321 -> 412 ms with 1 -> 4 faces resident, decode 26.5 -> 25.8 tok/s.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from facellm_edge.errors import InputError, RuntimeStageError, UsageError
from facellm_edge.llm.native import install_log_hook, load_model
from facellm_edge.llm.sampling import INT32_MAX, UINT32_MAX, int_field, typed_field
from facellm_edge.signals import call_holding_signals

log = logging.getLogger(__name__)


DEFAULT_SLOTS = 4
# llama.cpp's LLAMA_DEFAULT_SEED: llama_sampler_init_dist draws a random seed for it, so it (and -1, which ctypes
# wraps to it) would break "same input, same answer"; seeds stop one below it.
RANDOM_SEED = UINT32_MAX
MAX_SEED = RANDOM_SEED - 1


@functools.cache
def max_parallel_sequences() -> int:
    """llama.cpp's limit on sequences per context (LLAMA_MAX_SEQ, 256 today): a constant of the library, read
    without loading a model (importing llama_cpp costs ~0.3 s once; the engine imports it to load anyway)."""
    import llama_cpp

    return int(llama_cpp.llama_max_parallel_sequences())


# Why llama.cpp cannot offload (llama_supports_gpu_offload() is false): its build has no GPU backend, or the backend
# found no device (llama.cpp's log, routed to logging, says which)
NO_GPU_OFFLOAD = ("llama.cpp sees no GPU: this llama-cpp-python has no GPU backend (reinstall it with "
                  'CMAKE_ARGS="-DGGML_CUDA=on", README "GPU") or its backend finds no GPU device')


def require_gpu_offload(llama_cpp, asked: str, instead: str = "") -> None:
    """A one-line :class:`UsageError` unless llama.cpp can offload to a GPU: ``asked`` is what needed it (an option,
    a bench row), ``instead`` what to do otherwise. Left to itself llama.cpp would run every layer on the CPU and
    say nothing: not what was asked for."""
    if not llama_cpp.llama_supports_gpu_offload():
        raise UsageError(f"{asked} needs a GPU, and {NO_GPU_OFFLOAD}{'; ' + instead if instead else ''}")


@dataclass(frozen=True)
class EngineConfig:
    """How llama.cpp runs the language model. One source of defaults for the runtime and the CLI."""

    quant: str | None = None  # which GGUF of a bundle (q4_k_m, q4_0, ...); None = the bundle's preferred
    n_ctx: int = 4096  # positions per conversation (and KV cells shared by all kept faces)
    n_threads: int | None = None  # None -> os.cpu_count()
    n_threads_batch: int | None = None  # None -> os.cpu_count()
    n_batch: int = 512  # tokens / embeddings per llama_decode call
    flash_attn: bool = True
    n_gpu_layers: int = 0
    # Conversations (faces) whose prefix stays in the KV cache; the least recently used is evicted. None: the
    # runtime sizes it from the context (facellm_edge.runtime.config.RuntimeConfig.resolve); DEFAULT_SLOTS alone.
    max_slots: int | None = None
    # seed of every answer's sampling distribution (temperature > 0): the same face and question answered the same
    # way again, alone or in the same group of faces; in another group llama.cpp's batched decode rounds the logits
    # slightly differently, and a sampled answer can differ from the first token where that tips the draw
    seed: int = 0
    # Read the GGUF into memory instead of mmap-ing it. On CPUs llama.cpp repacks quantised weights into its own
    # buffers anyway; with mmap the file's pages stay resident too (FaceLLM-1B q4_0: 777 -> 587 MB peak RSS).
    mmap: bool = False

    def __post_init__(self) -> None:  # every field checked here: llama.cpp's ctypes would wrap or truncate at load
        typed_field(self, "quant", str, "a quantisation name such as q4_k_m", optional=True)
        for name in ("n_ctx", "n_batch", "n_gpu_layers", "seed"):
            int_field(self, name)
        for name in ("max_slots", "n_threads", "n_threads_batch"):
            int_field(self, name, optional=True)
        for name in ("flash_attn", "mmap"):
            typed_field(self, name, bool, "True or False")
        if self.n_ctx < 16:
            raise UsageError(f"context size {self.n_ctx} is too small; use --ctx 512 or more")
        if self.n_ctx > UINT32_MAX:
            raise UsageError(f"context size {self.n_ctx} is above llama.cpp's limit of {UINT32_MAX}")
        if not 1 <= self.n_batch <= UINT32_MAX:
            raise UsageError(f"batch size {self.n_batch} must be in 1..{UINT32_MAX}")
        if self.max_slots is not None and self.max_slots < 1:
            raise UsageError(f"max_slots {self.max_slots} must be >= 1")
        if self.max_slots is not None and self.max_slots > max_parallel_sequences():
            raise UsageError(f"max_slots {self.max_slots} exceeds llama.cpp's limit of {max_parallel_sequences()}")
        for name in ("n_threads", "n_threads_batch"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= INT32_MAX:
                raise UsageError(f"{name} {value} must be >= 1 (or unset for all CPU cores)")
        if not 0 <= self.n_gpu_layers <= INT32_MAX:
            raise UsageError(f"n_gpu_layers {self.n_gpu_layers} must be >= 0")
        if not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"seed {self.seed} must be in 0..{MAX_SEED} (llama.cpp takes {RANDOM_SEED}, and -1 "
                             "wrapped to it, as a new random seed every answer)")

    @property
    def slots(self) -> int:
        return DEFAULT_SLOTS if self.max_slots is None else self.max_slots

    @property
    def threads(self) -> int:
        return self.n_threads or os.cpu_count() or 1

    @property
    def threads_batch(self) -> int:
        return self.n_threads_batch or os.cpu_count() or 1


class LlamaEngine:
    """One GGUF model and one context with ``config.max_slots`` sequences in a unified KV cache."""

    def __init__(self, gguf_path: Path, config: EngineConfig) -> None:
        import llama_cpp as L  # a core dependency; imported here so importing this module stays cheap

        self._L = L
        install_log_hook(L)
        self.config = config
        self._model = None
        self._ctx = None
        self._tok_batch = None
        self._emb_batch = None
        gguf_path = Path(gguf_path)
        if not gguf_path.is_file():
            raise InputError(f"GGUF not found: {gguf_path} (export a bundle with `facellm-edge export`)")
        if config.n_gpu_layers > 0:
            require_gpu_offload(L, f"--gpu-layers {config.n_gpu_layers}", "or use --gpu-layers 0")
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = config.n_gpu_layers
        mparams.load_mode = L.LLAMA_LOAD_MODE_MMAP if config.mmap else L.LLAMA_LOAD_MODE_NONE
        self._model = load_model(L, gguf_path, mparams)
        if not self._model:
            raise InputError(
                f"llama.cpp cannot load {gguf_path} (not a GGUF, truncated, or an unknown architecture); "
                "re-export the bundle"
            )
        self._vocab = L.llama_model_get_vocab(self._model)
        self.n_embd = int(L.llama_model_n_embd(self._model))
        self.n_vocab = int(L.llama_vocab_n_tokens(self._vocab))

        cparams = L.llama_context_default_params()
        cparams.n_ctx = config.n_ctx
        cparams.n_batch = config.n_batch
        cparams.n_ubatch = config.n_batch
        cparams.n_seq_max = config.slots
        cparams.kv_unified = True
        cparams.n_threads = config.threads
        cparams.n_threads_batch = config.threads_batch
        cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if config.flash_attn else (
            L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.no_perf = True
        try:
            self._ctx = call_holding_signals(lambda: L.llama_init_from_model(self._model, cparams), L.llama_free)
        except BaseException:  # Ctrl-C / SIGTERM: free the model now, not when the traceback is gone
            self.close()
            raise
        if not self._ctx:
            self.close()
            raise RuntimeStageError(
                f"llama.cpp cannot create a {config.n_ctx}-token context for {gguf_path.name} "
                "(out of memory?); use a smaller --ctx"
            )
        self._mem = L.llama_get_memory(self._ctx)
        self.n_ctx = int(L.llama_n_ctx_seq(self._ctx))
        self.n_cells = int(L.llama_n_ctx(self._ctx))
        self.add_bos = bool(L.llama_vocab_get_add_bos(self._vocab))
        self.bos_id = int(L.llama_vocab_bos(self._vocab))
        # llama.cpp caps n_batch at the context's size (a causal model's batch never exceeds its n_ctx): a chunk of
        # config.n_batch rows into a smaller context aborts the process (GGML_ASSERT n_tokens_all <= n_batch)
        self.n_batch = int(L.llama_n_batch(self._ctx))
        self._tok_batch = L.llama_batch_init(self.n_batch, 0, 1)
        self._emb_batch = L.llama_batch_init(self.n_batch, self.n_embd, 1)
        self._piece_buf = ctypes.create_string_buffer(256)
        log.debug("llama.cpp context: n_ctx=%d cells=%d seqs=%d threads=%d/%d flash_attn=%s", self.n_ctx,
                  self.n_cells, config.slots, config.threads, config.threads_batch, config.flash_attn)

    # -- vocabulary -----------------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Tokenise ``text`` without adding BOS/EOS; ``special`` parses control tokens such as ``<|im_start|>``."""
        data = text.encode("utf-8")
        cap = len(data) + 16
        while True:
            buf = (self._L.llama_token * cap)()
            n = self._L.llama_tokenize(self._vocab, data, len(data), buf, cap, False, special)
            if n >= 0:
                return list(buf[:n])
            if -n <= cap:
                raise RuntimeStageError(f"llama.cpp could not tokenise {len(data)} bytes of text (code {n})")
            cap = -n  # a negative result is the number of tokens needed

    def piece(self, token: int) -> bytes:
        """The bytes of one generated token (control tokens render as nothing)."""
        n = self._L.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._L.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(self._L.llama_vocab_is_eog(self._vocab, token))

    @property
    def lib(self):
        """The ``llama_cpp`` module (for building samplers against this engine's vocabulary)."""
        return self._L

    @property
    def vocab(self):
        return self._vocab

    # -- KV cache -------------------------------------------------------------------------------------
    def seq_clear(self, seq: int) -> None:
        self._L.llama_memory_seq_rm(self._mem, seq, -1, -1)

    def clear(self) -> None:
        self._L.llama_memory_clear(self._mem, True)

    def seq_pos_max(self, seq: int) -> int:
        return int(self._L.llama_memory_seq_pos_max(self._mem, seq))

    # -- decoding -------------------------------------------------------------------------------------
    def decode_tokens(self, tokens: Sequence[int], seq: int, pos0: int, *, logits_last: bool) -> None:
        """Decode ``tokens`` at positions ``pos0..`` of ``seq``; keep the logits of the last one if asked."""
        self.decode_packed([(tokens, seq, pos0)], logits_last=logits_last)

    def decode_embeddings(self, embeds: np.ndarray, seq: int, pos0: int, *, logits_last: bool) -> None:
        """Decode rows of ``embeds`` (float32 [n, n_embd]) as input embeddings at positions ``pos0..``."""
        self.decode_packed([(embeds, seq, pos0)], logits_last=logits_last)

    def logits_of(self, item: Sequence[int] | np.ndarray, seq: int, pos0: int) -> np.ndarray:
        """Decode token ids (1-D) or embeddings (float32 [n, n_embd]) at ``pos0..`` of ``seq`` and return the
        logits of every position, [n, n_vocab]. For verification against transformers; generation never copies
        logits."""
        rows, step, out = _rows(item, seq, pos0), self.n_batch, []
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            self._decode_rows(chunk, _is_embd(item), n_logits=len(chunk))
            out.append(np.ctypeslib.as_array(self._L.llama_get_logits(self._ctx),
                                             shape=(len(chunk), self.n_vocab)).copy())
        return np.concatenate(out, axis=0)

    def decode_packed(self, items: Sequence[tuple[Sequence[int] | np.ndarray, int, int]], *,
                      logits_last: bool) -> list[int]:
        """Decode several sequences' rows together: ``items`` are (token ids, or float32 embeddings [n, n_embd], all
        of one kind; seq; pos0). Rows of all items share each ``llama_decode`` call (up to ``n_batch``), so N faces
        cost one pass over the weights per call instead of N; one item is decoded in ``n_batch`` chunks. With
        ``logits_last`` every item (non-empty) has its last row in the final call, with logits, and that row's index
        there is returned per item (for :meth:`sample_at`); otherwise []."""
        if logits_last and len(items) > self.n_batch:
            raise UsageError(f"{len(items)} sequences at once exceed n_batch {self.n_batch}")
        if logits_last and any(len(x) == 0 for x, _, _ in items):
            raise UsageError("decode_packed: an item with no rows has no last row to keep logits of")
        body, last = [], []
        for x, seq, pos0 in items:
            rows = _rows(x, seq, pos0)
            if logits_last:
                body += rows[:-1]
                last.append(rows[-1])
            else:
                body += rows
        rows = body + last  # a sequence's rows stay in position order across the calls
        if not rows:
            return []
        is_embd, step = _is_embd(items[0][0]), self.n_batch
        n_final = max(len(last), len(rows) - step * ((len(rows) - 1) // step))  # full chunks, then the rest
        head, tail = rows[:len(rows) - n_final], rows[len(rows) - n_final:]  # the rest holds every last row
        for start in range(0, len(head), step):
            self._decode_rows(head[start:start + step], is_embd, n_logits=0)
        self._decode_rows(tail, is_embd, n_logits=len(last))
        return list(range(len(tail) - len(last), len(tail))) if logits_last else []

    def _decode_rows(self, rows: list[tuple[object, int, int]], is_embd: bool, *, n_logits: int) -> None:
        """One ``llama_decode`` of (token id or embedding row, seq, pos) rows; logits for the last ``n_logits``."""
        batch = self._emb_batch if is_embd else self._tok_batch
        if is_embd:
            block = np.ascontiguousarray(np.stack([r for r, _, _ in rows]), dtype=np.float32)
            ctypes.memmove(batch.embd, block.ctypes.data, block.nbytes)
        first_logit = len(rows) - n_logits
        for i, (row, seq, pos) in enumerate(rows):
            if not is_embd:
                batch.token[i] = int(row)
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = i >= first_logit
        batch.n_tokens = len(rows)
        self._decode(batch, len(rows))

    def _decode(self, batch, n: int) -> None:
        rc = self._L.llama_decode(self._ctx, batch)
        if rc == 1:
            raise RuntimeStageError(
                f"llama.cpp found no free KV cells for {n} positions in the {self.n_cells}-cell cache; "
                "use a larger --ctx or fewer faces"
            )
        if rc != 0:
            raise RuntimeStageError(f"llama_decode failed with code {rc} while decoding {n} positions")

    def synchronize(self) -> None:
        """Wait until the backend has finished every decode queued so far (a no-op on the CPU, where decoding is
        synchronous; on a GPU ``llama_decode`` returns once the work is queued)."""
        self._L.llama_synchronize(self._ctx)

    # -- sampling -------------------------------------------------------------------------------------
    def sample_at(self, chain, index: int) -> int:
        """Sample from the logits of row ``index`` of the last decode (see :meth:`decode_packed`); accepts it."""
        return int(self._L.llama_sampler_sample(chain, self._ctx, index))

    def logits_last(self, index: int = -1) -> np.ndarray:
        """A copy of the logits of the last decode's output row ``index`` (default: the last one), for tests and
        diagnostics; generation never copies logits."""
        ptr = self._L.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    # -- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        L = self._L
        if self._tok_batch is not None:
            L.llama_batch_free(self._tok_batch)
            self._tok_batch = None
        if self._emb_batch is not None:
            L.llama_batch_free(self._emb_batch)
            self._emb_batch = None
        if self._ctx:
            L.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            L.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:  # a forgotten close() must not leak the model's memory for the process lifetime
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    @property
    def closed(self) -> bool:
        return self._model is None


def _is_embd(item: object) -> bool:
    """Input embeddings (a 2-D float array) rather than token ids."""
    return isinstance(item, np.ndarray) and item.ndim == 2


def _rows(item: Sequence[int] | np.ndarray, seq: int, pos0: int) -> list[tuple[object, int, int]]:
    """(token id or embedding row, seq, position) for each row of ``item`` decoded at ``pos0..`` of ``seq``."""
    return list(zip(item, [seq] * len(item), range(pos0, pos0 + len(item))))
