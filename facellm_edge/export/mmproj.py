"""Vision tower + pixel shuffle + projector -> llama.cpp ``mmproj`` GGUF (clip.cpp projector type ``internvl``).

The file is what llama.cpp's ``llama-mtmd-cli`` / ``llama-server --mmproj`` / ollama load beside the LLM GGUF, and
what :class:`facellm_edge.export.mtmd_peer.MtmdVision` runs through libmtmd. It is written with gguf-py from the
loaded transformers-native ``InternVLForConditionalGeneration``; the layout follows llama.cpp's own converter for
InternVL (``convert_hf_to_gguf.py``, ``InternVisionModel``) and what ``tools/mtmd/clip.cpp`` reads:

* separate ``v.blk.N.attn_q/k/v`` (the transformers-native layout has separate q/k/v projections; the original
  InternVL layout fuses them into ``qkv``, which llama.cpp's converter splits into the same three tensors);
* InternViT's layer scales ``lambda_1/2`` become ``v.blk.N.ls1/ls2.weight``; the projector's LayerNorm / Linear /
  GELU / Linear become ``mm.model.mlp.0`` / ``.1`` / ``.3`` (gguf-py's ``V_MMPROJ_MLP``, indexed like InternVL's
  ``mlp1`` Sequential, as llama.cpp's converter maps ``mlp1.N``; the libmtmd of llama-cpp-python 0.3.36 refuses
  the older ``mm.0/1/3`` names for this projector);
* ``v.position_embd.weight`` is kept f32 (llama.cpp's converter forces it), so are the CLS token, every norm, bias
  and layer scale; the other matrices (incl. the patch-embedding kernel) are f16, or f32 with ``ftype="f32"``.

clip.cpp concatenates the CLS token *after* the patch tokens (``ggml_concat(patches, cls)``) and then adds
``v.position_embd`` row by row, while InternViT puts CLS first (position row 0 belongs to CLS). The position table
is therefore written with the CLS row moved to the end so that every token gets its own position embedding; see
``_cls_last``. The export verification (pipeline) compares mtmd's embeddings with ``model.get_image_features``
per token, so a layout error fails the export.

Every source tensor of the vision tower and the projector must match one entry of ``NAME_TABLE``: an unmapped name
raises (a new checkpoint layout must be added here on purpose, never dropped silently).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from facellm_edge.errors import ExportError, require
from facellm_edge.io import atomic_file

log = logging.getLogger(__name__)

MMPROJ_FILE = "mmproj-f16.gguf"
# Source prefixes that belong to the mmproj; everything else of the state dict must be an LLM prefix below.
VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")
LLM_PREFIXES = ("model.language_model.", "lm_head.")
FTYPES = ("f16", "f32")

# Storage class of a tensor: "matrix" follows the requested ftype (f16 by default), "f32" is always f32.
MATRIX, F32 = "matrix", "f32"


@dataclass(frozen=True)
class NameRule:
    """One row of the name table: a full-match regex on the source name (``(?P<bid>\\d+)`` = block index), the
    gguf-py tensor it becomes, the suffix appended to gguf's base name, and its storage class."""

    pattern: str
    tensor: str  # gguf.MODEL_TENSOR member name (resolved lazily so importing this module stays cheap)
    suffix: str
    storage: str


_VT = r"model\.vision_tower\."
_BLK = _VT + r"encoder\.layer\.(?P<bid>\d+)\."
_MM = r"model\.multi_modal_projector\."

