"""Derive the bundle's prompt, token and image specs from the checkpoint's own processor and tokenizer files.

Nothing here is hard-coded for InternVL3: the chat template is *rendered* with sentinel strings and cut into the
pieces the runtime needs, and every token string and id is read from the processor/tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from facellm_edge.bundle import ArchSpec, ImageSpec, PromptSpec, TokenSpec
from facellm_edge.errors import CheckpointError, ExportError

_Q1 = "\u2063FACELLM_EDGE_Q1\u2063"
_A1 = "\u2063FACELLM_EDGE_A1\u2063"
_Q2 = "\u2063FACELLM_EDGE_Q2\u2063"


def _render(processor: Any, messages: list[dict[str, Any]]) -> str:
    try:
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja errors, missing template
        raise CheckpointError(f"cannot render the checkpoint's chat template: {exc}") from exc


def prompt_spec(processor: Any) -> PromptSpec:
    """Render the chat template for one and for two turns and cut out ``first`` and ``followup``."""
    image_token = processor.image_token
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _Q1}]}]
    two = one + [
        {"role": "assistant", "content": [{"type": "text", "text": _A1}]},
        {"role": "user", "content": [{"type": "text", "text": _Q2}]},
    ]
    first, both = _render(processor, one), _render(processor, two)
    if first.count(image_token) != 1 or first.count(_Q1) != 1:
        raise ExportError(
            f"the chat template renders the image placeholder {image_token!r} {first.count(image_token)} times "
            "for one image; expected exactly once"
        )
    head = first.split(_Q1)[0]
    if not both.startswith(head) or _A1 not in both or both.count(_Q2) != 1:
        raise ExportError("the chat template is not prefix-stable across turns; multi-turn KV reuse is impossible")
    # `followup` starts right after the answer text: the runtime never decodes the answer's end-of-turn token.
    followup = both.split(_A1, 1)[1].replace(_Q2, PromptSpec.question_marker)
    # Sanity: turn one of the two-turn rendering equals the one-turn rendering up to the answer.
    turn_one = both.split(_A1, 1)[0]
    if turn_one != first:
        raise ExportError("the chat template renders the first turn differently once an answer follows")
    template = getattr(processor, "chat_template", None) or processor.tokenizer.chat_template
    return PromptSpec(
        first=first.replace(image_token, PromptSpec.image_marker).replace(_Q1, PromptSpec.question_marker),
        followup=followup,
        chat_template=template if isinstance(template, str) else json.dumps(template),
    )


def _eos_ids(checkpoint_dir: Path, tokenizer: Any, config: Any) -> tuple[int, ...]:
    ids: list[int] = []
    gen = checkpoint_dir / "generation_config.json"
    sources: list[Any] = []
    if gen.is_file():
        sources.append(json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id"))
    sources.append(getattr(config.get_text_config(), "eos_token_id", None))
    sources.append(tokenizer.eos_token_id)
    for src in sources:
        for i in src if isinstance(src, (list, tuple)) else [src]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise CheckpointError("the checkpoint defines no end-of-sequence token (generation_config/tokenizer)")
    return tuple(ids)


def token_spec(processor: Any, config: Any, checkpoint_dir: Path) -> TokenSpec:
    tok = processor.tokenizer
    patches = config.vision_config.image_size[0] // config.vision_config.patch_size[0]
    per_tile = int(round(patches * patches * config.downsample_ratio**2))
    if processor.image_seq_length != per_tile:
        raise CheckpointError(
            f"processor image_seq_length {processor.image_seq_length} disagrees with the vision config "
            f"({patches}x{patches} patches, downsample {config.downsample_ratio} -> {per_tile} tokens per tile)"
        )
    if processor.image_token_id != config.image_token_id:
        raise CheckpointError(
            f"tokenizer id of {processor.image_token!r} is {processor.image_token_id} but config.image_token_id "
            f"is {config.image_token_id}"
        )
    return TokenSpec(
        image_context=processor.image_token,
        image_context_id=int(processor.image_token_id),
        image_start=processor.start_image_token,
        image_start_id=int(processor.start_image_token_id),
        image_end=processor.end_image_token,
        image_end_id=int(processor.end_image_token_id),
        num_image_tokens=per_tile,
        eos_ids=_eos_ids(checkpoint_dir, tok, config),
        bos_id=tok.bos_token_id,
        pad_id=tok.pad_token_id,
    )


def image_spec(processor: Any) -> ImageSpec:
    ip = processor.image_processor
    size = ip.size
    height = size["height"] if isinstance(size, dict) else size.height
    width = size["width"] if isinstance(size, dict) else size.width
    if height != width:
        raise CheckpointError(f"non-square tiles ({width}x{height}) are not supported")
    return ImageSpec(
        size=int(height),
        mean=tuple(float(x) for x in ip.image_mean),
        std=tuple(float(x) for x in ip.image_std),
        min_tiles=int(getattr(ip, "min_patches", 1)),
        max_tiles=int(getattr(ip, "max_patches", 12)),
        use_thumbnail=True,  # GotOcr2ImageProcessor appends a thumbnail whenever it makes more than one tile
    )


def arch_spec(config: Any) -> ArchSpec:
    v, t = config.vision_config, config.get_text_config()
    return ArchSpec(
        vision_hidden=v.hidden_size,
        vision_layers=v.num_hidden_layers,
        patch_size=int(v.patch_size[0]),
        downsample_ratio=float(config.downsample_ratio),
        llm_hidden=t.hidden_size,
        llm_layers=t.num_hidden_layers,
        llm_heads=t.num_attention_heads,
        llm_kv_heads=t.num_key_value_heads,
        vocab_size=t.vocab_size,
        context_length=t.max_position_embeddings,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False) or getattr(t, "tie_word_embeddings", False)),
    )
