"""What the runtime can be told: one frozen :class:`RuntimeConfig` nesting one frozen config per stage.

Each stage owns its defaults (one source for the Python API and the CLI, whose options read them from these
fields): :class:`~facellm_edge.runtime.detect.DetectorConfig` (which detector, threshold, max faces),
:class:`~facellm_edge.runtime.align.CropConfig` (crop size and margin),
:class:`~facellm_edge.runtime.encode.EncoderConfig` (ONNX Runtime device, precision, threads),
:class:`~facellm_edge.llm.engine.EngineConfig` (which GGUF, context, threads, KV slots, seed) and
:class:`~facellm_edge.llm.sampling.GenerationConfig` (max tokens, temperature, grammar). The rest (image size
bound, system message, hash check) belongs to the runtime as a whole. Every value is checked when the config is
made, so a bad one fails before any bundle is resolved, exported on first use, or loaded.

    RuntimeConfig(generation=GenerationConfig(max_tokens=64), engine=EngineConfig(n_ctx=2048))
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from facellm_edge.bundle import PromptSpec
from facellm_edge.io import DEFAULT_MAX_PIXELS
from facellm_edge.llm.engine import EngineConfig
from facellm_edge.llm.sampling import GenerationConfig
from facellm_edge.llm.system_prompt import resolve_system
from facellm_edge.runtime.align import CropConfig
from facellm_edge.runtime.detect import DetectorConfig
from facellm_edge.runtime.encode import EncoderConfig

__all__ = ["CropConfig", "DetectorConfig", "EncoderConfig", "EngineConfig", "GenerationConfig", "RuntimeConfig"]

PROMPT_CELLS = 64  # per face beside the image tokens: the chat template (11 tokens with the Qwen2.5 template of
# the tests' bundles: 6 around the image, 5 after the question) and a question of up to ~50 tokens
MIN_AUTO_SLOTS = 4
MAX_AUTO_SLOTS = 64


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything :meth:`FaceLLM.load <facellm_edge.runtime.pipeline.FaceLLM.load>` can be told."""

    detector: DetectorConfig = field(default_factory=DetectorConfig)
    crop: CropConfig = field(default_factory=CropConfig)  # size follows the bundle's tile size at load
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    # engine.max_slots None: as many conversations as the context holds, n_ctx // (image tokens + 64 + max_tokens),
    # at least 4 (as far as their image prompts fit: n_ctx // (image tokens + 64)) and at most 64 (FaceLLM-1B,
    # 4096 ctx, 128 tokens: 9). Each costs n_vocab * 4 bytes of llama.cpp output buffer (0.6 MB at Qwen2.5's
    # vocabulary) whether used or not; the KV cells are shared.
    engine: EngineConfig = field(default_factory=EngineConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # per-call overrides: ask(max_tokens=...)
    check_hashes: bool = True  # re-check every bundle file's sha256 at load
    max_pixels: int = DEFAULT_MAX_PIXELS  # image files above this are refused from their header (0 = no limit)
    # The system message: None = the bundle's own (manifest prompt.system: none unless exported with --system);
    # "none" | "intern_vl" | the message text (facellm_edge.llm.system_prompt).
    system: str | None = None

    def __post_init__(self) -> None:
        from facellm_edge.errors import UsageError
        from facellm_edge.llm.sampling import int_field, typed_field

        for name, kind in (("detector", DetectorConfig), ("crop", CropConfig), ("encoder", EncoderConfig),
                           ("engine", EngineConfig), ("generation", GenerationConfig)):
            # a dict here would fail later as an AttributeError naming no field
            typed_field(self, name, kind, f"a {kind.__name__} (e.g. {kind.__name__}(...))")
        typed_field(self, "check_hashes", bool, "True or False")
        int_field(self, "max_pixels")
        typed_field(self, "system", str, "a string (none, intern_vl or the message text)", optional=True)
        if self.system is not None:
            resolve_system(self.system)
        if self.max_pixels < 0:
            raise UsageError(f"max_pixels {self.max_pixels} must be >= 0 (0 = no limit)")

    def prompt_for(self, prompt: PromptSpec) -> PromptSpec:
        """The bundle's prompt with this config's system message (``system`` None: the bundle's unchanged)."""
        return prompt if self.system is None else prompt.with_system(resolve_system(self.system))

    def slots_for(self, num_image_tokens: int) -> int:
        """``engine.max_slots``, or when it is None the number of faces a context of ``n_ctx`` holds (see above)."""
        if self.engine.max_slots is not None:
            return self.engine.max_slots
        per_face = num_image_tokens + PROMPT_CELLS + self.generation.max_tokens
        # ... but never more faces than the context holds the image prompts of: their prefill is one batch, and on
        # a small --ctx four faces' prompts did not fit (every ask on a group photo failed: "no free KV cells")
        prompts_fit = max(1, self.engine.n_ctx // (num_image_tokens + PROMPT_CELLS))
        return min(prompts_fit, max(MIN_AUTO_SLOTS, min(MAX_AUTO_SLOTS, self.engine.n_ctx // per_face)))

    def resolve(self, image_size: int, num_image_tokens: int) -> "RuntimeConfig":
        """This config for a bundle: the crop at the bundle's tile size, the KV slots counted."""
        crop = self.crop if self.crop.size == image_size else replace(self.crop, size=image_size)
        return replace(self, crop=crop, engine=replace(self.engine, max_slots=self.slots_for(num_image_tokens)))

    def for_live(self) -> "RuntimeConfig":
        """The live-loop thread policy: the detector gets 1 thread (when left unset); the vision encoder and
        llama.cpp keep every core. Measured on 2 cores (bench's kiosk run, FaceLLM-1B int8 + q4_0): with the
        detector on every 3rd frame (``LiveConfig.detect_every`` auto on small CPUs), encoder and llama.cpp on both
        cores brought a new person's first token from 10.5 s (the former policy: 1 llama.cpp + 1 encoder thread,
        the detector on every frame) to 7.2 s (medians of 3) while the frame loop held 30 FPS, p99 < 65 ms.
        The detector's resolution is not changed: at 320 px (``--detect-size 320``) the same run gave the first token
        in 6.0 s, but YuNet then misses faces under ~32 px and found a false face in t1.jpg that 640 px does not."""
        d = self.detector
        return replace(self, detector=replace(d, n_threads=1 if d.n_threads is None else d.n_threads))
