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
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np

from facellm_edge.errors import InputError, RuntimeStageError, UsageError

log = logging.getLogger(__name__)


DEFAULT_SLOTS = 4


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
    seed: int = 0  # seed of every answer's sampling distribution (temperature > 0): same input, same answer
    # Read the GGUF into memory instead of mmap-ing it. On CPUs llama.cpp repacks quantised weights into its own
    # buffers anyway; with mmap the file's pages stay resident too (FaceLLM-1B q4_0: 777 -> 587 MB peak RSS).
    mmap: bool = False

    def __post_init__(self) -> None:
        if self.n_ctx < 16:
            raise UsageError(f"context size {self.n_ctx} is too small; use --ctx 512 or more")
        if self.n_batch < 1:
            raise UsageError(f"batch size {self.n_batch} must be >= 1")
        if self.max_slots is not None and self.max_slots < 1:
            raise UsageError(f"max_slots {self.max_slots} must be >= 1")
        for name in ("n_threads", "n_threads_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"{name} {value} must be >= 1 (or unset for all CPU cores)")
        if self.n_gpu_layers < 0:
            raise UsageError(f"n_gpu_layers {self.n_gpu_layers} must be >= 0")

    @property
    def slots(self) -> int:
        return DEFAULT_SLOTS if self.max_slots is None else self.max_slots

    @property
    def threads(self) -> int:
        return self.n_threads or os.cpu_count() or 1

    @property
    def threads_batch(self) -> int:
        return self.n_threads_batch or os.cpu_count() or 1


# -- llama.cpp log routing ------------------------------------------------------------------------------
# ggml log levels of this llama.cpp: 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous message.
_LEVELS = {3: logging.WARNING, 4: logging.ERROR}
# Load-time warnings every Qwen2 GGUF triggers (e.g. "'</s>' was not control-type"): harmless, logged at DEBUG.
_BENIGN = (b"load: control-looking token",)
_llama_log = logging.getLogger("facellm_edge.llama_cpp")
_log_state = {"forward": False, "level": 0}
_log_lock = threading.Lock()
_log_installed: list[object] = []  # keeps the ctypes callback alive; llama.cpp's log hook is process-wide


def install_log_hook(llama_cpp) -> Any:
    """Route llama.cpp's stderr chatter to :mod:`logging`: warnings and errors only, debug/info dropped.

    llama.cpp has one process-wide log hook; it is (re)installed whenever an engine is created and another hook is
    active, so a Generator's loads are always routed this way. Returns the ctypes callback (libmtmd takes the same
    one: ``mtmd_log_set``)."""
    with _log_lock:
        if not _log_installed:

            @llama_cpp.llama_log_callback
            def _callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
                if level == 5:
                    forward = _log_state["forward"]
                    py_level = _log_state["level"]
                else:
                    py_level = _LEVELS.get(level, 0)
                    if py_level and text.startswith(_BENIGN):
                        py_level = logging.DEBUG
                    forward = py_level > 0
                    _log_state["forward"] = forward
                    _log_state["level"] = py_level
                if forward and _llama_log.isEnabledFor(py_level):
                    msg = text.decode("utf-8", errors="replace").rstrip("\n")
                    if msg:
                        _llama_log.log(py_level, "%s", msg)

            _log_installed.append(_callback)
            llama_cpp.llama_backend_init()
        ours = _log_installed[0]
        current = llama_cpp.llama_log_callback()
        user = ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(current), ctypes.byref(user))
        if ctypes.cast(current, ctypes.c_void_p).value != ctypes.cast(ours, ctypes.c_void_p).value:
            llama_cpp.llama_log_set(ours, ctypes.c_void_p(0))
        return ours


# -- Ctrl-C / SIGTERM during long llama.cpp calls --------------------------------------------------------
# Python runs a signal's handler at the next bytecode of the main thread. During a model load that is inside
# llama.cpp's ctypes log callback: the KeyboardInterrupt is raised there, ctypes prints "Exception ignored on calling
# ctypes callback function" and the load carries on. So while llama.cpp works, SIGINT/SIGTERM only note the signal;
# the load's progress callback then returns false (llama.cpp cancels the load), and once the C call has returned the
# signal's own handler runs (KeyboardInterrupt, or the CLI's SIGTERM handling).
T = TypeVar("T")
_held_signal: list[int | None] = [None]
_progress_installed: list[object] = []  # keeps the ctypes progress callback alive


def progress_callback(llama_cpp) -> Any:
    """llama.cpp model-load progress callback that cancels the load once Ctrl-C / SIGTERM arrived."""
    if not _progress_installed:

        @llama_cpp.llama_progress_callback
        def _progress(_progress: float, _user: ctypes.c_void_p) -> bool:
            return _held_signal[0] is None

        _progress_installed.append(_progress)
    return _progress_installed[0]


