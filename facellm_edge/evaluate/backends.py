"""The model side of the eval: a transformers checkpoint (several images per question) or an edge bundle through
the runtime Python API (one image per question)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from facellm_edge.errors import CheckpointError, InputError, UsageError, require
from facellm_edge.evaluate.mcq import MCQItem

log = logging.getLogger(__name__)


class MCQBackend(Protocol):
    name: str
    model: str
    max_images: int | None  # None: any number of images per question

    def answer(self, item: MCQItem) -> str: ...

    def close(self) -> None: ...


def _read_bgr(path: Path):
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise InputError(f"image {path} cannot be decoded")
    return img


@dataclass(frozen=True)
class TransformersConfig:
    model: str  # local checkpoint folder or hub id (Idiap/FaceLLM-1B)
    max_new_tokens: int = 16
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"
    revision: str | None = None


class TransformersBackend:
    """``InternVLForConditionalGeneration`` + its processor (``load_processor``: also checkpoints without a video
    token), greedy decoding; each image is its own image block."""

    name = "transformers"
    max_images = None

    def __init__(self, config: TransformersConfig) -> None:
        torch = require("torch", "export")
        transformers = require("transformers", "export")
        if config.dtype not in ("float32", "bfloat16", "float16"):
            raise UsageError(f"--dtype must be float32, bfloat16 or float16, got {config.dtype!r}")
        try:
            device = torch.device(config.device)
        except RuntimeError as exc:
            raise UsageError(f"--device {config.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from exc
        self.config, self.model = config, config.model
        self._torch = torch
        from facellm_edge.export.checkpoint import load_processor  # also checkpoints without a video token

        self._processor = load_processor(config.model, revision=config.revision)
        try:
            model = transformers.InternVLForConditionalGeneration.from_pretrained(
                config.model, revision=config.revision, dtype=getattr(torch, config.dtype))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load InternVL checkpoint {config.model!r}: {str(exc).splitlines()[0]}") from exc
        try:
            self._model = model.to(device).eval()
        except (RuntimeError, AssertionError) as exc:  # e.g. cuda asked for on a machine without it
            raise UsageError(f"cannot place the model on --device {config.device}: {str(exc).splitlines()[0]}") from exc

    def encode(self, item: MCQItem):
        """The processor's model inputs for one question (chat template, one image block per image)."""
        from PIL import Image

        images = [Image.fromarray(_read_bgr(p)[:, :, ::-1].copy()) for p in item.images]
        content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": item.prompt()}]
        inputs = self._processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt",
        ).to(self._model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        return inputs

    def answer(self, item: MCQItem) -> str:
        inputs = self.encode(item)
        with self._torch.inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=self.config.max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        return self._processor.decode(new, skip_special_tokens=True)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class BundleConfig:
    bundle: Path
    max_new_tokens: int = 16
    llm_quant: str | None = None  # None: the bundle's preferred GGUF
    vision_precision: str | None = None  # None: the bundle's preferred ONNX


class BundleBackend:
    """The edge runtime (ONNX vision + GGUF LLM) through ``facellm_edge.pipeline.FaceLLM``; full-image questions use
    ``ask_crop`` (no face detection), one image per question."""

    name = "bundle"
    max_images = 1

    def __init__(self, config: BundleConfig) -> None:
        try:
            from facellm_edge.pipeline import FaceLLM, RuntimeConfig
        except ImportError as exc:
            raise UsageError("--bundle needs the edge runtime (facellm_edge.pipeline), which this install lacks; "
                             "use --model PATH_OR_ID (transformers) instead") from exc
        self.config, self.model = config, str(config.bundle)
        self.model = f"{config.bundle} (llm {config.llm_quant or 'preferred'}, vision " \
                     f"{config.vision_precision or 'preferred'})"
        self._stack = contextlib.ExitStack()  # the API's promised interface is the context manager
        self._llm = self._stack.enter_context(FaceLLM.load(config.bundle, RuntimeConfig(
            llm_quant=config.llm_quant, vision_precision=config.vision_precision,
            max_tokens=config.max_new_tokens, temperature=0.0)))

    def answer(self, item: MCQItem) -> str:
        if len(item.images) != 1:
            raise UsageError(f"question {item.id} has {len(item.images)} images; the bundle runtime answers one image "
                             "per question")
        return self._llm.ask_crop(_read_bgr(item.images[0]), item.prompt(), max_tokens=self.config.max_new_tokens,
                                  temperature=0.0).text

    def close(self) -> None:
        self._stack.close()


def check_supported(items: list[MCQItem], backend_name: str, max_images: int | None) -> None:
    """Refuse up front (not half-way) when the backend cannot take some questions' image counts."""
    if max_images is None:
        return
    too_many = [it for it in items if len(it.images) > max_images]
    if too_many:
        raise UsageError(
            f"{len(too_many)} of {len(items)} questions have more than {max_images} image(s) (e.g. {too_many[0].id}, "
            f"{len(too_many[0].images)} images); the {backend_name} backend cannot answer them: use --model "
            "(transformers), which takes several images per question"
        )
