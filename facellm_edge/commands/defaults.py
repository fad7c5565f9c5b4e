"""CLI option defaults are read from the config dataclasses' fields: one source for the Python API and the CLI."""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any


def field_default(cls: type, name: str) -> Any:
    """The default of the dataclass ``cls``'s field ``name`` (its value, or what its default factory makes); also for
    configs that cannot be made without arguments (``ExportConfig`` needs a model and an output folder)."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise TypeError(f"{cls.__name__}.{name} has no default")
    raise AttributeError(f"{cls.__name__} has no field {name!r}")
