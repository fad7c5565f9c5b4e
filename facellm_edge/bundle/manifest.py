"""The manifest's schema: what ``manifest.json`` says about a bundle (files, image, tokens, prompt, architecture),
checked field by field when it is read (:mod:`facellm_edge.typed`)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from facellm_edge.errors import BundleError
from facellm_edge.typed import SchemaError, check_value, load_typed, rule

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def relative_posix_path(p: str) -> str | None:
    """None when ``p`` is a normalised relative POSIX path (``llm/q4_0.gguf``); otherwise why it is not."""
    parts = p.split("/")
    if not p or p.startswith("/") or "\\" in p or re.match(r"^[A-Za-z]:", p) or "\0" in p:
        return f"must be a relative path inside the bundle, got {p!r}"
    if any(part in ("", ".", "..") for part in parts):
        return f"must be a normalised path inside the bundle (no '..', '.' or '//'), got {p!r}"
    return None


@dataclass(frozen=True)
class FileEntry:
    path: str = rule(check=relative_posix_path)  # relative to the bundle root, POSIX separators
    bytes: int = rule(min=0)
    sha256: str = rule(pattern=r"[0-9a-f]{64}")
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. bits_per_weight, fallback tensors, opset


MAX_TILE_SIZE = 2048
MAX_TILES = 64


@dataclass(frozen=True)
class ImageSpec:
    """How a whole image becomes tiles, as the checkpoint's processor does it (read from it at export).

    ``crop_to_patches``: whole images get InternVL's dynamic tiling (``min_tiles``..``max_tiles`` tiles + a thumbnail)
    instead of one resized tile. transformers' ``InternVLProcessor`` passes ``crop_to_patches=True`` to its image
    processor whatever the image processor's own config says, so this is True for InternVL3-hf checkpoints; bundles
    written before the field existed default to it too.
    """

    # Upper bounds: a manifest is untrusted, and each tile costs size^2 x 3 floats before the encoder sees it (a
    # tampered size of 60000 took 21 GB). InternVL3 uses 448 px and at most 12 tiles; the bounds leave room.
    size: int = rule(min=1, max=MAX_TILE_SIZE)  # tile side in pixels (448 for InternVL3)
    mean: tuple[float, float, float] = rule()
    std: tuple[float, float, float] = rule(min=1e-12)
    min_tiles: int = rule(default=1, min=1, max=MAX_TILES)
    max_tiles: int = rule(default=12, min=1, max=MAX_TILES)
    use_thumbnail: bool = True
    crop_to_patches: bool = True


@dataclass(frozen=True)
class TokenSpec:
    image_context: str  # "<IMG_CONTEXT>"
    image_context_id: int = rule(min=0)
    image_start: str = rule()  # "<img>"
    image_start_id: int = rule(min=0)
    image_end: str = rule()  # "</img>"
    image_end_id: int = rule(min=0)
    num_image_tokens: int = rule(min=1)  # per tile (256 for 448 px, patch 14, pixel shuffle 0.5)
    eos_ids: tuple[int, ...] = rule(min=0)
    bos_id: int | None = rule(default=None, min=0)
    pad_id: int | None = rule(default=None, min=0)


@dataclass(frozen=True)
class PromptSpec:
    """Prompt pieces rendered from the model's own chat template at export time.

    ``first`` (the first user turn, without a system turn) contains the markers ``{image}`` and ``{question}``
    exactly once each (plain ``str.replace``, no format-string semantics); ``{image}`` expands to
    ``image_start + image_context * (tokens * tiles) + image_end``, and several images of one question expand to
    such blocks joined by ``image_separator`` (what the template renders between consecutive images).
    ``followup`` is appended after an answer (whose end-of-turn token was *not* decoded) to ask another question.

    ``first_system`` is ``first`` rendered with a system turn whose text is ``{system}``; ``system`` is the system
    message the bundle uses unless the runtime is told otherwise (None: no system turn, as FaceLLM's authors run
    it). Bundles written before these fields existed have neither (no system turn; ``image_separator`` is what
    InternVL3-hf's template renders, ``"\n"``).
    """

    first: str
    followup: str
    chat_template: str
    image_marker: str = "{image}"
    question_marker: str = "{question}"
    image_separator: str | None = "\n"  # None: the template cannot show several images in one turn
    first_system: str | None = None
    system: str | None = None
    system_marker: str = "{system}"

    def with_system(self, system: str | None) -> "PromptSpec":
        """This prompt with ``system`` as its system message (None: no system turn)."""
        if system is not None and self.first_system is None:
            raise BundleError("this bundle records no system-turn prompt (exported before --system existed); "
                              "re-export it to use a system message")
        return replace(self, system=system)

    def first_parts(self) -> tuple[str, str | None, str]:
        """``first`` with the system message in effect, as (template text before the system message, the system
        message or None, template text after it): the runtime tokenises the message itself as plain text."""
        if self.system is None:
            return "", None, self.first
        if self.first_system is None or self.first_system.count(self.system_marker) != 1:
            raise BundleError(f"prompt.first_system must contain {self.system_marker} exactly once; "
                              "re-export the bundle")
        before, after = self.first_system.split(self.system_marker)
        return before, self.system, after


@dataclass(frozen=True)
class ArchSpec:
    vision_hidden: int = rule(min=1)
    vision_layers: int = rule(min=1)
    patch_size: int = rule(min=1)
    downsample_ratio: float = rule(min=1e-6)
    llm_hidden: int = rule(min=1)  # == width of ``image_embeds`` == n_embd of the GGUF
    llm_layers: int = rule(min=1)
    llm_heads: int = rule(min=1)
    llm_kv_heads: int = rule(min=1)
    vocab_size: int = rule(min=1)
    context_length: int = rule(min=1)
    tie_word_embeddings: bool = rule()


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    created: str
    source: dict[str, Any]  # model id / revision / local path / adapter
    arch: ArchSpec
    image: ImageSpec
    tokens: TokenSpec
    prompt: PromptSpec
    vision: dict[str, FileEntry]  # precision -> file ("fp32", "int8")
    llm: dict[str, FileEntry]  # quant -> file ("f32", "f16", "q4_k_m", ...)
    tools: dict[str, str] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    mmproj: FileEntry | None = None

    # -- (de)serialisation ---------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        """Check ``d`` against the schema (raises :class:`ManifestError` naming the key) and build the manifest."""
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            if not isinstance(version, int) or isinstance(version, bool):
                raise ManifestError(f"manifest.json is malformed: 'schema_version' must be an integer, got "
                                    f"{json.dumps(version)}; re-export the bundle")
            raise BundleError(
                f"bundle schema version {version} is not supported by this facellm-edge "
                f"(expects {SCHEMA_VERSION}); re-export the bundle or upgrade facellm-edge"
            )
        try:
            m = load_typed(cls, d)
            for k, e in m.vision.items():  # the external weight files of large ONNX graphs are files too
                check_value(e.extra.get("external_data", []), EXTERNAL_DATA, f"vision.{k}.extra.external_data")
            # a bundle without an LLM, or without any vision file, runs nothing (inspect passed it, ask refused);
            # llama.cpp's mmproj alone is a bundle for llama.cpp / ollama (export --vision mmproj)
            if not m.llm:
                raise SchemaError("llm", "must name at least one file")
            if not m.vision and m.mmproj is None:
                raise SchemaError("vision", "must name at least one file (or an mmproj)")
        except SchemaError as exc:
            raise ManifestError(f"manifest.json is malformed: {exc}; re-export the bundle") from exc
        unknown = sorted(set(d) - {f for f in cls.__dataclass_fields__})
        if unknown:
            log.debug("manifest.json: ignoring keys this version does not know: %s", ", ".join(unknown))
        return m


class ManifestError(BundleError):
    """manifest.json does not match the schema (wrong type, missing key, path outside the bundle)."""


EXTERNAL_DATA = tuple[FileEntry, ...]  # FileEntry.extra["external_data"]: the weight files of large ONNX graphs
