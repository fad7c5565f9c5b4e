"""Load the InternVL base (optionally 4/8-bit) and wrap the *whole* model in a PEFT LoRA.

LoRA targets are matched by module path so the vision tower is never hit unless asked (``--lora-vision``); the
projector is trained in full with ``--train-projector`` (PEFT ``modules_to_save``, so it lives in the adapter and
``merge_and_unload`` puts it back). The adapter is therefore loadable with
``PeftModel.from_pretrained(InternVLForConditionalGeneration..., DIR).merge_and_unload()``.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path
from typing import Any

from facellm_edge.errors import CheckpointError, UsageError, require
from facellm_edge.train.config import TrainConfig

log = logging.getLogger(__name__)

ARCHITECTURE = "InternVLForConditionalGeneration"
LLM_TARGETS = (r"model\.language_model\.layers\.\d+\."
               r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))")
VISION_TARGETS = (r"model\.vision_tower\.encoder\.layer\.\d+\."
                  r"(attention\.(q_proj|k_proj|v_proj|projection_layer)|mlp\.(fc1|fc2))")
PROJECTOR = "multi_modal_projector"


def check_base(base: str) -> Any:
    """Load the base's config and make sure it is a transformers-native InternVL checkpoint."""
    transformers = require("transformers", "train")
    try:
        config = transformers.AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the config of base {base!r}: {str(exc).splitlines()[0]} "
                              "(pass --base with a hub id or a local checkpoint directory)") from exc
    found = list(getattr(config, "architectures", None) or [])
    if config.model_type != "internvl" or (found and ARCHITECTURE not in found):
        raise CheckpointError(f"base {base!r} is {', '.join(found) or config.model_type} (model_type "
                              f"{config.model_type!r}), not {ARCHITECTURE}: use the transformers-native "
                              "checkpoint (e.g. Idiap/FaceLLM-1B or an OpenGVLab/InternVL3-*-hf model)")
    return config


def lora_targets(cfg: TrainConfig) -> str:
    return f"({LLM_TARGETS}|{VISION_TARGETS})" if cfg.lora_vision else LLM_TARGETS


def load_model(cfg: TrainConfig, *, dtype: Any, device_index: int | None) -> Any:
    """The base model in ``dtype`` (quantised with bitsandbytes when asked), gradient checkpointing if asked."""
    transformers = require("transformers", "train")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.load_in_4bit or cfg.load_in_8bit:
        flag = "--load-in-4bit" if cfg.load_in_4bit else "--load-in-8bit"
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UsageError(f"{flag} needs bitsandbytes (QLoRA): pip install bitsandbytes")
        if device_index is None:
            raise UsageError(f"{flag} needs a CUDA GPU (bitsandbytes kernels); drop it to train on CPU")
        keep = ["vision_tower", PROJECTOR, "lm_head"]
        if cfg.load_in_4bit:
            q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                                                llm_int8_skip_modules=keep)
        else:
            q = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
        kwargs.update(quantization_config=q, device_map={"": device_index})
    model = transformers.InternVLForConditionalGeneration.from_pretrained(cfg.base, **kwargs)
    if cfg.load_in_4bit or cfg.load_in_8bit:
        peft = require("peft", "train")
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def wrap_lora(model: Any, cfg: TrainConfig) -> Any:
    """PeftModel around the whole InternVL; only LoRA (and, if asked, projector) parameters require grad."""
    peft = require("peft", "train")
    lora = peft.LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
        target_modules=lora_targets(cfg), modules_to_save=[PROJECTOR] if cfg.train_projector else None,
    )
    peft_model = peft.get_peft_model(model, lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA r=%d alpha=%d on %s: %d trainable of %d parameters (%.3f%%)", cfg.lora_rank, cfg.lora_alpha,
             "LLM + vision" if cfg.lora_vision else "LLM", trainable, total, 100.0 * trainable / max(total, 1))
    return peft_model


def merge_adapter(base: str, adapter_dir: Any, out_dir: Any) -> None:
    """Load the base fresh, apply the saved adapter, merge and save a full checkpoint + processor files."""
    peft = require("peft", "train")
    transformers = require("transformers", "train")
    model = transformers.InternVLForConditionalGeneration.from_pretrained(base, dtype="auto")
    merged = peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir)
    from facellm_edge.export.checkpoint import load_processor  # also checkpoints without a video token

    load_processor(base).save_pretrained(out_dir)


FSDP_SEGMENT = "_fsdp_wrapped_module."


def save_adapter(peft_model: Any, state_dict: dict[str, Any], out_dir: Any) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format) from a full state dict.

    PEFT selects adapter entries by the module names of the live model; under FSDP those names contain
    ``_fsdp_wrapped_module.`` while the gathered state dict's keys do not. So the state dict is keyed by the live
    names for PEFT's selection and the FSDP segment is dropped from the result (a no-op without FSDP).
    """
    peft = require("peft", "train")
    from safetensors.torch import save_file

    live = {n.replace(FSDP_SEGMENT, ""): n for n, _ in peft_model.named_parameters()}
    keyed = {live.get(k, k): v for k, v in state_dict.items()}
    adapter = peft.get_peft_model_state_dict(peft_model, state_dict=keyed)
    adapter = {k.replace(FSDP_SEGMENT, ""): v.detach().cpu().contiguous() for k, v in adapter.items()}
    if not adapter:
        raise CheckpointError("the trained model has no adapter weights to save (no LoRA layer matched)")
    config = copy.deepcopy(peft_model.peft_config["default"])
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    base_cls = type(peft_model.get_base_model())
    config.save_pretrained(str(out_dir), auto_mapping_dict={"base_model_class": base_cls.__name__,
                                                            "parent_library": base_cls.__module__})
    save_file(adapter, str(Path(out_dir) / "adapter_model.safetensors"), metadata={"format": "pt"})
