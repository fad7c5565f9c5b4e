"""The chat template as token ids: ``prompt.first`` split around the image and the question, the follow-up turn,
and the image blocks, tokenised once per model with the GGUF's own tokenizer (InternVL semantics: one
``<img>`` + ``<IMG_CONTEXT>`` * rows + ``</img>`` block per image)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from facellm_edge.bundle import PromptSpec, TokenSpec
from facellm_edge.errors import BundleError

if TYPE_CHECKING:
    from facellm_edge.llm.engine import LlamaEngine


@dataclass(frozen=True)
class PromptTemplate:
    """``prompt.first`` split as ``pre + {image} + mid + {question} + post`` (``pre`` holds the system turn, if any);
    ``sep`` between the images of one prompt (None: one image only); followup as ``f_pre + {q} + f_post``."""

    pre: list[int]
    sep: list[int] | None
    mid: list[int]
    post: list[int]
    f_pre: list[int]
    f_post: list[int]
    tokens: TokenSpec

    @classmethod
    def build(cls, prompt: PromptSpec, tokens: TokenSpec, engine: "LlamaEngine") -> "PromptTemplate":
        """Tokenise the bundle's prompt pieces; check that the GGUF knows the manifest's image token ids."""
        _check_token_ids(tokens, engine)
        img, q = prompt.image_marker, prompt.question_marker
        head, system, first = prompt.first_parts()
        follow = prompt.followup
        if first.count(img) != 1 or first.count(q) != 1 or first.index(img) > first.index(q) or img in head:
            raise BundleError(f"prompt.first must contain {img} and then {q} exactly once each; re-export the bundle")
        if follow.count(q) != 1 or img in follow:
            raise BundleError(f"prompt.followup must contain {q} exactly once and no {img}; re-export the bundle")
        pre, rest = first.split(img)
        mid, post = rest.split(q)
        f_pre, f_post = follow.split(q)
        tok = engine.tokenize

        def special(text: str) -> list[int]:
            return tok(text, special=True) if text else []

        bos = [engine.bos_id] if engine.add_bos else []
        # The system message is the operator's text: tokenised as plain text, like the question.
        pre_ids = bos + special(head) + (tok(system, special=False) if system else []) + special(pre)
        sep = None if prompt.image_separator is None else special(prompt.image_separator)
        return cls(pre_ids, sep, special(mid), special(post), special(f_pre), special(f_post), tokens)

    def image_texts(self, n_images: int) -> list[list[int]]:
        """The token ids before each of ``n_images`` images, in turn: ``pre <img>``, then ``</img> sep <img>``
        between images. What a face's image prefix decodes with the images' embeddings; the last image's ``</img>``
        and the text up to the question (:meth:`question_head`) come with the first question, as llama.cpp's own
        mtmd helpers decode them (one ``llama_decode`` call fewer per new face)."""
        if n_images > 1 and self.sep is None:
            raise BundleError("this bundle's chat template cannot show several images in one question "
                              "(prompt.image_separator is null); ask about one image at a time")
        tk = self.tokens
        between = [tk.image_end_id] + (self.sep or []) + [tk.image_start_id]
        return [self.pre + [tk.image_start_id]] + [between] * (n_images - 1)

    def question_head(self) -> list[int]:
        """The tokens between the last image's embeddings and the first question: ``</img>`` + ``mid``."""
        return [self.tokens.image_end_id] + self.mid

    def first_turn(self, image_rows: Sequence[int], question_ids: list[int]) -> list[int]:
        """The first turn as token ids, with ``image_context`` ids where the image embeddings go (``image_rows``:
        rows per image): what the checkpoint's processor makes ``input_ids`` of. The same layout the generator
        decodes (:meth:`image_texts`, :meth:`question_head`)."""
        ids: list[int] = []
        for text, rows in zip(self.image_texts(len(image_rows)), image_rows):
            ids += text + [self.tokens.image_context_id] * rows
        return ids + self.question_head() + question_ids + self.post


def _check_token_ids(t: TokenSpec, engine: "LlamaEngine") -> None:
    for text, tid in ((t.image_start, t.image_start_id), (t.image_end, t.image_end_id),
                      (t.image_context, t.image_context_id)):
        got = engine.tokenize(text, special=True)
        if got != [tid]:
            raise BundleError(f"the GGUF tokenises {text!r} as {got}, the manifest says [{tid}]; re-export the bundle")
    if t.num_image_tokens < 1 or not t.eos_ids:
        raise BundleError("manifest tokens need num_image_tokens >= 1 and at least one eos id; re-export the bundle")
