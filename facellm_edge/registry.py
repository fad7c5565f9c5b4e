"""The model registry (``models/registry.json``): known checkpoints, their hub ids and dimensions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from facellm_edge.errors import UsageError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str
    revision: str | None
    base: str
    licence: str
    vision: dict[str, Any]
    text: dict[str, Any]
    downsample_ratio: float
    image_seq_length: int


def _registry_text() -> str:
    # Installed wheel: packaged copy. Source checkout / editable install: the repository's models/ folder.
    packaged = resources.files("facellm_edge").joinpath("_data/registry.json")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parents[1] / "models" / "registry.json").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def registry() -> dict[str, ModelSpec]:
    data = json.loads(_registry_text())["models"]
    return {name: ModelSpec(name=name, **spec) for name, spec in data.items()}


def get_spec(name: str) -> ModelSpec:
    reg = registry()
    key = name.lower()
    for spec in reg.values():
        if key in (spec.name, spec.hub_id.lower()):
            return spec
    raise UsageError(f"unknown model '{name}'; known: {', '.join(sorted(reg))}")
