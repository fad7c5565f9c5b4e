"""Declarative loading of JSON into frozen dataclasses: the field annotations are the schema.

:func:`load_typed` checks every value against its field's type (``int``, ``float``, ``bool``, ``str``, ``X | None``,
``tuple[T, ...]``, fixed ``tuple[A, B, C]``, ``dict[str, T]``, ``Any`` and nested dataclasses), converts JSON lists
to tuples, and applies the rules in the field's metadata, written with :func:`rule`:

    size: int = rule(min=1)
    sha256: str = rule(pattern=r"[0-9a-f]{64}")
    path: str = rule(check=relative_posix_path)

A wrong value raises :class:`SchemaError` naming the key (``image.size``), the expected type and what it got.
Keys a dataclass does not declare are ignored (a newer writer may add information an older reader can skip;
incompatible changes bump the bundle's schema version instead).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Callable, TypeVar, Union

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class SchemaError(ValueError):
    """``key`` is the dotted path of the offending value; the message says what was expected."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"'{key}' {message}" if key else message)
        self.key = key


def rule(*, default: Any = _MISSING, default_factory: Any = _MISSING, min: float | None = None,
         max: float | None = None, pattern: str | None = None,
         check: Callable[[Any], str | None] | None = None) -> Any:
    """A dataclass field with validation rules: ``min`` / ``max`` (numbers), ``pattern`` (full match, strings),
    ``check`` (returns an error message or None)."""
    meta = {"rules": {"min": min, "max": max, "pattern": pattern, "check": check}}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _got(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool) and len(repr(value)) <= 40:
        return f"{kind} ({value!r})"
    return kind


def _expected(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_expected(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_expected(args[0]).removeprefix('an ').removeprefix('a ')}s"
        return f"a list of {len(args)} {_expected(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict:
        return "an object"
    if dataclasses.is_dataclass(tp):
        return "an object"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def check_value(value: Any, tp: Any, key: str = "") -> Any:
    """``value`` checked against the type ``tp`` (JSON lists become tuples); SchemaError names ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: an error inside X keeps its own key and message
            try:
                return check_value(value, options[0], key)
            except SchemaError as exc:
                if exc.key != key:
                    raise
                raise SchemaError(key, f"must be {_expected(tp)}, got {_got(value)}") from None
        for i, a in enumerate(options):
            try:
                return check_value(value, a, key)
            except SchemaError:
                if i == len(options) - 1:
                    raise SchemaError(key, f"must be {_expected(tp)}, got {_got(value)}") from None
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SchemaError(key, f"must be {_expected(tp)}, got {_got(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise SchemaError(key, f"must be {_expected(tp)}, got a list of {len(value)}")
        return tuple(check_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(key, f"must be {_expected(tp)}, got {_got(value)}")
        return {k: check_value(v, args[1], f"{key}.{k}") for k, v in value.items()}
    elif dataclasses.is_dataclass(tp):
        return load_typed(tp, value, key)
    else:  # pragma: no cover - a type this loader was not taught
        raise TypeError(f"load_typed cannot check {tp!r}")
    if not ok:
        raise SchemaError(key, f"must be {_expected(tp)}, got {_got(value)}")
    return value


def _apply_rules(value: Any, rules: dict[str, Any], key: str) -> None:
    if value is None:
        return
    if rules.get("min") is not None and value < rules["min"]:
        raise SchemaError(key, f"must be >= {rules['min']}, got {value!r}")
    if rules.get("max") is not None and value > rules["max"]:
        raise SchemaError(key, f"must be <= {rules['max']}, got {value!r}")
    if rules.get("pattern") is not None and not re.fullmatch(rules["pattern"], value):
        raise SchemaError(key, f"must match {rules['pattern']}, got {_got(value)}")
    if rules.get("check") is not None:
        problem = rules["check"](value)
        if problem:
            raise SchemaError(key, problem)


def load_typed(cls: type[T], data: Any, key: str = "") -> T:
    """Build dataclass ``cls`` from the JSON value ``data``, checked against the field annotations and rules."""
    if not isinstance(data, dict):
        raise SchemaError(key, f"must be an object, got {_got(data)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        sub = f"{key}.{f.name}" if key else f.name
        if f.name not in data:
            if f.default is _MISSING and f.default_factory is _MISSING:
                raise SchemaError(sub, "is missing")
            continue
        value = check_value(data[f.name], hints[f.name], sub)
        for elem in (value if isinstance(value, tuple) else (value,)):
            _apply_rules(elem, f.metadata.get("rules", {}), sub)
        kwargs[f.name] = value
    return cls(**kwargs)
