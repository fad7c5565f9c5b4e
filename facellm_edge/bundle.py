"""The bundle: the one contract between ``export`` and everything downstream.

A bundle is a directory::

    manifest.json            this schema (``SCHEMA_VERSION``)
    vision/<precision>.onnx  vision tower + pixel shuffle + projector, ``pixel_values`` -> ``image_embeds``
    llm/<quant>.gguf         the Qwen2 language model with its tokenizer and chat template

Every file is listed with its relative path, size and sha256. Nothing downstream reads the original checkpoint.
Bundles are written atomically: files go into a hidden temporary sibling directory which is renamed into place
only when everything (including verification) succeeded.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from facellm_edge.errors import BundleError, read_json_object
from facellm_edge.io import atomic_directory, atomic_write_text, sha256_file  # noqa: F401  (re-exported)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the bundle root, POSIX separators
    bytes: int
    sha256: str
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. bits_per_weight, fallback tensors, opset


@dataclass(frozen=True)
class ImageSpec:
    size: int  # tile side in pixels (448 for InternVL3)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True


@dataclass(frozen=True)
class TokenSpec:
    image_context: str  # "<IMG_CONTEXT>"
    image_context_id: int
    image_start: str  # "<img>"
    image_start_id: int
    image_end: str  # "</img>"
    image_end_id: int
    num_image_tokens: int  # per tile (256 for 448 px, patch 14, pixel shuffle 0.5)
    eos_ids: tuple[int, ...]
    bos_id: int | None = None
    pad_id: int | None = None


@dataclass(frozen=True)
class PromptSpec:
    """Prompt pieces rendered from the model's own chat template at export time.

    ``first`` contains the markers ``{image}`` and ``{question}`` exactly once each (plain ``str.replace``, no
    format-string semantics); ``{image}`` expands to ``image_start + image_context * (tokens * tiles) + image_end``.
    ``followup`` is appended after an answer (whose end-of-turn token was *not* decoded) to ask another question.
    """

    first: str
    followup: str
    chat_template: str
    image_marker: str = "{image}"
    question_marker: str = "{question}"


@dataclass(frozen=True)
class ArchSpec:
    vision_hidden: int
    vision_layers: int
    patch_size: int
    downsample_ratio: float
    llm_hidden: int  # == width of ``image_embeds`` == n_embd of the GGUF
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    vocab_size: int
    context_length: int
    tie_word_embeddings: bool


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
    tools: dict[str, str]
    verification: dict[str, Any] = field(default_factory=dict)
    mmproj: FileEntry | None = None

    # -- (de)serialisation ---------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        try:
            version = d["schema_version"]
            if version != SCHEMA_VERSION:
                raise BundleError(
                    f"bundle schema version {version} is not supported by this facellm-edge "
                    f"(expects {SCHEMA_VERSION}); re-export the bundle or upgrade facellm-edge"
                )
            image = dict(d["image"])
            image["mean"] = tuple(image["mean"])
            image["std"] = tuple(image["std"])
            tokens = dict(d["tokens"])
            tokens["eos_ids"] = tuple(tokens["eos_ids"])
            return cls(
                schema_version=version,
                created=d["created"],
                source=d["source"],
                arch=ArchSpec(**d["arch"]),
                image=ImageSpec(**image),
                tokens=TokenSpec(**tokens),
                prompt=PromptSpec(**d["prompt"]),
                vision={k: FileEntry(**v) for k, v in d["vision"].items()},
                llm={k: FileEntry(**v) for k, v in d["llm"].items()},
                tools=d.get("tools", {}),
                verification=d.get("verification", {}),
                mmproj=FileEntry(**d["mmproj"]) if d.get("mmproj") else None,
            )
        except (KeyError, TypeError) as exc:
            raise BundleError(f"manifest.json is malformed ({exc!s}); re-export the bundle") from exc


def file_entry(root: Path, path: Path, **extra: Any) -> FileEntry:
    """Describe ``path`` (inside ``root``) for the manifest."""
    rel = path.relative_to(root).as_posix()
    return FileEntry(path=rel, bytes=path.stat().st_size, sha256=sha256_file(path), extra=dict(extra))


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    def path(self, entry: FileEntry) -> Path:
        return self.root / entry.path

    def vision_file(self, precision: str | None = None) -> tuple[str, Path]:
        return self._pick(self.manifest.vision, precision, ("int8", "fp32"), "vision")

    def llm_file(self, quant: str | None = None) -> tuple[str, Path]:
        prefer = ("q4_0", "q4_k_m", "q8_0", "bf16", "f16", "f32")
        return self._pick(self.manifest.llm, quant, prefer, "llm")

    def _pick(self, table: dict[str, FileEntry], want: str | None, prefer: tuple[str, ...], kind: str):
        if not table:
            raise BundleError(f"bundle {self.root} has no {kind} file; re-export it")
        if want is not None:
            if want not in table:
                raise BundleError(
                    f"bundle {self.root} has no {kind} precision '{want}'; it has: {', '.join(sorted(table))}"
                )
            return want, self.path(table[want])
        for p in prefer:
            if p in table:
                return p, self.path(table[p])
        key = sorted(table)[0]
        return key, self.path(table[key])

    def entries(self) -> Iterator[FileEntry]:
        for e in self.manifest.vision.values():
            yield e
            # external weight files of large ONNX graphs
            yield from (FileEntry(**x) for x in e.extra.get("external_data", []))
        yield from self.manifest.llm.values()
        if self.manifest.mmproj is not None:
            yield self.manifest.mmproj

    def verify_hashes(self) -> list[str]:
        """Return a list of problems (missing file, size or sha256 mismatch); empty when intact."""
        problems = []
        for e in self.entries():
            p = self.path(e)
            if not p.is_file():
                problems.append(f"{e.path}: missing")
            elif p.stat().st_size != e.bytes:
                problems.append(f"{e.path}: size {p.stat().st_size} != {e.bytes}")
            elif sha256_file(p) != e.sha256:
                problems.append(f"{e.path}: sha256 mismatch")
        return problems


def load_bundle(root: str | os.PathLike[str], *, check_hashes: bool = True) -> Bundle:
    """Load and validate a bundle directory. Raises :class:`BundleError` with a one-line message."""
    root = Path(root)
    if not root.exists():
        raise BundleError(f"bundle not found: {root} (create one with `facellm-edge export`)")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root} is not a bundle: no {MANIFEST} (create one with `facellm-edge export`)")
    data = read_json_object(mpath, BundleError, "re-export the bundle")
    bundle = Bundle(root=root, manifest=Manifest.from_dict(data))
    if check_hashes:
        problems = bundle.verify_hashes()
        if problems:
            raise BundleError(f"bundle {root} is damaged: {'; '.join(problems)}; re-export it")
    return bundle
