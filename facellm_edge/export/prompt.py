"""Derive the bundle's prompt, token and image specs from the checkpoint's own processor and tokenizer files.

Nothing here is hard-coded for InternVL3: the chat template is *rendered* with sentinel strings and cut into the
pieces the runtime needs, and every token string and id is read from the processor/tokenizer.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from facellm_edge.bundle import ArchSpec, ImageSpec, PromptSpec, TokenSpec
from facellm_edge.errors import CheckpointError, ExportError
from facellm_edge.io import read_json_object
from facellm_edge.llm.system_prompt import system_messages

log = logging.getLogger(__name__)

_Q1 = "\u2063FACELLM_EDGE_Q1\u2063"
_A1 = "\u2063FACELLM_EDGE_A1\u2063"
_Q2 = "\u2063FACELLM_EDGE_Q2\u2063"
_SYS = "\u2063FACELLM_EDGE_SYSTEM\u2063"
# Probe sizes for the processor's tiling at export: a square photo (9 tiles + thumbnail with InternVL3's 1..12) and a
# wide one (2 tiles + thumbnail): what the processor returns for them must be what the runtime computes.
_TILING_PROBES = ((1024, 1024), (600, 1300))


def _render(processor: Any, messages: list[dict[str, Any]]) -> str:
    try:
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja errors, missing template
        raise CheckpointError(f"cannot render the checkpoint's chat template: {exc}") from exc


def _user(n_images: int, text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def _image_separator(processor: Any, first: str) -> str | None:
    """What the template renders between consecutive images of one user turn (None: not a plain separator, so the
    runtime cannot build several-image prompts for this template)."""
    tok = processor.image_token
    pre, rest = first.split(tok)
    try:
        two, three = _render(processor, [_user(2, _Q1)]), _render(processor, [_user(3, _Q1)])
    except CheckpointError as exc:
        log.warning("several images per question disabled: %s", exc)
        return None
    start = len(pre) + len(tok)
    end = two.find(tok, start)
    sep = two[start:end] if two.startswith(pre + tok) and end >= 0 else None
    if sep is None or two != pre + tok + sep + tok + rest or three != pre + (tok + sep) * 2 + tok + rest:
        log.warning("several images per question disabled: the chat template does not render N images as N "
                    "placeholders joined by one separator")
        return None
    return sep


def _first_system(processor: Any) -> str | None:
    """``first`` rendered after a system turn whose text is the system marker (None: the template cannot)."""
    try:
        text = _render(processor, [*system_messages(_SYS), _user(1, _Q1)])
    except CheckpointError as exc:
        log.warning("no system-turn prompt: %s", exc)
        return None
    if any(text.count(m) != 1 for m in (_SYS, processor.image_token, _Q1)):
        log.warning("no system-turn prompt: the chat template does not render a system message once")
        return None
    return (text.replace(processor.image_token, PromptSpec.image_marker)
            .replace(_Q1, PromptSpec.question_marker).replace(_SYS, PromptSpec.system_marker))


def prompt_spec(processor: Any, system: str | None = None) -> PromptSpec:
    """Render the chat template for one and for two turns and cut out ``first`` and ``followup``; for 2 and 3 images
    (``image_separator``) and after a system turn (``first_system``). ``system``: the bundle's default system
    message (None: none)."""
    image_token = processor.image_token
    one = [_user(1, _Q1)]
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
    first_system = _first_system(processor)
    if system is not None and first_system is None:
        raise ExportError("--system: the checkpoint's chat template cannot render a system message (see the "
                          "warning above); export with --system none")
    template = getattr(processor, "chat_template", None) or processor.tokenizer.chat_template
    separator = _image_separator(processor, first)
    return PromptSpec(
        first=first.replace(image_token, PromptSpec.image_marker).replace(_Q1, PromptSpec.question_marker),
        followup=followup,
        chat_template=template if isinstance(template, str) else json.dumps(template),
        image_separator=separator,
        first_system=first_system,
        system=system,
    )


def _eos_ids(checkpoint_dir: Path, tokenizer: Any, config: Any) -> tuple[int, ...]:
    ids: list[int] = []
    gen = checkpoint_dir / "generation_config.json"
    sources: list[Any] = []
    if gen.is_file():
        sources.append(read_json_object(gen, CheckpointError).get("eos_token_id"))
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


def processor_tiling(processor: Any) -> tuple[bool, int, int]:
    """``(crop_to_patches, min_patches, max_patches)`` as the processor applies them to the images it is given.

    transformers' ``InternVLProcessor`` passes its own ``images_kwargs`` (``crop_to_patches=True``) to the image
    processor, and they override the image processor's config: InternVL3-hf checkpoints say ``crop_to_patches:
    false`` in their image processor config, yet every image that goes through the processor (``apply_chat_template``,
    generation, FaceLLM's evaluation) is tiled. Read the merged kwargs the processor itself uses; fall back to its
    class defaults and then the image processor's attributes. (``_check_tiling`` then runs the processor itself on
    probe images: whatever is read here must agree with what it does.)"""
    ip = processor.image_processor
    merged = _merged_images_kwargs(processor)

    def get(name: str, default: Any) -> Any:
        value = merged.get(name)
        return getattr(ip, name, default) if value is None else value

    return bool(get("crop_to_patches", False)), int(get("min_patches", 1)), int(get("max_patches", 12))


def _merged_images_kwargs(processor: Any) -> dict[str, Any]:
    """The ``images_kwargs`` the processor passes to its image processor, through ``ProcessorMixin._merge_kwargs``,
    a private API whose signature changed within transformers 5: up to 5.17 it takes the model's kwargs class first
    (``InternVLProcessorKwargs``: the processing module's ``<Processor>Kwargs``, or the class's
    ``valid_processor_kwargs``), 5.24 finds it itself. Each failing form falls through to the next, then to the class
    defaults those kwargs hold (``_defaults`` / ``images_kwargs``)."""
    init = processor.tokenizer.init_kwargs
    try:
        return dict(processor._merge_kwargs(tokenizer_init_kwargs=init)["images_kwargs"])
    except Exception:  # noqa: BLE001 - the older signature (or none): the kwargs class is needed
        pass
    cls = type(processor)
    # the module's class first: ProcessorMixin's own valid_processor_kwargs (5.14) is the generic, default-less one
    kwargs_cls = getattr(sys.modules.get(cls.__module__), f"{cls.__name__}Kwargs", None) or getattr(
        cls, "valid_processor_kwargs", None)
    if kwargs_cls is not None:
        try:
            return dict(processor._merge_kwargs(kwargs_cls, tokenizer_init_kwargs=init)["images_kwargs"])
        except Exception:  # noqa: BLE001 - neither form: the class defaults below
            pass
    defaults = getattr(kwargs_cls, "_defaults", None) or {}
    return dict(defaults.get("images_kwargs") or getattr(processor, "images_kwargs", None) or {})


def tiles_for(height: int, width: int, spec: ImageSpec) -> int:
    """How many tiles (thumbnail included) an image of this size becomes under ``spec``."""
    from facellm_edge.runtime.preprocess import optimal_grid

    if not spec.crop_to_patches:
        return 1
    cols, rows = optimal_grid(height, width, spec.size, spec.min_tiles, spec.max_tiles)
    return cols * rows + (1 if spec.use_thumbnail and cols * rows > 1 else 0)


def image_spec(processor: Any) -> ImageSpec:
    ip = processor.image_processor
    size = ip.size
    height = size["height"] if isinstance(size, dict) else size.height
    width = size["width"] if isinstance(size, dict) else size.width
    if height != width:
        raise CheckpointError(f"non-square tiles ({width}x{height}) are not supported")
    resample = getattr(ip, "resample", 3)
    if getattr(resample, "value", resample) != 3:  # PIL's BICUBIC
        log.warning("the image processor resamples with %s; the runtime resizes with bicubic (InternVL's)", resample)
    crop, min_tiles, max_tiles = processor_tiling(processor)
    spec = ImageSpec(
        size=int(height),
        mean=tuple(float(x) for x in ip.image_mean),
        std=tuple(float(x) for x in ip.image_std),
        min_tiles=min_tiles,
        max_tiles=max_tiles,
        use_thumbnail=True,  # GotOcr2ImageProcessor appends a thumbnail whenever it makes more than one tile
        crop_to_patches=crop,
    )
    _check_tiling(processor, spec)
    return spec


def _check_tiling(processor: Any, spec: ImageSpec) -> None:
    """The processor itself, on probe images, must make as many tiles as the runtime will (else: a processor this
    exporter does not understand; refusing is better than a bundle that sees images differently)."""
    import numpy as np

    for h, w in _TILING_PROBES:
        try:
            # "pt": transformers 5.0's fast image processors return nothing else (and export has torch)
            out = processor(text=[processor.image_token], images=[np.zeros((h, w, 3), np.uint8)], return_tensors="pt")
        except Exception as exc:  # the processor's own failure, named
            raise CheckpointError(f"the checkpoint's processor cannot preprocess a {w}x{h} image: {exc}") from exc
        got, want = int(out["pixel_values"].shape[0]), tiles_for(h, w, spec)
        if got != want:
            raise ExportError(f"the checkpoint's processor makes {got} tiles of a {w}x{h} image, facellm-edge "
                              f"computed {want} (crop_to_patches {spec.crop_to_patches}, tiles {spec.min_tiles}.."
                              f"{spec.max_tiles}); this processor is not supported yet")


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
