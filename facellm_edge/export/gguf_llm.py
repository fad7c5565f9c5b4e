"""InternVL's Qwen2 language model -> a llama.cpp GGUF file (arch ``qwen2``).

llama.cpp's ``convert_hf_to_gguf.py`` refuses ``InternVLForConditionalGeneration``, so this module writes the GGUF
itself with gguf-py, following what that converter does for Qwen2 (``_set_vocab_gpt2`` / ``get_vocab_base``):
tensors come from the *loaded* modules (transformers 5 saves InternVL with legacy key names, so raw safetensors
keys are not usable), their names are mapped by gguf-py's ``TensorNameMap`` for ``MODEL_ARCH.QWEN2``, and the
tokenizer is written as a byte-level BPE (``gpt2``) vocabulary with the ``qwen2`` pre-tokenizer.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facellm_edge.errors import ExportError, OutputError, UsageError, require
from facellm_edge.io import atomic_file, temporary_directory

logger = logging.getLogger(__name__)

# InternVL module path -> the Qwen2ForCausalLM names gguf's TensorNameMap knows.
LLM_PREFIXES = {
    "model.language_model.": "model.",  # Qwen2Model inside InternVLModel
    "lm_head.": "lm_head.",             # the output head (absent from named_parameters() when tied)
}
# Parameters that belong to the vision encoder export (ONNX), not to the GGUF.
VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")

FTYPES = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class GGUFReport:
    """What :func:`write_llm_gguf` wrote."""

    path: str
    ftype: str
    n_tensors: int
    n_params: int
    n_vocab: int
    n_tokenizer_tokens: int
    tied_embeddings: bool
    file_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None)
    if text is None or not hasattr(model, "model") or not hasattr(model.model, "language_model"):
        raise ExportError(f"expected a transformers InternVLForConditionalGeneration, got {type(model).__name__}; "
                          "load the checkpoint with InternVLForConditionalGeneration.from_pretrained")
    if getattr(text, "model_type", None) != "qwen2":
        raise ExportError(f"the language model is '{getattr(text, 'model_type', None)}', this exporter writes qwen2 "
                          "only (InternVL3 / FaceLLM use Qwen2.5)")
    return text


def _rope_theta(text: Any) -> float:
    params = getattr(text, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ExportError(f"rope type '{rope_type}' is not supported by the GGUF exporter (only 'default')")
    theta = params.get("rope_theta", getattr(text, "rope_theta", None))
    if theta is None:
        raise ExportError("the text config has no rope_theta")
    return float(theta)


def _is_tied(model: Any) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return True
    return head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def _llm_tensors(model: Any, n_blocks: int, tied: bool) -> list[tuple[str, Any]]:
    """(gguf name, torch tensor) for every language-model parameter; an unmapped parameter raises."""
    gguf = require("gguf", "export")
    name_map = gguf.TensorNameMap(gguf.MODEL_ARCH.QWEN2, n_blocks)
    out: list[tuple[str, Any]] = []
    seen = set()
    for key, param in model.named_parameters():  # shared (tied) tensors are listed once
        if key.startswith(VISION_PREFIXES):
            continue
        prefix = next((p for p in LLM_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise ExportError(f"parameter '{key}' is neither vision nor language model: cannot export it to GGUF")
        hf_name = LLM_PREFIXES[prefix] + key[len(prefix):]
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for tensor '{key}' (as '{hf_name}'): the qwen2 GGUF layout has no "
                              "place for it")
        if name in seen:
            raise ExportError(f"two tensors map to GGUF name '{name}' (second: '{key}')")
        seen.add(name)
        out.append((name, param.detach()))
    if tied and "output.weight" in seen:
        raise ExportError("the output head shares the input embeddings but was listed separately")
    if not tied and "output.weight" not in seen:
        raise ExportError("the model has an untied output head but no lm_head.weight parameter was found")
    return out


def _gguf_dtype(tensor: Any, ftype: str) -> tuple[Any, Any, int]:
    """(numpy dtype, raw GGML type or None, bytes) a tensor gets. 1-D tensors (norms, biases) stay f32."""
    gguf = require("gguf", "export")
    if tensor.ndim < 2 or ftype == "f32":
        return np.dtype(np.float32), None, tensor.numel() * 4
    if ftype == "f16":
        return np.dtype(np.float16), None, tensor.numel() * 2
    return np.dtype(np.int16), gguf.GGMLQuantizationType.BF16, tensor.numel() * 2  # raw bf16 words


def _to_numpy(tensor: Any, ftype: str) -> Any:
    """The tensor's data as :func:`_gguf_dtype` says (a bf16 checkpoint is written without an f32 copy)."""
    torch = require("torch", "export")
    t = tensor.cpu().contiguous()
    if t.ndim < 2 or ftype == "f32":
        return t.to(torch.float32).numpy()
    if ftype == "f16":
        return t.to(torch.float16).numpy()
    return t.to(torch.bfloat16).view(torch.int16).numpy()


