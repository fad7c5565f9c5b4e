"""The llama.cpp peer as llama.cpp itself runs a multimodal chat: what ``llama-mtmd-cli`` does, step for step.

Nothing of the runtime's LLM code is in it, so its rows measure llama.cpp's own path, not ours with another vision
encoder: the LLM GGUF loaded with llama.cpp's default model parameters (memory-mapped, CPU repack on), a context with
llama.cpp's common defaults (``n_batch`` 2048, ``n_ubatch`` 512, flash attention auto), the first turn's text with
libmtmd's media marker through ``mtmd_tokenize`` (libmtmd puts ``<img>``/``</img>`` around the image itself), text
chunks through ``mtmd_helper_eval_chunk_single`` and the image chunk through ``mtmd_encode_chunk`` +
``mtmd_helper_decode_image_chunk`` (what ``mtmd_helper_eval_chunks`` does, split so that encode and image prefill are
timed apart), then llama.cpp's greedy sampler and one ``llama_batch_get_one`` token per step. A follow-up is the
template's follow-up turn decoded on the kept KV cache, as the CLI's chat mode keeps it.

Stage names are the runtime's (:mod:`facellm_edge.timings`): ``encode`` (libmtmd preprocesses the image itself, so
its time holds the preprocessing), ``image_prefill`` (the text before the image, ``<img>`` included, and the image's
embeddings), ``question_prefill`` (the rest of the first turn: ``</img>``, the question and the assistant header),
``ttft`` (question prefill + the first sampled token), ``decode``.
"""

from __future__ import annotations

import ctypes
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from facellm_edge.errors import InputError, RuntimeStageError
from facellm_edge.export.mtmd_peer import require_files, tokenized
from facellm_edge.llm.decoding import Answer
from facellm_edge.llm.native import install_log_hook, load_model
from facellm_edge.signals import call_holding_signals

if TYPE_CHECKING:
    from facellm_edge.bundle import PromptSpec

__all__ = ["MtmdChat", "N_BATCH", "N_UBATCH"]

log = logging.getLogger(__name__)

N_BATCH = 2048  # llama.cpp common_params.n_batch (what llama-mtmd-cli runs with unless told otherwise)
N_UBATCH = 512  # common_params.n_ubatch