NAME_TABLE: tuple[NameRule, ...] = (
    # -- embeddings ---------------------------------------------------------------------------------------
    # CLS token [1, 1, C]: clip.cpp concatenates it to the patch tokens; must be f32 like the activations.
    NameRule(_VT + r"embeddings\.cls_token", "V_ENC_EMBD_CLS", "", F32),
    # Patch embedding conv kernel [C, 3, p, p] (llama.cpp's converter stores it f16 in f16 files).
    NameRule(_VT + r"embeddings\.patch_embeddings\.projection\.weight", "V_ENC_EMBD_PATCH", ".weight", MATRIX),
    # Patch embedding conv bias [C].
    NameRule(_VT + r"embeddings\.patch_embeddings\.projection\.bias", "V_ENC_EMBD_PATCH", ".bias", F32),
    # Absolute position embeddings [1, 1 + N, C]; f32 (forced by llama.cpp's InternVL converter); CLS row moved last.
    NameRule(_VT + r"embeddings\.position_embeddings", "V_ENC_EMBD_POS", ".weight", F32),
    # -- encoder blocks -----------------------------------------------------------------------------------
    # Pre-attention norm (LayerNorm for InternViT-300M, RMSNorm for InternViT-6B).
    NameRule(_BLK + r"layernorm_before\.(?P<wb>weight|bias)", "V_ENC_INPUT_NORM", ".{wb}", F32),
    # Query projection (separate in the transformers-native layout) [C, C] and its bias.
    NameRule(_BLK + r"attention\.q_proj\.weight", "V_ENC_ATTN_Q", ".weight", MATRIX),
    NameRule(_BLK + r"attention\.q_proj\.bias", "V_ENC_ATTN_Q", ".bias", F32),
    # Key projection.
    NameRule(_BLK + r"attention\.k_proj\.weight", "V_ENC_ATTN_K", ".weight", MATRIX),
    NameRule(_BLK + r"attention\.k_proj\.bias", "V_ENC_ATTN_K", ".bias", F32),
    # Value projection.
    NameRule(_BLK + r"attention\.v_proj\.weight", "V_ENC_ATTN_V", ".weight", MATRIX),
    NameRule(_BLK + r"attention\.v_proj\.bias", "V_ENC_ATTN_V", ".bias", F32),
    # QK norms over the full hidden size (InternViT-6B only; clip.cpp applies them before the head split too).
    NameRule(_BLK + r"attention\.q_norm\.weight", "V_ENC_ATTN_Q_NORM", ".weight", F32),
    NameRule(_BLK + r"attention\.k_norm\.weight", "V_ENC_ATTN_K_NORM", ".weight", F32),
    # Attention output projection.
    NameRule(_BLK + r"attention\.projection_layer\.weight", "V_ENC_ATTN_O", ".weight", MATRIX),
    NameRule(_BLK + r"attention\.projection_layer\.bias", "V_ENC_ATTN_O", ".bias", F32),
    # Layer scale of the attention branch (InternViT's ls1).
    NameRule(_BLK + r"lambda_1", "V_LAYER_SCALE_1", ".weight", F32),
    # Pre-MLP norm.
    NameRule(_BLK + r"layernorm_after\.(?P<wb>weight|bias)", "V_ENC_POST_ATTN_NORM", ".{wb}", F32),
    # MLP fc1 (up) [I, C] and fc2 (down) [C, I]; no gate (plain GELU MLP).
    NameRule(_BLK + r"mlp\.fc1\.weight", "V_ENC_FFN_UP", ".weight", MATRIX),
    NameRule(_BLK + r"mlp\.fc1\.bias", "V_ENC_FFN_UP", ".bias", F32),
    NameRule(_BLK + r"mlp\.fc2\.weight", "V_ENC_FFN_DOWN", ".weight", MATRIX),
    NameRule(_BLK + r"mlp\.fc2\.bias", "V_ENC_FFN_DOWN", ".bias", F32),
    # Layer scale of the MLP branch (InternViT's ls2).
    NameRule(_BLK + r"lambda_2", "V_LAYER_SCALE_2", ".weight", F32),
    # Final norm of the tower (only when use_mean_pooling is False; Identity otherwise, then absent).
    NameRule(_VT + r"layernorm\.(?P<wb>weight|bias)", "V_POST_NORM", ".{wb}", F32),
    # -- projector (InternVL's mlp1: 0 LayerNorm, 1 Linear, 2 GELU, 3 Linear) ---------------------------------
    # LayerNorm over the pixel-shuffled features [C * 4].
    NameRule(_MM + r"layer_norm\.(?P<wb>weight|bias)", "V_MMPROJ_MLP", ".{wb}", F32),
    # First linear [text_hidden, C * 4].
    NameRule(_MM + r"linear_1\.weight", "V_MMPROJ_MLP", ".weight", MATRIX),
    NameRule(_MM + r"linear_1\.bias", "V_MMPROJ_MLP", ".bias", F32),
    # Second linear [text_hidden, text_hidden].
    NameRule(_MM + r"linear_2\.weight", "V_MMPROJ_MLP", ".weight", MATRIX),
    NameRule(_MM + r"linear_2\.bias", "V_MMPROJ_MLP", ".bias", F32),
)
# Projector slots = indices in InternVL's mlp1 Sequential: mm.model.mlp.0 (norm), .1 (first linear), .3 (second).
_MMPROJ_INDEX = {"layer_norm": 0, "linear_1": 1, "linear_2": 3}
_COMPILED = tuple((re.compile(r.pattern), r) for r in NAME_TABLE)


