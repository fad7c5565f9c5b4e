"""Check a GGUF against the transformers model it came from: logits with injected image embeddings, tokenizer ids.

The llama.cpp side runs through the runtime's own engine (:class:`facellm_edge.llm.engine.LlamaEngine`), so the
export verifies exactly the code path that answers questions on the device (same context settings, flash attention,
embedding injection).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facellm_edge.errors import ExportError, require
from facellm_edge.llm.engine import EngineConfig, LlamaEngine

logger = logging.getLogger(__name__)


def open_engine(gguf_path: Path | str, n_ctx: int, n_threads: int = 1) -> LlamaEngine:
    """A single-sequence llama.cpp engine for checks (the context rounded up to a multiple of 256)."""
    n_ctx = max(256, -(-int(n_ctx) // 256) * 256)
    return LlamaEngine(Path(gguf_path), EngineConfig(n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                                                     max_slots=1))


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

    engine = open_engine(gguf_path, len(ids), probe.n_threads)
    try:
        if engine.n_vocab != ref.shape[1]:
            raise ExportError(f"GGUF vocabulary {engine.n_vocab} != model vocabulary {ref.shape[1]}")
        parts, img_cursor = [], 0
        for a, b, img in _segments(ids, is_image):
            if img:
                item = image_embeds[img_cursor: img_cursor + b - a].numpy()
                img_cursor += b - a
            else:
                item = ids[a:b]
            parts.append(engine.logits_of(item, seq=0, pos0=a))
        got = np.concatenate(parts, axis=0)
    finally:
        engine.close()

    diff = np.abs(got - ref)
    scale = float(np.abs(ref).max())
    agree = ref.argmax(-1) == got.argmax(-1)
    # positions whose reference top-2 margin exceeds twice the difference there: only numerical noise could flip
    # their argmax otherwise, so agreement on them is exact or a real conversion error
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * diff.max(axis=-1)
    result = {
        "gguf": str(gguf_path),
        "n_positions": int(len(ids)),
        "n_image_positions": int(is_image.sum()),
        "top1_agreement": float(agree.mean()),
        "top1_agreement_image_positions": float(agree[is_image].mean()),
        "clear_positions": int(clear.sum()),
        "top1_agreement_clear_positions": float(agree[clear].mean()) if clear.any() else float("nan"),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "logit_scale": scale,
        "max_rel_diff": float(diff.max() / scale) if scale > 0 else float("inf"),
    }
    logger.info("logit check %s: top-1 %.4f, max |diff| %.3g (scale %.3g)", gguf_path, result["top1_agreement"],
                result["max_abs_diff"], scale)
    return result


def default_parity_probes(tokenizer: Any, n_vocab: int | None = None) -> list[str]:
    """Probe texts: chat template + image/special tokens read from the tokenizer, multilingual, emoji, code, spaces.

    ``n_vocab``: the GGUF's vocabulary size; special tokens with ids past it (InternVL3-hf's ``<video>``, appended
    after the embedding's rows) are not in the GGUF on purpose and are left out of the probes.
    """
    chat = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a face analysis assistant."},
         {"role": "user", "content": "How old is this person?"}], tokenize=False, add_generation_prompt=True)
    img = f"{tokenizer.start_image_token}{tokenizer.context_image_token * 5}{tokenizer.end_image_token}\n"
    specials = " ".join(t for t in tokenizer.all_special_tokens
                        if n_vocab is None or tokenizer.convert_tokens_to_ids(t) < n_vocab)
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
    first_mismatch = None
    n_match = 0
    engine = open_engine(gguf_path, 256)
    try:
        texts = list(probe_texts) if probe_texts is not None else default_parity_probes(tokenizer, engine.n_vocab)
        if not texts:
            raise ExportError("tokenizer parity needs at least one probe text")
        for text in texts:
            hf_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            ll_ids = engine.tokenize(text, special=True)
            if hf_ids == ll_ids:
                n_match += 1
            elif first_mismatch is None:
                first_mismatch = {"text": text, "hf": hf_ids, "llama_cpp": ll_ids}
    finally:
        engine.close()
    return {"gguf": str(gguf_path), "n_texts": len(texts), "n_match": n_match,
            "percent": 100.0 * n_match / len(texts), "first_mismatch": first_mismatch}
