"""The bundle: the one contract between ``export`` and everything downstream.

A bundle is a directory::

    manifest.json            this schema (``SCHEMA_VERSION``)
    vision/<precision>.onnx  vision tower + pixel shuffle + projector, ``pixel_values`` -> ``image_embeds``
    llm/<quant>.gguf         the Qwen2 language model with its tokenizer and chat template

Every file is listed with its relative path, size and sha256. Nothing downstream reads the original checkpoint.
Bundles are written atomically: files go into a hidden temporary sibling directory which is renamed into place
only when everything (including verification) succeeded.

A bundle is untrusted input (it may come from a hub or a USB stick). :func:`load_bundle` checks the manifest
against the dataclasses below (types and rules, see :mod:`facellm_edge.typed`; keys it does not know are ignored)
and requires every listed path to be relative, normalised and — symlinks followed — inside the bundle folder,
before any listed file is opened or stat-ed.
"""

from facellm_edge.bundle.files import (
    BUNDLE, Bundle, bundle_files, file_entry, is_local_path, load_bundle, resolve_bundle_spec, resolve_inside,
)
from facellm_edge.bundle.manifest import (
    MANIFEST, SCHEMA_VERSION, ArchSpec, FileEntry, ImageSpec, Manifest, ManifestError, PromptSpec, TokenSpec,
    relative_posix_path,
)

__all__ = [
    "BUNDLE", "MANIFEST", "SCHEMA_VERSION", "ArchSpec", "Bundle", "FileEntry", "ImageSpec", "Manifest",
    "ManifestError", "PromptSpec", "TokenSpec", "bundle_files", "file_entry", "is_local_path", "load_bundle",
    "relative_posix_path", "resolve_bundle_spec", "resolve_inside",
]
