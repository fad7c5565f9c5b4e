"""Resolve, validate and load an InternVL (FaceLLM) checkpoint, optionally merging a PEFT LoRA adapter.

Everything is read from the checkpoint's own files (config, processor, tokenizer); nothing about the model is
hard-coded here. Problems are reported as :class:`CheckpointError` with a one-line message *before* torch or
transformers get a chance to raise a traceback (config shape, safetensors headers and sizes, adapter fit).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facellm_edge.errors import CheckpointError, UsageError, require
from facellm_edge.io import read_json_object

log = logging.getLogger(__name__)

ARCHITECTURE = "InternVLForConditionalGeneration"
MODEL_TYPE = "internvl"
TEXT_MODEL_TYPE = "qwen2"
# The original InternVL release (remote code, `trust_remote_code=True`) uses these names.
REMOTE_CODE_ARCHITECTURES = ("InternVLChatModel",)
REMOTE_CODE_MODEL_TYPES = ("internvl_chat",)
# What a hub snapshot needs: configs, weights, tokenizer and processor files (no duplicate .bin/.pt weights).
HUB_ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken")
SAFETENSORS_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
# The tokenizer attributes InternVL's image blocks need; a video token is optional (older -hf conversions lack it).
IMAGE_TOKEN_ATTRIBUTES = ("start_image_token", "context_image_token", "end_image_token")


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: Any  # InternVLForConditionalGeneration, eval mode (LoRA merged when an adapter was given)
    processor: Any  # InternVLProcessor
    tokenizer: Any  # processor.tokenizer
    config: Any  # InternVLConfig (== model.config)
    source: dict[str, Any]


# -- resolve -----------------------------------------------------------------------------------------------


def _looks_like_path(model: str) -> bool:
    """A local path the user meant, not a hub id: path syntax, or ``owner/name`` whose ``owner`` is a folder here
    (``ck/missing`` with a ``ck/`` beside: a mistyped checkpoint folder, not a hub lookup)."""
    return (model.startswith((".", "/", "~", "\\")) or model.count("/") > 1 or "\\" in model
            or ("/" in model and Path(model.split("/", 1)[0]).is_dir()))


def resolve_checkpoint(model: str, revision: str | None) -> tuple[Path, dict[str, Any]]:
    """Return ``(directory, source)`` for a local checkpoint directory or a Hugging Face hub id.

    ``source`` records what was asked for and what was used: ``model``, ``revision``, ``commit`` (the snapshot's
    commit hash for hub downloads, ``None`` for local directories) and ``path``.
    """
    local = Path(model).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{model} is a file; pass the checkpoint directory (the one with config.json)")
        if revision is not None:
            raise UsageError(f"--revision applies to hub ids only; {model} is a local directory")
        path = local.resolve()
        return path, {"model": model, "revision": None, "commit": None, "path": str(path)}

    hub = require("huggingface_hub", "export")
    errors = require("huggingface_hub.errors", "export")
    try:
        if _looks_like_path(model):
            raise ValueError("looks like a path")
        require("huggingface_hub.utils", "export").validate_repo_id(model)
    except (ValueError, errors.HFValidationError) as exc:
        raise CheckpointError(
            f"checkpoint not found: {model} is neither an existing directory nor a Hugging Face model id "
            "(e.g. Idiap/FaceLLM-1B)"
        ) from exc
    try:
        snapshot = Path(hub.snapshot_download(repo_id=model, revision=revision,
                                              allow_patterns=list(HUB_ALLOW_PATTERNS)))
    except errors.GatedRepoError as exc:
        raise CheckpointError(f"{model} is gated: accept its licence on huggingface.co and `hf auth login`") from exc
    except errors.RevisionNotFoundError as exc:
        raise CheckpointError(f"revision {revision!r} not found in {model}") from exc
    except errors.RepositoryNotFoundError as exc:
        raise CheckpointError(f"{model} is not a local directory and no such model exists on the hub "
                              "(or it is private: `hf auth login`)") from exc
    except errors.LocalEntryNotFoundError as exc:
        raise CheckpointError(f"cannot download {model}: no connection to the hub and no cached copy; "
                              "pass a local checkpoint directory") from exc
    except OSError as exc:  # disk full, permissions on the cache
        raise CheckpointError(f"cannot download {model}: {exc}") from exc
    # The hub cache stores each snapshot under snapshots/<commit hash>.
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else None
    source = {"model": model, "revision": revision, "commit": commit, "path": str(snapshot)}
    log.info("resolved %s@%s -> %s", model, revision or "main", snapshot)
    return snapshot, source


# -- validate ----------------------------------------------------------------------------------------------


def inspect_config(directory: Path) -> dict[str, Any]:
    """Read ``config.json`` and check that this is a transformers-native InternVL with a Qwen2 LLM."""
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json: not a Hugging Face checkpoint directory")
    config = read_json_object(path, CheckpointError)
    for key, kind, what in (("architectures", list, "a list of class names"), ("text_config", dict, "an object"),
                            ("vision_config", dict, "an object")):
        if key in config and not isinstance(config[key], kind):  # untrusted: say which key, not a Python error
            raise CheckpointError(f"{path}: '{key}' must be {what}, got {type(config[key]).__name__}; the checkpoint "
                                  "is damaged")
    archs = [str(a) for a in config.get("architectures") or []]
    model_type = config.get("model_type")
    found = ", ".join(archs) if archs else f"model_type {model_type!r}"
    if any(a in REMOTE_CODE_ARCHITECTURES for a in archs) or model_type in REMOTE_CODE_MODEL_TYPES:
        raise CheckpointError(
            f"{directory} is an original remote-code InternVL checkpoint ({found}); use its transformers-native "
            "'-hf' version (InternVLForConditionalGeneration), e.g. OpenGVLab/InternVL3-1B-hf"
        )
    if model_type != MODEL_TYPE or (archs and ARCHITECTURE not in archs):
        raise CheckpointError(
            f"{directory} is a {found} checkpoint; facellm-edge exports InternVL ({ARCHITECTURE}) with a Qwen2 LLM"
        )
    text_type = (config.get("text_config") or {}).get("model_type")
    if text_type != TEXT_MODEL_TYPE:
        raise CheckpointError(
            f"{directory} is an InternVL checkpoint with a {text_type!r} LLM; facellm-edge exports InternVL with a "
            f"Qwen2 LLM ({TEXT_MODEL_TYPE})"
        )
    return config


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files (single file or the shards named by the index)."""
    directory = Path(directory)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json_object(index, CheckpointError).get("weight_map")
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
            raise CheckpointError(f"{index} has no weight_map of tensor names to files: the checkpoint is damaged")
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} has no *.safetensors weights (facellm-edge reads safetensors only)")
    return files


