"""Random-weight InternVL models with real architectures, built offline.

Used by the test suite (tiny dimensions) and by ``facellm-edge bench --synthetic`` (the exact dimensions of a
registry entry: compute does not depend on weight values). The tokenizer is a real Qwen2 byte-level BPE tokenizer
directory given by the caller, turned into an InternVL3 tokenizer the way transformers' own InternVL conversion
script does it: InternVL3's added tokens after the 151,643 regular ones and its plain ChatML chat template.
Token ids are never hard-coded: read them from the tokenizer this module saves.

The checkpoints look like the ones users have, not like what is convenient: the embedding has as many rows as
``tokenizer.json`` has tokens (151,674 for InternVL3's Qwen2.5, ``text_config.vocab_size``), so the ``<video>`` token
that InternVL3-hf conversions declare as an extra special token gets id 151,674, one past the last row, exactly as on
the hub; ``video_token=False`` builds an older -hf conversion without any video token, and ``text_bos=False`` one with
no BOS id anywhere (Qwen's tokenizer has ``bos_token: null``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facellm_edge.errors import require

# Qwen2's special tokens (151643..151664 in Qwen2/2.5) are kept; everything after them is replaced by InternVL3's.
QWEN_SPECIALS_LAST = "<|file_sep|>"
INTERNVL3_ADDED_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
INTERNVL_EXTRA_SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
# transformers' InternVL conversion script's chat template (plain ChatML; the image becomes <IMG_CONTEXT>).
INTERNVL3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class SyntheticSpec:
    """Dimensions of a random InternVL. Defaults: a tiny model that runs every stage in seconds on a CPU."""

    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 128
    image_size: int = 448
    patch_size: int = 14
    vision_norm_type: str = "layer_norm"
    vision_qk_norm: bool = False
    vision_attention_bias: bool = True
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    max_position_embeddings: int = 4096
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = True
    downsample_ratio: float = 0.5
    initializer_range: float = 0.02
    seed: int = 0
    extra_text: dict[str, Any] = field(default_factory=dict)
    video_token: bool = True  # declare <video> (InternVL3-hf); False: an older -hf conversion without one
    text_bos: bool = True  # text_config.bos_token_id = <|endoftext|> (InternVL3-hf); False: no BOS id anywhere

    @classmethod
    def from_registry(cls, name: str) -> "SyntheticSpec":
        from facellm_edge.registry import get_spec

        s = get_spec(name)
        v, t = s.vision, s.text
        return cls(
            vision_hidden=v["hidden_size"], vision_layers=v["num_hidden_layers"],
            vision_heads=v["num_attention_heads"], vision_intermediate=v["intermediate_size"],
            image_size=v["image_size"], patch_size=v["patch_size"], vision_norm_type=v["norm_type"],
            vision_qk_norm=v["use_qk_norm"], vision_attention_bias=v["attention_bias"],
            text_hidden=t["hidden_size"], text_layers=t["num_hidden_layers"], text_heads=t["num_attention_heads"],
            text_kv_heads=t["num_key_value_heads"], text_intermediate=t["intermediate_size"],
            max_position_embeddings=t["max_position_embeddings"], rope_theta=t["rope_theta"],
            tie_word_embeddings=t["tie_word_embeddings"], downsample_ratio=s.downsample_ratio,
        )


def build_internvl_tokenizer(qwen_dir: Path, out_dir: Path, *, video_token: bool = True) -> Path:
    """Write an InternVL3-style tokenizer (Qwen2 BPE + InternVL3 added tokens + ChatML template) to ``out_dir``.

    ``video_token``: declare ``<video>`` as a named extra special token, as InternVL3-hf checkpoints do (it is not
    in ``tokenizer.json``: transformers appends it after the file's tokens when loading).
    """
    qwen_dir, out_dir = Path(qwen_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = json.loads((qwen_dir / "tokenizer.json").read_text(encoding="utf-8"))
    added = tok["added_tokens"]
    keep_until = next(i for i, t in enumerate(added) if t["content"] == QWEN_SPECIALS_LAST)
    added = added[: keep_until + 1]
    next_id = added[-1]["id"] + 1
    for content in INTERNVL3_ADDED_TOKENS:
        added.append({"id": next_id, "content": content, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
        next_id += 1
    tok["added_tokens"] = added
    (out_dir / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(qwen_dir / name, out_dir / name)

    cfg = json.loads((qwen_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    decoder = {k: v for k, v in cfg.get("added_tokens_decoder", {}).items() if int(k) <= keep_until + added[0]["id"]}
    for t in added[keep_until + 1:]:
        decoder[str(t["id"])] = {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
    cfg["added_tokens_decoder"] = decoder
    cfg["additional_special_tokens"] = list(INTERNVL3_ADDED_TOKENS)
    cfg["extra_special_tokens"] = {k: v for k, v in INTERNVL_EXTRA_SPECIAL_TOKENS.items()
                                   if video_token or k != "video_token"}
    cfg["chat_template"] = INTERNVL3_CHAT_TEMPLATE
    cfg["eos_token"] = "<|im_end|>"
    cfg["pad_token"] = "<|endoftext|>"
    cfg["model_max_length"] = 8192
    cfg.pop("tokenizer_class", None)
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    return out_dir


def text_vocab_size(tokenizer_dir: Path) -> int:
    """Tokens in ``tokenizer.json`` (regular + added): the embedding rows of the checkpoint it belongs to."""
    tok = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok["added_tokens"]]
    return max(ids) + 1


def build_checkpoint(out_dir: Path, qwen_tokenizer_dir: Path, spec: SyntheticSpec = SyntheticSpec(),
                     *, dtype: str = "float32") -> Path:
    """Save a random-weight ``InternVLForConditionalGeneration`` + processor + tokenizer to ``out_dir``."""
    torch = require("torch", "export")
    transformers = require("transformers", "export")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_internvl_tokenizer(qwen_tokenizer_dir, out_dir)  # with <video>: transformers' processor needs one to save
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)

    vision = transformers.InternVLVisionConfig(
        hidden_size=spec.vision_hidden, num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads, intermediate_size=spec.vision_intermediate,
        image_size=[spec.image_size, spec.image_size], patch_size=[spec.patch_size, spec.patch_size],
        norm_type=spec.vision_norm_type, use_qk_norm=spec.vision_qk_norm, attention_bias=spec.vision_attention_bias,
        use_absolute_position_embeddings=True, initializer_range=spec.initializer_range,
    )
    text = transformers.Qwen2Config(
        hidden_size=spec.text_hidden, num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads, intermediate_size=spec.text_intermediate,
        vocab_size=text_vocab_size(out_dir), max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta, tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>") if spec.text_bos else None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        initializer_range=spec.initializer_range, **spec.extra_text,
    )
    patches = spec.image_size // spec.patch_size
    config = transformers.InternVLConfig(
        vision_config=vision, text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=int(patches * patches * spec.downsample_ratio**2),
        downsample_ratio=spec.downsample_ratio, tie_word_embeddings=spec.tie_word_embeddings,
    )
    config.architectures = ["InternVLForConditionalGeneration"]
    torch.manual_seed(spec.seed)
    model = transformers.InternVLForConditionalGeneration(config).to(getattr(torch, dtype)).eval()
    _vary_constant_parameters(model, spec.initializer_range)
    model.save_pretrained(out_dir)

    # InternVL3's preprocessing: 448 px tiles, ImageNet mean/std, bicubic, up to 12 tiles.
    pixels = dict(size={"height": spec.image_size, "width": spec.image_size},
                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3)
    image_processor = transformers.GotOcr2ImageProcessor(crop_to_patches=False, min_patches=1, max_patches=12, **pixels)
    processor = transformers.InternVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        video_processor=transformers.InternVLVideoProcessor(**pixels),
        image_seq_length=config.image_seq_length, chat_template=INTERNVL3_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    # The hub's tokenizer files, not transformers' re-save (which writes the appended <video> into tokenizer.json);
    # without a video token for an older -hf conversion.
    build_internvl_tokenizer(qwen_tokenizer_dir, out_dir, video_token=spec.video_token)
    return out_dir


def _vary_constant_parameters(model, std: float) -> None:
    """Give every parameter that transformers initialises to a constant (the position table and class token: 0;
    norm weights: 1, biases: 0; layer scales: 0.1) random values around that constant.

    Constant parameters hide converter bugs: zero q/k/v biases are interchangeable (torch.onnx even stores one shared
    tensor for all of them), and a position table written in the wrong row order still adds zeros. Compute does
    not depend on the values, so benchmarks of synthetic models are unaffected.
    """
    import torch

    with torch.no_grad():
        for p in model.parameters():
            flat = p.detach().reshape(-1)
            if p.is_floating_point() and flat.numel() > 0 and bool((flat == flat[0]).all()):
                p.add_(torch.randn_like(p) * std)
