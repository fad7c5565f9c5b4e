"""``--config facellm.toml``: option values from a TOML file; flags given on the command line win.

Keys are the commands' option names with underscores (``max_tokens`` for ``--max-tokens``), so every key maps to
exactly one option and through it to one config field (``docs/config.md`` lists them all). Top-level keys are the
options ``ask``, ``run`` and ``serve`` share (the model and how it runs); ``[ask]``, ``[run]`` and ``[serve]`` hold
a command's own options and may repeat a shared key for that command. A key no command knows, a section that is
not a command, or a positional argument is refused in one line, naming the file and the key; a value of the wrong
type is refused by the option itself, as on the command line.

    bundle = "bundles/facellm-1b-q4km"
    max_tokens = 64
    [run]
    source = "0"
    question = "Describe this person's expression."
    jsonl = "answers.jsonl"
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from facellm_edge.errors import InputError, UsageError

SECTIONS = ("ask", "run", "serve")  # the commands that take --config


def load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise InputError(f"--config {path}: no such file") from None
    except OSError as exc:
        raise InputError(f"--config {path}: cannot read it: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"--config {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:  # tomllib decodes the bytes itself: UTF-16 or Latin-1 files end here
        raise InputError(f"--config {path} is not valid TOML: not UTF-8 text ({exc.reason} at byte {exc.start})") \
            from exc
    except RecursionError:
        raise InputError(f"--config {path} is not valid TOML: nested too deeply") from None


def option_keys(command: Any) -> dict[str, str]:
    """The keys a config file may set for ``command`` (a typer/click command) -> the option's parameter name. A key
    is the option's long flag without dashes (``--max-tokens`` -> ``max_tokens``, ``--json`` -> ``json``); not
    arguments, not --help / --config."""
    keys = {}
    for p in command.params:
        if getattr(p, "param_type_name", None) != "option" or p.name in ("help", "config") or p.name is None:
            continue
        flag = next((o for o in p.opts if o.startswith("--")), p.opts[0])
        keys[flag.lstrip("-").replace("-", "_")] = p.name
    return keys


def defaults_for(command: Any, name: str, data: dict[str, Any], shared: set[str], path: Path) -> dict:
    """The values ``data`` sets for ``command`` (called ``name``), by parameter name: shared top-level keys, then
    its own section."""
    keys = option_keys(command)
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise UsageError(f"--config {path}: [{key}] is not a command; sections are {', '.join(SECTIONS)}")
        elif key not in shared:
            hint = f" (put it under [{name}])" if key in keys else ""
            raise UsageError(f"--config {path}: unknown key '{key}'{hint}; top-level keys are the options ask, run "
                             "and serve share (see docs/config.md)")
    own = data.get(name, {})
    for key in own:
        if isinstance(own[key], dict) or key not in keys:
            raise UsageError(f"--config {path}: [{name}] has unknown key '{key}'; `facellm-edge {name} --help` "
                             "lists the options (keys are the long flags with underscores: max_tokens)")
    values = {k: v for k, v in data.items() if not isinstance(v, dict)}
    values.update(own)
    return {keys[k]: _value(command, keys[k], v) for k, v in values.items()}


def _value(command: Any, name: str, value: Any) -> Any:
    """A TOML value as the option takes it: a number for a text option as text (``source = 0``: camera "0"), one
    value for a repeatable option as a list of one."""
    param = next((p for p in command.params if p.name == name), None)
    items = value if isinstance(value, list) else [value]
    items = [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and _is_text(command, name) else v
             for v in items]
    return items if getattr(param, "multiple", False) else (items[0] if not isinstance(value, list) else items)


def _is_text(command: Any, name: str) -> bool:
    """Options whose values are text (``source = 0`` in TOML is the camera index "0")."""
    param = next((p for p in command.params if p.name == name), None)
    bare = getattr(param, "bare_type", None)
    return callable(bare) and bare() is str


def config_parameter_callback(shared: set[str]):
    """The eager ``--config`` callback: the file's values become this command's defaults (``ctx.default_map``), so
    options given on the command line still win and required options may come from the file."""

    def apply(ctx: typer.Context, value: Optional[Path]) -> Optional[Path]:
        if value is None or ctx.resilient_parsing:
            return value
        data = load_toml(value)
        name = ctx.info_name or ""
        ctx.default_map = {**(ctx.default_map or {}), **defaults_for(ctx.command, name, data, shared, value)}
        return value

    return apply
