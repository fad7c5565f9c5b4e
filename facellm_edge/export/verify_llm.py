"""Check a GGUF against the transformers model it came from: logits with injected image embeddings, tokenizer ids.

Contains a small, self-contained llama.cpp session on llama-cpp-python's low-level API (load model + context from a
path, decode a sequence mixing token batches and embedding batches, read the logits of every position). The
runtime generator needs the same steps; the lead merges the two later.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facellm_edge.errors import ExportError, InputError, require

logger = logging.getLogger(__name__)

# ggml.h `enum ggml_log_level` (not exported by llama-cpp-python): NONE, DEBUG, INFO, WARN, ERROR, CONT.
_GGML_LOG_WARN, _GGML_LOG_ERROR, _GGML_LOG_CONT = 3, 4, 5
_llama_log_state: dict[str, Any] = {"callback": None, "last": logging.DEBUG}
_llama_logger = logging.getLogger("facellm_edge.llama_cpp")


def route_llama_logs() -> None:
    """Send llama.cpp/ggml's stderr chatter to the ``facellm_edge.llama_cpp`` logger (errors stay errors)."""
    llama_cpp = require("llama_cpp", "export")
    if _llama_log_state["callback"] is not None:
        return

    def _forward(level: int, text: bytes, _user: Any) -> None:
        if level == _GGML_LOG_CONT:  # continuation of the previous message
            py_level = _llama_log_state["last"]
        else:
            py_level = {_GGML_LOG_ERROR: logging.ERROR, _GGML_LOG_WARN: logging.INFO}.get(level, logging.DEBUG)
            _llama_log_state["last"] = py_level
        msg = text.decode("utf-8", errors="replace").rstrip("\n")
        if msg.strip():
            _llama_logger.log(py_level, "%s", msg)

    callback = llama_cpp.llama_log_callback(_forward)
    _llama_log_state["callback"] = callback  # keep a reference: ctypes callbacks must outlive their use
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()