def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def _vocab(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens in id order + their types, as llama.cpp's converter builds them for byte-level BPE.

    A token with an id past the embedding's rows can never be embedded nor produced by the model: InternVL3-hf
    checkpoints declare ``<video>`` as an extra special token, which transformers appends at id 151,674 of a
    151,674-row embedding. llama.cpp needs exactly one token per row, so such tokens are left out (one log line).
    """
    gguf = require("gguf", "export")
    reverse = {i: tok for tok, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    past = sorted(i for i in reverse if i >= n_vocab)
    regular = [i for i in past if i not in added]
    if regular:  # a BPE vocabulary larger than the embedding: another model's tokenizer
        raise ExportError(f"the tokenizer has id {max(regular)} but the embedding has only {n_vocab} rows: "
                          "tokenizer and checkpoint do not match")
    if past:
        logger.info("left out of the GGUF vocabulary %d token(s) with ids past the embedding's %d rows, which the "
                    "model can neither read nor write: %s", len(past), n_vocab,
                    ", ".join(f"{reverse[i]} ({i})" for i in past[:5]) + (" ..." if len(past) > 5 else ""))
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            # Like llama.cpp's converter: Qwen marks <|fim_prefix|> etc. non-special, yet they are control tokens.
            control = added[i].special or _looks_special(added[i].content)
            types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _special_vocab(tokenizer: Any, text: Any, n_vocab: int) -> Any:
    gguf = require("gguf", "export")
    # gguf-py's SpecialVocab reads a tokenizer folder: give it a temporary copy of the loaded tokenizer.
    with temporary_directory(prefix="facellm-tok-") as tmp:
        try:
            tokenizer.save_pretrained(tmp)
        except Exception as exc:  # the Rust tokenizers library raises a bare Exception for I/O errors
            raise OutputError(f"cannot write a temporary copy of the tokenizer in {tempfile.gettempdir()} ({exc}); "
                              "free disk space (or raise the file size limit) and retry") from exc
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise ExportError("the tokenizer has no BPE merges: a byte-level BPE (Qwen2) tokenizer is required")
    # Qwen's tokenizer has no BOS token; like llama.cpp's converter (SpecialVocab also reads config.json) use the
    # model's when its config names one, and write none otherwise (add_bos is off either way, as for Qwen2).
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(text, "bos_token_id", None)
    ids = {"bos": bos, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    for kind, tid in ids.items():
        if tid is None:
            if kind == "bos":
                special.special_token_ids.pop(kind, None)
                logger.debug("no BOS token id in the tokenizer or config: the GGUF names none")
                continue
            raise ExportError(f"the tokenizer/config has no {kind} token id")
        if not 0 <= int(tid) < n_vocab:
            raise ExportError(f"the {kind} token id {tid} is past the embedding's {n_vocab} rows: the model cannot "
                              "use it; tokenizer and checkpoint do not match")
        special.special_token_ids[kind] = int(tid)
    special.add_special_token = {"bos": False}
    special.chat_template = tokenizer.chat_template
    if not special.chat_template:
        raise ExportError("the tokenizer has no chat_template: the runtime needs it to build prompts")
    return special


def write_llm_gguf(model: Any, tokenizer: Any, out_path: Path | str, *, ftype: str = "f32",
                   name: str | None = None) -> GGUFReport:
    """Write the InternVL language model + tokenizer as a qwen2 GGUF at ``out_path`` (atomically)."""
    gguf = require("gguf", "export")
    if ftype not in FTYPES:
        raise UsageError(f"unknown GGUF ftype '{ftype}'; choose from {', '.join(FTYPES)} (quantise afterwards)")
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise OutputError(f"output folder {out_path.parent} does not exist; create it first")
    text = _text_config(model)
    if getattr(text, "use_sliding_window", False):
        raise ExportError("sliding-window attention is enabled in the text config; llama.cpp's qwen2 ignores it")

    n_blocks = int(text.num_hidden_layers)
    tied = _is_tied(model)
    tensors = _llm_tensors(model, n_blocks, tied)
    n_vocab = int(model.model.language_model.embed_tokens.weight.shape[0])
    tokens, types = _vocab(tokenizer, n_vocab)
    special = _special_vocab(tokenizer, text, n_vocab)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[ftype]

    try:
        # closing(): the writer is flushed and closed before atomic_file commits the file
        with atomic_file(out_path) as tmp, \
                contextlib.closing(gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])) as writer:
            # Only the checkpoint's folder/repo name: a local path would leak into every copy of the bundle.
            source = str(getattr(model.config, "_name_or_path", "") or "")
            writer.add_name(name or Path(source).name or "facellm")
            writer.add_context_length(int(text.max_position_embeddings))
            writer.add_embedding_length(int(text.hidden_size))
            writer.add_block_count(n_blocks)
            writer.add_feed_forward_length(int(text.intermediate_size))
            writer.add_head_count(int(text.num_attention_heads))
            writer.add_head_count_kv(int(text.num_key_value_heads))
            head_dim = getattr(text, "head_dim", None)
            if head_dim and int(head_dim) != text.hidden_size // text.num_attention_heads:
                writer.add_key_length(int(head_dim))
                writer.add_value_length(int(head_dim))
            writer.add_rope_freq_base(_rope_theta(text))
            writer.add_layer_norm_rms_eps(float(text.rms_norm_eps))
            writer.add_file_type(int(file_type))
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre("qwen2")
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            special.add_to_gguf(writer, quiet=True)

            # Stream: tensor infos first, then one tensor's data at a time (peak memory = one converted tensor).
            n_params = 0
            for gname, tensor in tensors:
                dtype, raw_dtype, nbytes = _gguf_dtype(tensor, ftype)
                writer.add_tensor_info(gname, tuple(tensor.shape), dtype, nbytes, raw_dtype=raw_dtype)
                n_params += tensor.numel()
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _, tensor in tensors:
                writer.write_tensor_data(_to_numpy(tensor, ftype))
    except OSError as exc:
        raise OutputError(f"cannot write {out_path}: {exc}") from exc
    report = GGUFReport(path=str(out_path), ftype=ftype, n_tensors=len(tensors), n_params=n_params,
                        n_vocab=n_vocab, n_tokenizer_tokens=len(tokenizer), tied_embeddings=tied,
                        file_bytes=out_path.stat().st_size)
    logger.info("wrote %s (%s, %d tensors, %d params, tied=%s)", out_path, ftype, report.n_tensors, n_params, tied)
    return report
