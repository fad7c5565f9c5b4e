"""The model side of the eval: a transformers checkpoint or an edge bundle through the runtime Python API, both with
any number of images per question, each image tiled as the checkpoint's processor tiles it, and the same system
message (``none`` by default: how FaceLLM's authors evaluate)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from facellm_edge.errors import CheckpointError, UsageError, require
from facellm_edge.eval.mcq import MCQAnswer, MCQItem
from facellm_edge.eval.settings import DEFAULT_MAX_NEW_TOKENS
from facellm_edge.io import DEFAULT_MAX_PIXELS, read_image, read_image_rgb
from facellm_edge.llm.system_prompt import describe, resolve_system, system_messages

log = logging.getLogger(__name__)


class MCQBackend(Protocol):
    name: str
    model: str
    system: str  # the system message in effect, as a label (none | intern_vl | the text)
    max_images: int | None  # None: any number of images per question

    def answer(self, item: MCQItem) -> "MCQAnswer | str": ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class TransformersConfig:
    model: str  # local checkpoint folder or hub id (Idiap/FaceLLM-1B)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"
    revision: str | None = None
    system: str = "none"  # none | intern_vl | the text (facellm_edge.llm.system_prompt)
    max_pixels: int = DEFAULT_MAX_PIXELS  # image files above this are refused from their header (0 = no limit)


class TransformersBackend:
    """``InternVLForConditionalGeneration`` + its processor (``load_processor``: also checkpoints without a video
    token), greedy decoding; each image is its own image block, tiled by the processor as it is configured."""

    name = "transformers"
    max_images = None

    def __init__(self, config: TransformersConfig) -> None:
        self._system = resolve_system(config.system)  # a bad value fails before torch loads
        self.system = describe(self._system)
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
        eos = self._model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])

    def encode(self, item: MCQItem):
        """The processor's model inputs for one question (chat template, one image block per image)."""
        images = [read_image_rgb(p, self.config.max_pixels) for p in item.images]
        content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": item.prompt()}]
        messages = system_messages(self._system) + [{"role": "user", "content": content}]
        inputs = self._processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        ).to(self._model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        return inputs

    def answer(self, item: MCQItem) -> MCQAnswer:
        inputs = self.encode(item)
        with self._torch.inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=self.config.max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        truncated = len(new) >= self.config.max_new_tokens and not (new and new[-1] in self._eos)
        return MCQAnswer(self._processor.decode(new, skip_special_tokens=True), truncated=truncated)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class BundleConfig:
    bundle: Path
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    llm_quant: str | None = None  # None: the bundle's preferred GGUF
    vision_precision: str | None = None  # None: the bundle's preferred ONNX
    system: str | None = None  # None: the bundle's own (none unless exported with --system); none | intern_vl | text
    max_pixels: int = DEFAULT_MAX_PIXELS  # image files above this are refused from their header (0 = no limit)
    # llama.cpp context: None = the model's own context length (manifest arch.context_length), so every question the
    # checkpoint itself could take fits, whatever its images' tiles; the KV cache is allocated for all of it.
    n_ctx: int | None = None


class BundleBackend:
    """The edge runtime (ONNX vision + GGUF LLM) through ``facellm_edge.runtime.pipeline.FaceLLM.ask_images``: whole images,
    no face detection, any number per question, tiled as the checkpoint's processor tiles them."""

    name = "bundle"
    max_images = None

    def __init__(self, config: BundleConfig) -> None:
        try:
            from facellm_edge.runtime.config import EncoderConfig, EngineConfig, GenerationConfig, RuntimeConfig
            from facellm_edge.runtime.pipeline import FaceLLM
        except ImportError as exc:
            raise UsageError("--bundle needs the edge runtime (facellm_edge.runtime.pipeline), which this install lacks; "
                             "use --model PATH_OR_ID (transformers) instead") from exc
        from facellm_edge.bundle import load_bundle

        self.config = config
        self.model = f"{config.bundle} (llm {config.llm_quant or 'preferred'}, vision " \
                     f"{config.vision_precision or 'preferred'})"
        manifest = load_bundle(config.bundle, check_hashes=False).manifest  # FaceLLM.load checks the hashes
        runtime = RuntimeConfig(
            encoder=EncoderConfig(precision=config.vision_precision),
            engine=EngineConfig(quant=config.llm_quant, n_ctx=config.n_ctx or manifest.arch.context_length,
                                max_slots=1),
            generation=GenerationConfig(max_tokens=config.max_new_tokens, temperature=0.0),
            max_pixels=config.max_pixels, system=config.system)
        self.system = describe(runtime.prompt_for(manifest.prompt).system)
        if manifest.prompt.image_separator is None:  # a chat template that cannot show several images in one turn
            self.max_images = 1
        self._stack = contextlib.ExitStack()  # the API's promised interface is the context manager
        self._llm = self._stack.enter_context(FaceLLM.load(config.bundle, runtime))

    def answer(self, item: MCQItem) -> MCQAnswer:
        images = [read_image(p, self.config.max_pixels) for p in item.images]
        ans = self._llm.ask_images(images, item.prompt(), max_tokens=self.config.max_new_tokens, temperature=0.0)
        return MCQAnswer(ans.text, truncated=ans.stop_reason == "length")

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