def check_safetensors(path: Path) -> int:
    """Open ``path``'s header and check that the file holds every tensor it declares; return the tensor count."""
    safetensors = require("safetensors", "export")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file {path.name} is missing from {path.parent}; re-download the checkpoint")
    try:
        with open(path, "rb"):  # safetensors reports EACCES as "No such file": say what really stops us
            pass
    except OSError as exc:
        raise CheckpointError(f"cannot read weight file {path}: {(exc.strerror or str(exc)).lower()}") from exc
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return len(list(f.keys()))
    except Exception as exc:  # SafetensorError has no importable base class across versions
        raise CheckpointError(
            f"weight file {path} is corrupted or truncated ({exc}); re-download the checkpoint"
        ) from exc


# -- load --------------------------------------------------------------------------------------------------


def _declared_token(tokenizer: Any, name: str) -> str | None:
    """The token the tokenizer declares under ``name`` (``extra_special_tokens``), None when it declares none."""
    try:
        value = getattr(tokenizer, name)
    except AttributeError:  # transformers 5 raises for undeclared model-specific tokens
        return None
    return str(value) if value else None


def load_processor(source: str | Path, revision: str | None = None) -> Any:
    """transformers' ``InternVLProcessor`` for a checkpoint folder or hub id, also when its tokenizer declares no
    ``video_token``.

    transformers 5's ``InternVLProcessor.__init__`` reads ``tokenizer.video_token``, which older InternVL3-hf
    conversions do not declare (``AttributeError``), although images need only ``<img>``, ``</img>`` and
    ``<IMG_CONTEXT>``. So the processor is assembled here from the checkpoint's own parts (what ``AutoProcessor``
    does): for such a tokenizer the image token stands in as the video token while the processor is built (its
    image-or-video pattern then only ever matches images) and the processor's ``video_token`` is ``None``
    afterwards, which turns transformers' video checks off. Only this processor instance is touched.
    """
    transformers = require("transformers", "export")
    kwargs = {"revision": revision} if revision is not None else {}
    where = f"{source}" + (f"@{revision}" if revision else "")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
        image_processor = transformers.AutoImageProcessor.from_pretrained(source, **kwargs)
        video_processor = transformers.AutoVideoProcessor.from_pretrained(source, **kwargs)
        settings, _ = transformers.InternVLProcessor.get_processor_dict(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot load the processor/tokenizer of {where}: {str(exc).strip().splitlines()[0]}") \
            from exc
    missing = [n for n in IMAGE_TOKEN_ATTRIBUTES if _declared_token(tokenizer, n) is None]
    if missing:
        raise CheckpointError(f"the tokenizer of {where} declares no {', '.join(missing)} (extra_special_tokens in "
                              "tokenizer_config.json): not an InternVL-hf checkpoint")
    unknown = [t for t in (_declared_token(tokenizer, n) for n in IMAGE_TOKEN_ATTRIBUTES)
               if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if unknown:
        raise CheckpointError(f"the tokenizer of {where} has no token for {', '.join(unknown)}")
    has_video = _declared_token(tokenizer, "video_token") is not None
    if not has_video:
        tokenizer.video_token = tokenizer.context_image_token  # a plain attribute of this instance, removed below
    try:
        processor = transformers.InternVLProcessor(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
            **{k: settings[k] for k in ("image_seq_length", "chat_template") if k in settings})
    finally:
        if not has_video:
            del tokenizer.video_token
    if not has_video:
        processor.video_token = None
        log.info("%s declares no video token: images only", where)
    return processor


def load_model(directory: Path, adapter: Path | None = None, dtype: Any = None) -> LoadedCheckpoint:
    """Load model (eval), processor and tokenizer from ``directory``; merge ``adapter`` (PEFT LoRA) if given.

    ``dtype`` defaults to ``torch.float32`` (what the ONNX and GGUF exports are derived from).
    """
    torch = require("torch", "export")
    transformers = require("transformers", "export")
    directory = Path(directory)
    dtype = torch.float32 if dtype is None else dtype
    inspect_config(directory)
    for f in safetensors_files(directory):
        check_safetensors(f)
    if adapter is not None:  # fail fast, before the weights are loaded
        read_adapter_config(Path(adapter))
        adapter_files = sorted(Path(adapter).glob("*.safetensors"))
        if not adapter_files:
            raise CheckpointError(f"adapter {adapter} has no *.safetensors weights")
        for f in adapter_files:
            check_safetensors(f)
    verbosity = transformers.utils.logging.get_verbosity()
    # transformers' own reports (its table of odd keys, config warnings) are said in one line below; shapes that do
    # not fit are loaded as mismatched_keys (not raised as "look at the above report") so that line can name them
    transformers.utils.logging.set_verbosity_error()
    try:
        processor = load_processor(directory)
        model, info = transformers.InternVLForConditionalGeneration.from_pretrained(
            directory, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the weights of {directory}: {exc}") from exc
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    # Weights the config has no place for are dropped by transformers without a word (a config of 1 layer over
    # weights of 2 exported, and verified against the same cut-down model); unknown tensors raise, never skip.
    # Rotary inv_freq buffers of older conversions are recomputed from the config: not weights.
    info["unexpected_keys"] = [k for k in info.get("unexpected_keys") or [] if not k.endswith("rotary_emb.inv_freq")]
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        detail = "; ".join(f"{k}: {', '.join(map(str, v[:3]))}{' …' if len(v) > 3 else ''}"
                           for k, v in problems.items() if v)
        raise CheckpointError(f"weights of {directory} do not match its config ({detail})")
    model.eval()
    source: dict[str, Any] = {"path": str(directory)}
    if adapter is not None:
        model = merge_adapter(model, Path(adapter), directory)
        source["adapter"] = str(Path(adapter).resolve())
    log.info("loaded %s (%s)%s", directory, dtype, f" + adapter {adapter}" if adapter else "")
    return LoadedCheckpoint(model=model, processor=processor, tokenizer=processor.tokenizer, config=model.config,
                            source=source)


def read_adapter_config(adapter: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT adapter directory, checked before any weights are loaded."""
    cfg_path = Path(adapter) / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{adapter} is not a PEFT adapter: no {ADAPTER_CONFIG}")
    config = read_json_object(cfg_path, CheckpointError)
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{adapter} is a {config.get('peft_type')!r} adapter; only LoRA adapters can be merged")
    return config


def merge_adapter(model: Any, adapter: Path, base_dir: Path) -> Any:
    """``PeftModel.from_pretrained(model, adapter).merge_and_unload()`` with one-line errors when it does not fit."""
    peft = require("peft", "train")
    adapter_cfg = read_adapter_config(adapter)
    base_name = adapter_cfg.get("base_model_name_or_path")
    if base_name and base_name not in (str(base_dir), base_dir.name, getattr(model, "name_or_path", None)):
        log.warning("adapter %s was trained on %s, applying it to %s", adapter, base_name, base_dir)
    try:
        peft_model = peft.PeftModel.from_pretrained(model, adapter)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:  # TypeError: e.g. "r": "four" in its config
        first = str(exc).strip().splitlines()
        reason = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else repr(exc))
        raise CheckpointError(f"adapter {adapter} does not fit the checkpoint {base_dir}: {reason}") from exc
    _check_adapter_complete(peft, peft_model, adapter, base_dir)
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged


def _check_adapter_complete(peft: Any, peft_model: Any, adapter: Path, base_dir: Path) -> None:
    """Every LoRA module PEFT created on this base must have weights in the adapter (PEFT only warns)."""
    safetensors = require("safetensors", "export")
    saved: set[str] = set()
    for f in sorted(adapter.glob("*.safetensors")):
        with safetensors.safe_open(str(f), framework="pt") as handle:
            saved.update(handle.keys())
    if not saved:
        raise CheckpointError(f"adapter {adapter} has no *.safetensors weights")
    # save_embedding_layers=False: "auto" would look the base model up on the hub.
    expected = set(peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False).keys())
    missing = sorted(expected - saved)
    if missing:
        raise CheckpointError(
            f"adapter {adapter} does not fit the checkpoint {base_dir}: it has no weights for {len(missing)} of the "
            f"{len(expected)} LoRA tensors its target_modules select here (e.g. {missing[0]})"
        )
    # LoRA tensors for modules this base (with these target_modules) does not have: PEFT ignores them silently
    extra = sorted(k for k in saved - expected if ".lora_" in k)
    if extra:
        raise CheckpointError(
            f"adapter {adapter} does not fit the checkpoint {base_dir}: {len(extra)} of its LoRA tensors belong to "
            f"no module its target_modules select here (e.g. {extra[0]}); it was trained for another base or with "
            "other target_modules"
        )
