"""Turn a :class:`Sample` into model inputs with the model's own processor and chat template.

The prompt is rendered by ``processor.apply_chat_template`` (the template the exporter writes into the bundle, so
training and edge inference see the same text), the processor expands the image placeholder into
``<img><IMG_CONTEXT>*N</img>`` and preprocesses the face crop as one 448 px tile (``crop_to_patches`` off). Labels
are -100 everywhere except the assistant answers and their end-of-turn token: their character spans are taken from
the rendered template (prefix renders) and mapped to tokens through the tokenizer's offset mapping.

``system`` (``train --system``) opens every record that has no system message of its own with that system turn,
as LLaMA-Factory's template ``default_system`` does (FaceLLM was trained with ``intern_vl``'s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from facellm_edge.errors import CheckpointError, InputError, UsageError
from facellm_edge.io import read_image_rgb
from facellm_edge.llm.system_prompt import system_messages
from facellm_edge.train.data import Sample

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    pixel_values: Any  # torch.Tensor [tiles, 3, H, W]


class Encoder:
    """Callable used by the Dataset: ``Sample`` -> :class:`Encoded`."""

    def __init__(self, processor: Any, max_length: int, system: str | None = None) -> None:
        self.processor = processor
        self.system = system
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.end_of_turn = self.tokenizer.eos_token
        if not self.end_of_turn:
            raise CheckpointError("the tokenizer has no eos (end-of-turn) token: cannot find where answers end")
        self.image_token = processor.image_token
        self.reserved = (self.end_of_turn, self.image_token, getattr(processor, "video_token", None) or "")
        if system is not None and any(r and r in system for r in self.reserved):
            raise UsageError("--system must not contain the model's control tokens "
                             f"({', '.join(r for r in self.reserved if r)})")
        self.image_end_id = processor.end_image_token_id
        if self.tokenizer.pad_token_id is None:
            raise CheckpointError("the tokenizer has no pad token: set pad_token in tokenizer_config.json")
        self.pad_id = self.tokenizer.pad_token_id

    def messages(self, sample: Sample) -> list[dict[str, Any]]:
        """The record's messages, opened by ``system`` when the record brings no system message of its own."""
        messages = sample.messages()
        if self.system is not None and not (messages and messages[0]["role"] == "system"):
            messages = system_messages(self.system) + messages
        return messages

    def render(self, messages: list[dict[str, Any]], *, generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def answer_spans(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the [start, end) character spans of each answer + its end-of-turn."""
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (full.startswith(prefix) and full.startswith(upto) and upto.startswith(prefix)):
                raise CheckpointError("the chat template is not prefix-stable (a turn's rendering changes with "
                                      "later turns): cannot locate assistant answers for the loss mask")
            end = upto.find(self.end_of_turn, len(prefix))
            if end < 0:
                raise CheckpointError(f"the chat template does not close assistant turns with {self.end_of_turn}")
            spans.append((len(prefix), end + len(self.end_of_turn)))
        return full, spans

    def __call__(self, sample: Sample) -> Encoded:
        try:  # the runtime's reader: training sees the pixels the edge runtime will see
            image = read_image_rgb(sample.image)
        except InputError as exc:
            raise InputError(f"{exc} ({sample.where})") from exc
        text, spans = self.answer_spans(self.messages(sample))
        enc = self.processor(text=[text], images=[image], crop_to_patches=False, return_offsets_mapping=True,
                             return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        offsets = enc["offset_mapping"][0].tolist()
        # The processor replaced the image placeholder by a longer string ending with </img>: shift offsets after it
        # back into the rendered text's coordinates.
        placeholder_end = text.index(self.image_token) + len(self.image_token)
        img_end_tok = ids.index(self.image_end_id)
        shift = offsets[img_end_tok][1] - placeholder_end
        labels = [IGNORE_INDEX] * len(ids)
        for t in range(img_end_tok + 1, len(ids)):
            s, e = offsets[t][0] - shift, offsets[t][1] - shift
            if any(a <= s and e <= b for a, b in spans):
                labels[t] = ids[t]
        if len(ids) > self.max_length:
            if img_end_tok >= self.max_length:
                raise UsageError(f"{sample.where}: the image alone needs {img_end_tok + 1} tokens, more than "
                                 f"--max-length {self.max_length}")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return Encoded(ids, labels, enc["pixel_values"])


def collate(batch: list[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-pad a list of :class:`Encoded` into a batch (pad labels are -100, attention 0)."""
    import torch

    n = max(len(b.input_ids) for b in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b.input_ids)
        input_ids[i, :k] = torch.tensor(b.input_ids)
        labels[i, :k] = torch.tensor(b.labels)
        attention[i, :k] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
            "pixel_values": torch.cat([b.pixel_values for b in batch], dim=0)}


class EncodedDataset:
    """A map-style dataset (torch ``Dataset`` protocol) that encodes samples lazily."""

    def __init__(self, samples: list[Sample], encoder: Encoder) -> None:
        self.samples = samples
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Encoded:
        return self.encoder(self.samples[i])


@dataclass(frozen=True)
class PadCollator:
    """Picklable collate_fn (DataLoader workers)."""

    pad_id: int

    def __call__(self, batch: list[Encoded]) -> dict[str, Any]:
        return collate(batch, self.pad_id)