def gguf_name(source: str) -> tuple[str, str]:
    """Map one source tensor name to ``(gguf name, storage class)``; raise ExportError when no rule matches."""
    import gguf

    for rx, rule in _COMPILED:
        m = rx.fullmatch(source)
        if m is None:
            continue
        groups = m.groupdict()
        if rule.tensor == "V_MMPROJ_MLP":
            bid: int | None = _MMPROJ_INDEX[source[len("model.multi_modal_projector."):].split(".")[0]]
        else:
            bid = int(groups["bid"]) if groups.get("bid") is not None else None
        base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[rule.tensor]]
        base = base.format(bid=bid) if "{bid}" in base else base
        return base + rule.suffix.format(wb=groups.get("wb") or ""), rule.storage
    raise ExportError(f"mmproj export: no llama.cpp name for vision tensor '{source}'; "
                      "this checkpoint layout is not supported yet (add it to export/mmproj.py NAME_TABLE)")


def map_state_dict(names: list[str]) -> dict[str, tuple[str, str]]:
    """Source name -> (gguf name, storage) for every vision/projector tensor; LLM tensors are left out.

    Raises on a name that is neither an LLM tensor nor mapped, and on two sources mapping to one gguf name."""
    out: dict[str, tuple[str, str]] = {}
    seen: dict[str, str] = {}
    for name in names:
        if name.startswith(LLM_PREFIXES):
            continue
        if not name.startswith(VISION_PREFIXES):
            raise ExportError(f"mmproj export: tensor '{name}' is neither part of the vision tower/projector "
                              "nor of the language model; unknown checkpoint layout")
        target, storage = gguf_name(name)
        if target in seen:
            raise ExportError(f"mmproj export: '{name}' and '{seen[target]}' both map to '{target}'")
        seen[target] = name
        out[name] = (target, storage)
    return out


def _check_supported(config: Any) -> None:
    """Refuse configurations clip.cpp's InternVL graph would compute differently (it has no switch for them)."""
    v = config.vision_config
    rms_6b = v.hidden_size == 3200 and v.num_hidden_layers == 45  # clip.cpp picks RMSNorm by these dims only
    if (v.norm_type == "rms_norm") != rms_6b:
        raise ExportError(f"mmproj export: clip.cpp uses {'RMSNorm' if rms_6b else 'LayerNorm'} for a "
                          f"{v.hidden_size}x{v.num_hidden_layers} InternViT, this checkpoint uses {v.norm_type}")
    if v.hidden_act != "gelu" or getattr(config, "projector_hidden_act", "gelu") != "gelu":
        raise ExportError(f"mmproj export: activation '{v.hidden_act}' is not supported by clip.cpp's InternVL graph")
    if getattr(config, "vision_feature_layer", -1) != -1:
        raise ExportError("mmproj export: clip.cpp's InternVL graph uses the last vision layer; this checkpoint "
                          f"uses vision_feature_layer={config.vision_feature_layer}")
    if getattr(config, "vision_feature_select_strategy", "default") != "default":
        raise ExportError("mmproj export: only vision_feature_select_strategy='default' (drop CLS) is supported")
    if not getattr(v, "use_absolute_position_embeddings", True):
        raise ExportError("mmproj export: clip.cpp's InternVL graph needs absolute position embeddings")
    if v.image_size[0] != v.image_size[1] or v.patch_size[0] != v.patch_size[1]:
        raise ExportError(f"mmproj export: non-square tiles/patches {v.image_size}/{v.patch_size} are not supported")
    scale = 1.0 / config.downsample_ratio
    side = v.image_size[0] // v.patch_size[0]
    if abs(scale - round(scale)) > 1e-6 or side % round(scale):
        raise ExportError(f"mmproj export: downsample_ratio {config.downsample_ratio} does not divide the "
                          f"{side}x{side} patch grid")