def call_holding_signals(fn: Callable[[], T], release: Callable[[T], None] | None = None) -> T:
    """Run ``fn`` (a long llama.cpp call) with SIGINT/SIGTERM held; a signal that arrived meanwhile is delivered to
    its own handler (KeyboardInterrupt) once ``fn`` has returned, after ``release(result)`` frees what it made.
    Signals whose handler is not a Python function (ignored, default) and calls outside the main thread are left
    alone."""
    if threading.current_thread() is not threading.main_thread():
        return fn()

    def hold(signum: int, _frame: object) -> None:
        if _held_signal[0] is None:
            _held_signal[0] = signum

    saved = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if callable(handler):
            saved[sig] = handler
            signal.signal(sig, hold)
    result = None
    try:
        result = fn()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)  # runs a still-pending signal's handler (``hold``) first
        signum, _held_signal[0] = _held_signal[0], None
        if signum is not None:
            if result and release is not None:
                release(result)
            saved[signum](signum, None)
    return result


def load_model(llama_cpp, path: Path, mparams) -> Any:
    """``llama_model_load_from_file`` that Ctrl-C / SIGTERM cancel (raising KeyboardInterrupt); NULL on failure."""
    mparams.progress_callback = progress_callback(llama_cpp)
    return call_holding_signals(lambda: llama_cpp.llama_model_load_from_file(str(path).encode(), mparams),
                                llama_cpp.llama_model_free)


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
        if config.slots > L.llama_max_parallel_sequences():
            raise UsageError(
                f"max_slots {config.slots} exceeds llama.cpp's limit of {L.llama_max_parallel_sequences()}"
            )
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
        self._tok_batch = L.llama_batch_init(config.n_batch, 0, 1)
        self._emb_batch = L.llama_batch_init(config.n_batch, self.n_embd, 1)
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
        for _ in self._decode_chunks(tokens, seq, pos0, "last" if logits_last else "none"):
            pass

    def decode_embeddings(self, embeds: np.ndarray, seq: int, pos0: int, *, logits_last: bool) -> None:
        """Decode rows of ``embeds`` (float32 [n, n_embd]) as input embeddings at positions ``pos0..``."""
        for _ in self._decode_chunks(embeds, seq, pos0, "last" if logits_last else "none"):
            pass

    def logits_of(self, item: Sequence[int] | np.ndarray, seq: int, pos0: int) -> np.ndarray:
        """Decode token ids (1-D) or embeddings (float32 [n, n_embd]) at ``pos0..`` of ``seq`` and return the
        logits of every position, [n, n_vocab]. For verification against transformers; generation never copies
        logits."""
        out = [np.ctypeslib.as_array(self._L.llama_get_logits(self._ctx), shape=(n, self.n_vocab)).copy()
               for n in self._decode_chunks(item, seq, pos0, "all")]
        return np.concatenate(out, axis=0)

    def _decode_chunks(self, item: Sequence[int] | np.ndarray, seq: int, pos0: int, outputs: str) -> Iterator[int]:
        """Decode token ids (1-D) or embeddings (2-D) in ``n_batch`` chunks; yield each chunk's size after its
        decode. ``outputs``: which positions keep logits — "none", "last" (of the whole item) or "all"."""
        is_embd = isinstance(item, np.ndarray) and item.ndim == 2
        arr = np.ascontiguousarray(item, dtype=np.float32) if is_embd else item
        batch = self._emb_batch if is_embd else self._tok_batch
        total, step = len(arr), self.config.n_batch
        for start in range(0, total, step):
            chunk = arr[start:start + step]
            n = len(chunk)
            if is_embd:
                ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
            else:
                for i, t in enumerate(chunk):
                    batch.token[i] = int(t)
            for i in range(n):
                batch.pos[i] = pos0 + start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = outputs == "all"
            if outputs == "last" and start + n == total:
                batch.logits[n - 1] = 1
            batch.n_tokens = n
            self._decode(batch, n)
            yield n

    def _decode(self, batch, n: int) -> None:
        rc = self._L.llama_decode(self._ctx, batch)
        if rc == 1:
            raise RuntimeStageError(
                f"llama.cpp found no free KV cells for {n} positions in the {self.n_cells}-cell cache; "
                "use a larger --ctx or fewer faces"
            )
        if rc != 0:
            raise RuntimeStageError(f"llama_decode failed with code {rc} while decoding {n} positions")

    # -- sampling -------------------------------------------------------------------------------------
    def sample(self, chain) -> int:
        """Sample from the logits of the last decoded output with an in-llama.cpp sampler chain (accepts it)."""
        return int(self._L.llama_sampler_sample(chain, self._ctx, -1))

    def logits_last(self) -> np.ndarray:
        """A copy of the last output's logits (for tests and diagnostics; generation never copies logits)."""
        ptr = self._L.llama_get_logits_ith(self._ctx, -1)
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