class LlamaSession:
    """One llama.cpp model + context (single sequence), closed with :meth:`close` or as a context manager."""

    def __init__(self, gguf_path: Path | str, *, n_ctx: int, n_threads: int = 1) -> None:
        self._ll = require("llama_cpp", "export")
        route_llama_logs()
        path = Path(gguf_path)
        if not path.is_file():
            raise InputError(f"GGUF file {path} does not exist")
        self.model = self._ll.llama_model_load_from_file(str(path).encode(), self._ll.llama_model_default_params())
        if not self.model:
            raise ExportError(f"llama.cpp cannot load {path} (see the facellm_edge.llama_cpp log)")
        params = self._ll.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = int(n_ctx)
        params.n_threads = params.n_threads_batch = int(n_threads)
        self.ctx = self._ll.llama_init_from_model(self.model, params)
        if not self.ctx:
            self._ll.llama_model_free(self.model)
            raise ExportError(f"llama.cpp cannot create a context for {path} (n_ctx={n_ctx})")
        self.vocab = self._ll.llama_model_get_vocab(self.model)
        self.n_vocab = int(self._ll.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(self._ll.llama_model_n_embd(self.model))
        self.n_ctx = int(n_ctx)
        self.n_past = 0

    def __enter__(self) -> "LlamaSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._ll.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self._ll.llama_model_free(self.model)
            self.model = None

    def tokenize(self, text: str, *, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self._ll.llama_token * cap)()
        n = self._ll.llama_tokenize(self.vocab, data, len(data), buf, cap, False, parse_special)
        if n < 0:
            raise ExportError(f"llama.cpp tokenization needs {-n} tokens, more than the buffer of {cap}")
        return list(buf[:n])

    def reset(self) -> None:
        self._ll.llama_memory_clear(self._ll.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def decode(self, item: Sequence[int] | np.ndarray, *, all_logits: bool = True) -> np.ndarray:
        """Decode token ids (1-D ints) or embeddings ([k, n_embd] float32) at the next positions.

        Returns the logits [k, n_vocab] of every position (``all_logits``) or of the last one [1, n_vocab].
        """
        arr = np.asarray(item)
        is_embd = arr.ndim == 2
        if is_embd and arr.shape[1] != self.n_embd:
            raise ExportError(f"embeddings have width {arr.shape[1]}, the model expects {self.n_embd}")
        k = int(arr.shape[0])
        if k == 0:
            raise ExportError("nothing to decode")
        if self.n_past + k > self.n_ctx:
            raise ExportError(f"{self.n_past + k} positions exceed the context of {self.n_ctx}")
        batch = self._ll.llama_batch_init(k, self.n_embd if is_embd else 0, 1)
        try:
            if is_embd:
                emb = np.ascontiguousarray(arr, dtype=np.float32)
                ctypes.memmove(batch.embd, emb.ctypes.data, emb.nbytes)
            for i in range(k):
                if not is_embd:
                    batch.token[i] = int(arr[i])
                batch.pos[i] = self.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if (all_logits or i == k - 1) else 0
            batch.n_tokens = k
            rc = self._ll.llama_decode(self.ctx, batch)
            if rc != 0:
                raise ExportError(f"llama_decode failed with code {rc}")
            self.n_past += k
            n_out = k if all_logits else 1
            ptr = self._ll.llama_get_logits(self.ctx)
            return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy()
        finally:
            self._ll.llama_batch_free(batch)

    def greedy(self, prompt_ids: Sequence[int], n_new: int) -> list[int]:
        """Greedy continuation of ``prompt_ids`` (numpy argmax over the logits)."""
        logits = self.decode(list(prompt_ids), all_logits=False)
        out: list[int] = []
        for _ in range(n_new):
            tok = int(np.argmax(logits[-1]))
            out.append(tok)
            logits = self.decode([tok], all_logits=False)
        return out


@dataclass(frozen=True)
class LogitProbe:
    """An InternVL prompt with ``n_image_tokens`` injected (seeded random) image embeddings."""

    question: str = "Describe the facial attributes of this person."
    n_image_tokens: int = 16
    seed: int = 0
    n_threads: int = 1


def build_probe_prompt(tokenizer: Any, probe: LogitProbe) -> list[int]:
    """Token ids of the real InternVL prompt: chat template + <img> + N x <IMG_CONTEXT> + </img> + question."""
    names = ("start_image_token", "context_image_token", "end_image_token")
    start, ctx_tok, end = (getattr(tokenizer, n, None) for n in names)
    if not (start and ctx_tok and end):
        raise ExportError("the tokenizer has no InternVL image tokens (start/context/end_image_token)")
    content = f"{start}{ctx_tok * probe.n_image_tokens}{end}\n{probe.question}"
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _segments(ids: np.ndarray, is_image: np.ndarray) -> list[tuple[int, int, bool]]:
    """Contiguous runs (start, end, is_image)."""
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or is_image[i] != is_image[start]:
            runs.append((start, i, bool(is_image[start])))
            start = i
    return runs


def compare_logits(hf_model: Any, tokenizer: Any, gguf_path: Path | str, probe: LogitProbe = LogitProbe()) -> dict:
    """Logits of every position, transformers vs llama.cpp, on a prompt with injected image embeddings."""
    torch = require("torch", "export")
    ids = np.asarray(build_probe_prompt(tokenizer, probe), dtype=np.int64)
    image_id = tokenizer.convert_tokens_to_ids(tokenizer.context_image_token)
    is_image = ids == image_id
    if int(is_image.sum()) != probe.n_image_tokens:
        raise ExportError(f"prompt has {int(is_image.sum())} image positions, expected {probe.n_image_tokens}")

    lm, head = hf_model.model.language_model, hf_model.lm_head
    embed = lm.embed_tokens.weight.detach()
    gen = torch.Generator().manual_seed(probe.seed)
    image_embeds = torch.randn(probe.n_image_tokens, embed.shape[1], generator=gen) * float(embed.float().std())
    with torch.no_grad():
        inputs = lm.embed_tokens(torch.from_numpy(ids)[None]).float()
        inputs[0, torch.from_numpy(is_image)] = image_embeds
        hidden = lm(inputs_embeds=inputs.to(embed.dtype)).last_hidden_state
        ref = head(hidden)[0].float().numpy()

    with LlamaSession(gguf_path, n_ctx=len(ids), n_threads=probe.n_threads) as sess:
        if sess.n_vocab != ref.shape[1]:
            raise ExportError(f"GGUF vocabulary {sess.n_vocab} != model vocabulary {ref.shape[1]}")
        parts, img_cursor = [], 0
        for a, b, img in _segments(ids, is_image):
            if img:
                parts.append(sess.decode(image_embeds[img_cursor: img_cursor + b - a].numpy()))
                img_cursor += b - a
            else:
                parts.append(sess.decode(ids[a:b].tolist()))
        got = np.concatenate(parts, axis=0)

    diff = np.abs(got - ref)
    scale = float(np.abs(ref).max())
    agree = ref.argmax(-1) == got.argmax(-1)
    result = {
        "gguf": str(gguf_path),
        "n_positions": int(len(ids)),
        "n_image_positions": int(is_image.sum()),
        "top1_agreement": float(agree.mean()),
        "top1_agreement_image_positions": float(agree[is_image].mean()),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "logit_scale": scale,
        "max_rel_diff": float(diff.max() / scale) if scale > 0 else float("inf"),
    }
    logger.info("logit check %s: top-1 %.4f, max |diff| %.3g (scale %.3g)", gguf_path, result["top1_agreement"],
                result["max_abs_diff"], scale)
    return result


def default_parity_probes(tokenizer: Any) -> list[str]:
    """Probe texts: chat template + image/special tokens read from the tokenizer, multilingual, emoji, code, spaces."""
    chat = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a face analysis assistant."},
         {"role": "user", "content": "How old is this person?"}], tokenize=False, add_generation_prompt=True)
    img = f"{tokenizer.start_image_token}{tokenizer.context_image_token * 5}{tokenizer.end_image_token}\n"
    specials = " ".join(tokenizer.all_special_tokens)
    return [
        chat,
        img + "Is the person smiling?",
        specials,
        "这个人看起来大约三十岁，戴着眼镜。",
        "يبدو أن هذا الشخص يبتسم.",
        "यह व्यक्ति लगभग तीस साल का लगता है।",
        "Этот человек выглядит счастливым.",
        "Emoji: 😀😃👩‍🔬👍🏽 🇨🇭",
        "Numbers: 3.14159 1,234,567 2026-11-26 0x1F 12345678901234567890",
        "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n",
        "   leading spaces\t\ttabs\n\n\nnewlines    trailing   ",
        "MiXeD cAsE, punctuation!? ... «quotes» — dashes –",
    ]


def tokenizer_parity(tokenizer: Any, gguf_path: Path | str, probe_texts: Sequence[str] | None = None) -> dict:
    """llama.cpp ids (parse_special=True) == transformers ids (add_special_tokens=False) on each probe text."""
    texts = list(probe_texts) if probe_texts is not None else default_parity_probes(tokenizer)
    if not texts:
        raise ExportError("tokenizer parity needs at least one probe text")
    first_mismatch = None
    n_match = 0
    with LlamaSession(gguf_path, n_ctx=64) as sess:
        for text in texts:
            hf_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            ll_ids = sess.tokenize(text, parse_special=True)
            if hf_ids == ll_ids:
                n_match += 1
            elif first_mismatch is None:
                first_mismatch = {"text": text, "hf": hf_ids, "llama_cpp": ll_ids}
    return {"gguf": str(gguf_path), "n_texts": len(texts), "n_match": n_match,
            "percent": 100.0 * n_match / len(texts), "first_mismatch": first_mismatch}