def _cls_last(pos: Any) -> Any:
    """[1, 1 + N, C] with CLS first (InternViT) -> same table with the CLS row last (clip.cpp's token order)."""
    import numpy as np

    return np.concatenate([pos[:, 1:, :], pos[:, :1, :]], axis=1)


def _preproc_tiles(processor: Any) -> tuple[int, int]:
    """Tile range for clip.cpp's InternVL preprocessing: the one the checkpoint's processor really applies.

    That is the processor's, not its image processor's config: transformers' ``InternVLProcessor`` passes
    ``crop_to_patches=True`` itself, so an InternVL3-hf checkpoint whose image processor config says
    ``crop_to_patches: false`` still tiles a 1024x1024 image into 3x3 tiles + a thumbnail (10) with 1..12 patches.
    Only a processor that really does not tile gets (1, 1); libmtmd then still adds its overview image to a larger
    picture (2 tiles for 1024x1024, measured with llama-cpp-python 0.3.36), so feed it tile-sized images."""
    from facellm_edge.export.prompt import processor_tiling

    crop, min_tiles, max_tiles = processor_tiling(processor)
    return (min_tiles, max_tiles) if crop else (1, 1)


def write_mmproj_gguf(model: Any, processor: Any, out: Path, *, ftype: str = "f16",
                      state_dict: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the InternVL mmproj GGUF of ``model`` to ``out`` (atomically); return a small report.

    ``state_dict`` defaults to ``model.state_dict()`` (tests pass a modified one)."""
    if ftype not in FTYPES:
        raise ExportError(f"mmproj ftype '{ftype}' is not one of {', '.join(FTYPES)}")
    gguf = require("gguf", "export")
    import numpy as np

    config = model.config
    _check_supported(config)
    sd = dict(model.state_dict() if state_dict is None else state_dict)
    mapping = map_state_dict(list(sd))
    v = config.vision_config
    tc = config.get_text_config()
    ip = processor.image_processor
    n_pos = (v.image_size[0] // v.patch_size[0]) ** 2 + 1
    min_tiles, max_tiles = _preproc_tiles(processor)

    out = Path(out)
    # closing(): the writer is flushed and closed before atomic_file commits the file
    with atomic_file(out) as tmp, contextlib.closing(gguf.GGUFWriter(str(tmp), arch="clip")) as w:
        w.add_type(gguf.GGUFType.MMPROJ)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if ftype == "f16" else gguf.LlamaFileType.ALL_F32)
        w.add_name("InternVL vision tower + projector (facellm-edge)")
        w.add_clip_has_vision_encoder(True)
        w.add_clip_projector_type(gguf.VisionProjectorType.INTERNVL)
        w.add_vision_projection_dim(int(tc.hidden_size))
        w.add_vision_image_size(int(v.image_size[0]))
        w.add_vision_patch_size(int(v.patch_size[0]))
        w.add_vision_embedding_length(int(v.hidden_size))
        w.add_vision_feed_forward_length(int(v.intermediate_size))
        w.add_vision_block_count(int(v.num_hidden_layers))
        w.add_vision_head_count(int(v.num_attention_heads))
        w.add_vision_attention_layernorm_eps(float(v.layer_norm_eps))
        w.add_vision_use_gelu(True)
        w.add_vision_projector_scale_factor(int(round(1.0 / config.downsample_ratio)))
        w.add_vision_image_mean([float(x) for x in ip.image_mean])
        w.add_vision_image_std([float(x) for x in ip.image_std])
        w.add_vision_preproc_min_tiles(min_tiles)
        w.add_vision_preproc_max_tiles(max_tiles)
        counts = {"f16": 0, "f32": 0}
        for name, (target, storage) in mapping.items():
            arr = sd[name].detach().float().cpu().numpy()
            if target.startswith("v.position_embd"):
                if arr.shape[1] != n_pos:
                    raise ExportError(f"mmproj export: {name} has {arr.shape[1]} positions, expected {n_pos}")
                arr = _cls_last(arr)
            dtype = np.float16 if (storage == MATRIX and ftype == "f16") else np.float32
            w.add_tensor(target, np.ascontiguousarray(arr.astype(dtype)))
            counts["f16" if dtype == np.float16 else "f32"] += 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    log.info("mmproj %s: %d tensors (%d f16, %d f32)", out.name, len(mapping), counts["f16"], counts["f32"])
    return {"tensors": len(mapping), "ftype": ftype, "n_f16": counts["f16"], "n_f32": counts["f32"],
            "preproc_tiles": [min_tiles, max_tiles]}


def torch_image_features(model: Any, rgb: Any, mean: Any, std: Any) -> Any:
    """``model.get_image_features`` of one RGB uint8 tile, normalised as clip.cpp does: (x / 255 - mean) / std."""
    import numpy as np
    import torch

    pix = (rgb.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    pixels = torch.from_numpy(np.ascontiguousarray(pix.transpose(2, 0, 1)[None]))
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        feats = model.model.get_image_features(pixels.to(dtype), vision_feature_layer=-1,
                                               vision_feature_select_strategy="default")
    feats = getattr(feats, "pooler_output", feats)
    return feats[0].float().numpy().astype(np.float64)


def compare_embeddings(got: Any, expected: Any) -> dict[str, float]:
    """Max abs / relative difference, global cosine and the worst per-token cosine of [n_tokens, hidden] arrays."""
    import numpy as np

    got = np.asarray(got, np.float64)
    expected = np.asarray(expected, np.float64)
    diff = np.abs(got - expected)
    scale = float(np.abs(expected).max())
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1) + 1e-30
    token_cos = (got * expected).sum(axis=1) / norms
    cosine = float(got.ravel() @ expected.ravel() / (np.linalg.norm(got) * np.linalg.norm(expected) + 1e-30))
    return {"max_abs_diff": float(diff.max()), "max_rel_diff": float(diff.max() / scale) if scale > 0 else 0.0,
            "cosine": cosine, "token_cosine_min": float(token_cos.min()), "worst_token": int(token_cos.argmin())}


def verify_mmproj(model: Any, processor: Any, mmproj_path: Path, text_gguf: Path, *, n_threads: int,
                  seed: int = 0) -> dict[str, Any]:
    """Encode one seeded random tile-sized RGB image with libmtmd and with torch; compare token by token."""
    import numpy as np

    from facellm_edge.export.mtmd_peer import MtmdConfig, MtmdVision

    side = int(model.config.vision_config.image_size[0])
    rgb = np.random.default_rng(seed).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    ip = processor.image_processor
    expected = torch_image_features(model, rgb, ip.image_mean, ip.image_std)
    with MtmdVision(mmproj_path, text_gguf, MtmdConfig(n_threads=n_threads)) as vision:
        got = vision.encode(rgb)
    if got.shape != expected.shape:
        raise ExportError(f"mmproj: llama.cpp produced {got.shape[0]}x{got.shape[1]} image embeddings for a "
                          f"{side}x{side} image, torch {expected.shape[0]}x{expected.shape[1]}; export bug")
    report = {**compare_embeddings(got, expected), "n_tokens": int(got.shape[0]), "image": f"{side}x{side}",
              "seed": seed}
    log.info("verified %s: worst token cosine %.6f, max abs %.3g", Path(mmproj_path).name,
             report["token_cosine_min"], report["max_abs_diff"])
    return report