class MtmdChat:
    """One LLM GGUF + its mmproj, loaded and run the way llama.cpp's multimodal CLI does; one conversation at a time.
    ``gpu``: every LLM layer and libmtmd's encoder on the GPU (``llama-mtmd-cli -ngl 999``; needs a GPU build)."""

    def __init__(self, mmproj: Path, gguf: Path, prompt: "PromptSpec", *, threads: int, n_ctx: int,
                 gpu: bool = False) -> None:
        import llama_cpp as L
        import llama_cpp.mtmd_cpp as M

        self._L, self._M = L, M
        self._model = self._ctx = self._mtmd = self._smpl = None
        require_files(mmproj, gguf)
        M.mtmd_log_set(install_log_hook(L), ctypes.c_void_p(0))  # llama.cpp's and libmtmd's logs, one routing
        try:
            from facellm_edge.bench.config import GPU_LAYERS

            if gpu:
                from facellm_edge.llm.engine import require_gpu_offload

                require_gpu_offload(L, "the GPU peer")
            params = L.llama_model_default_params()
            params.n_gpu_layers = GPU_LAYERS if gpu else 0
            self._model = load_model(L, Path(gguf), params)
            if not self._model:
                raise InputError(f"llama.cpp cannot load {gguf}")
            self._vocab = L.llama_model_get_vocab(self._model)
            cparams = L.llama_context_default_params()
            cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, N_BATCH, N_UBATCH
            cparams.n_threads = cparams.n_threads_batch = threads
            cparams.no_perf = True
            self._ctx = call_holding_signals(lambda: L.llama_init_from_model(self._model, cparams), L.llama_free)
            if not self._ctx:
                raise RuntimeStageError(f"llama.cpp cannot create a {n_ctx}-token context for {Path(gguf).name}")
            mparams = M.mtmd_context_params_default()
            mparams.use_gpu = gpu
            mparams.n_threads = threads
            mparams.print_timings = False
            self._marker = M.mtmd_default_marker()
            mparams.media_marker = self._marker
            self._mtmd = call_holding_signals(
                lambda: M.mtmd_init_from_file(str(mmproj).encode(), self._model, mparams), M.mtmd_free)
            if not self._mtmd:
                raise RuntimeStageError(f"libmtmd refused {Path(mmproj).name} with {Path(gguf).name}")
            chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            self._smpl = chain
        except BaseException:
            self.close()
            raise
        head, system, first = prompt.first_parts()
        marker = self._marker.decode()
        self._first = (head + (system or "") + first).replace(prompt.image_marker, marker)
        self._question_marker = prompt.question_marker
        self._followup = prompt.followup
        self._mem = L.llama_get_memory(self._ctx)
        self.n_past = 0
        self._pending: int | None = None  # the last sampled token, decoded at the start of the next turn

    # -- one conversation -----------------------------------------------------------------------------
    def first_turn(self, rgb: np.ndarray, question: str, n_new: int, t: dict[str, float]) -> Answer:
        """A new conversation about ``rgb`` (uint8 HxWx3, RGB): ``n_new`` tokens answering ``question``. Adds the
        ``encode`` and ``image_prefill`` times (ms) to ``t``; the answer carries the rest."""
        L, M = self._L, self._M
        L.llama_memory_clear(self._mem, True)
        L.llama_sampler_reset(self._smpl)
        self.n_past, self._pending = 0, None
        text = self._first.replace(self._question_marker, question).encode("utf-8")
        with tokenized(M, self._mtmd, np.ascontiguousarray(rgb, dtype=np.uint8), text, add_special=True) as items:
            kinds = [M.mtmd_input_chunk_get_type(c) for c in items]
            if kinds.count(M.MTMD_INPUT_CHUNK_TYPE_IMAGE) != 1 or kinds[-1] == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                raise RuntimeStageError(f"expected one image chunk inside the first turn, got chunk kinds {kinds}")
            at = kinds.index(M.MTMD_INPUT_CHUNK_TYPE_IMAGE)
            t0 = time.perf_counter()
            if M.mtmd_encode_chunk(self._mtmd, items[at]) != 0:
                raise RuntimeStageError("mtmd_encode_chunk failed")
            t1 = time.perf_counter()
            for chunk in items[:at]:
                self._eval_text(chunk, logits_last=False)
            new_n_past = L.llama_pos(0)
            rc = M.mtmd_helper_decode_image_chunk(self._mtmd, self._ctx, items[at], M.mtmd_get_output_embd(self._mtmd),
                                                  self.n_past, 0, N_BATCH, ctypes.byref(new_n_past),
                                                  M.mtmd_helper_post_decode_callback(), None)  # NULL: no callback
            if rc != 0:
                raise RuntimeStageError(f"mtmd_helper_decode_image_chunk failed (code {rc})")
            self.n_past = int(new_n_past.value)
            L.llama_synchronize(self._ctx)  # on a GPU the image prefill is queued, not done, when the call returns
            t2 = time.perf_counter()
            t["encode"], t["image_prefill"] = (t1 - t0) * 1e3, (t2 - t1) * 1e3
            self.n_image_prefix = self.n_past
            n_question = 0
            for k, chunk in enumerate(items[at + 1:], start=at + 1):
                n_question += self._eval_text(chunk, logits_last=k == len(items) - 1)
            return self._generate(t2, n_new, n_question)

    def followup(self, question: str, n_new: int) -> Answer:
        """The template's follow-up turn on the kept KV cache, after the previous answer's last token (sampled, not
        yet decoded); the answer's end-of-turn is not decoded, as in the runtime's follow-ups."""
        L = self._L
        if self._pending is None:
            raise RuntimeStageError("a follow-up needs a first turn")
        data = self._followup.replace(self._question_marker, question).encode("utf-8")
        t0 = time.perf_counter()
        ids = (L.llama_token * (len(data) + 16))()
        n = L.llama_tokenize(self._vocab, data, len(data), ids, len(ids), False, True)
        if n <= 0:
            raise RuntimeStageError(f"llama_tokenize failed on the follow-up (code {n})")
        self._decode((L.llama_token * (n + 1))(self._pending, *ids[:n]), n + 1)
        return self._generate(t0, n_new, n + 1)

    # -- llama.cpp calls ------------------------------------------------------------------------------
    def _eval_text(self, chunk, *, logits_last: bool) -> int:
        L, M = self._L, self._M
        n_tok = ctypes.c_size_t(0)
        M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n_tok))
        new_n_past = L.llama_pos(0)
        rc = M.mtmd_helper_eval_chunk_single(self._mtmd, self._ctx, chunk, self.n_past, 0, N_BATCH, logits_last,
                                             ctypes.byref(new_n_past))
        if rc != 0:
            raise RuntimeStageError(f"mtmd_helper_eval_chunk_single failed (code {rc})")
        self.n_past = int(new_n_past.value)
        return int(n_tok.value)

    def _decode(self, tokens, n: int) -> None:
        rc = self._L.llama_decode(self._ctx, self._L.llama_batch_get_one(tokens, n))
        if rc != 0:
            raise RuntimeStageError(f"llama_decode failed with code {rc}")
        self.n_past += n

    def _generate(self, t0: float, n_new: int, n_prefilled: int) -> Answer:
        """Greedy tokens from the logits the last decode kept, ``t0`` being when this turn's own prefill began. The
        last sampled token is not decoded (as the runtime leaves it pending)."""
        L = self._L
        t_prefill = time.perf_counter()
        token = (L.llama_token * 1)()
        out: list[int] = []
        t_first = 0.0
        for i in range(n_new):
            if i:
                self._decode(token, 1)
            token[0] = L.llama_sampler_sample(self._smpl, self._ctx, -1)
            out.append(int(token[0]))
            if not i:
                t_first = time.perf_counter()
        t_end = time.perf_counter()
        self._pending = out[-1]
        decode_s = t_end - t_first
        return Answer(text="", token_ids=tuple(out), n_prefilled=n_prefilled, n_generated=len(out),
                      stop_reason="length",
                      timings={"question_prefill": (t_prefill - t0) * 1e3, "ttft": (t_first - t0) * 1e3,
                               "decode": decode_s * 1e3},
                      tokens_per_s=(len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0)

    # -- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        L, M = self._L, self._M
        for attr, free in (("_smpl", L.llama_sampler_free), ("_mtmd", M.mtmd_free), ("_ctx", L.llama_free),
                           ("_model", L.llama_model_free)):  # the order they depend on each other in
            handle = getattr(self, attr)
            if handle:
                free(handle)
                setattr(self, attr, None)
