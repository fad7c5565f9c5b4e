"""Sampling settings and their llama.cpp sampler chains (sampling runs inside llama.cpp: no logits copies)."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, replace
from typing import Any

from facellm_edge.errors import UsageError
from facellm_edge.io import loads_json


@dataclass(frozen=True)
class GenerationConfig:
    """How one answer is generated. ``temperature == 0`` is greedy; ``grammar`` is GBNF text."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 0.95
    top_k: int = 40  # 0 disables top-k
    repeat_penalty: float = 1.0  # 1.0 disables the penalty
    grammar: str | None = None
    stop_at_eos: bool = True

    def with_overrides(self, max_tokens: int | None = None, temperature: float | None = None) -> "GenerationConfig":
        """This config with a call's overrides (None keeps the configured value)."""
        changes = {k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature)) if v is not None}
        return replace(self, **changes) if changes else self

    def __post_init__(self) -> None:
        int_field(self, "max_tokens")
        for name in ("temperature", "top_p", "repeat_penalty"):
            real_field(self, name)
        int_field(self, "top_k")
        typed_field(self, "grammar", str, "GBNF text", optional=True)
        typed_field(self, "stop_at_eos", bool, "True or False")
        if self.max_tokens < 1:
            raise UsageError(f"max_tokens {self.max_tokens} must be >= 1")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise UsageError(f"temperature {self.temperature} must be a finite number >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p {self.top_p} must be in (0, 1]")
        if not 0 <= self.top_k <= INT32_MAX:  # llama_sampler_init_top_k takes an int32_t: ctypes would wrap more
            raise UsageError(f"top_k {self.top_k} must be in 0..{INT32_MAX} (0 disables it)")
        if not (self.repeat_penalty > 0.0 and math.isfinite(self.repeat_penalty)):
            raise UsageError(f"repeat_penalty {self.repeat_penalty} must be > 0 (1.0 disables it)")
        if self.grammar is not None and not self.grammar.strip():
            raise UsageError("grammar is empty; pass GBNF text or leave it unset")
        if self.grammar is not None and not is_text(self.grammar):  # llama.cpp takes it as UTF-8
            raise UsageError("grammar is not valid text (it holds half of a surrogate pair); pass GBNF text")


# Field checks shared by the configs handed to llama.cpp (this one and EngineConfig). A bool is no int here (True
# would be 1 token), nor is a float (2.5 tokens, NaN, inf): ctypes truncates or refuses them only at use, after the
# image prefill. numpy scalars are accepted and stored as Python numbers, which ctypes takes as they are.
INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1


def _shown(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def int_field(config: object, name: str, *, optional: bool = False) -> None:
    """``config.name`` must be a whole number (None too when ``optional``), else a one-line :class:`UsageError`."""
    value = getattr(config, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        unset = " or None" if optional else ""
        raise UsageError(f"{name} must be a whole number{unset}, got {_shown(value)}")
    if type(value) is not int:
        object.__setattr__(config, name, int(value))  # frozen dataclass: normalised once, while it is made


def real_field(config: object, name: str) -> None:
    """``config.name`` must be a number (not a bool: True is no temperature), else a one-line :class:`UsageError`;
    the caller checks its range (and with it NaN and inf)."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{name} must be a number, got {_shown(value)}")
    if not isinstance(value, float):
        object.__setattr__(config, name, float(value))


def typed_field(config: object, name: str, kind: type, what: str, *, optional: bool = False) -> None:
    """``config.name`` must be a ``kind`` (``what`` names it in the error; None too when ``optional``)."""
    value = getattr(config, name)
    if not (isinstance(value, kind) or (optional and value is None)):
        raise UsageError(f"{name} must be {what}{' or None' if optional else ''}, got {_shown(value)}")


def is_text(value: str) -> bool:
    """Whether ``value`` encodes as UTF-8 (a lone surrogate does not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


REPEAT_LAST_N = 64  # llama.cpp's default penalty window


def schema_to_grammar(schema: dict[str, Any] | str) -> str:
    """A JSON schema (dict or JSON text) -> GBNF, with llama-cpp-python's converter (for ``--schema FILE``)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        parsed = loads_json(schema) if isinstance(schema, str) else schema
    except ValueError as exc:
        raise UsageError(f"the JSON schema is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise UsageError(f"a JSON schema must be a JSON object, got {type(parsed).__name__}")
    try:
        grammar = json_schema_to_gbnf(json.dumps(parsed))
    except RecursionError:  # a schema nested deeper than the converter (or json.dumps) recurses
        raise UsageError("cannot turn the JSON schema into a grammar: it is nested too deeply") from None
    except (AssertionError, ValueError, KeyError, TypeError, AttributeError, NotImplementedError) as exc:
        # the converter reports unsupported or broken schemas with assertions
        raise UsageError(f"cannot turn the JSON schema into a grammar: {exc}") from exc
    # llama-cpp-python's converter lets a JSON string hold raw control characters, which JSON forbids (json.loads
    # rejects the answer); llama.cpp's own converter (common/json-schema-to-grammar.cpp) excludes them.
    return grammar.replace(_LOOSE_CHAR, _JSON_CHAR)


_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


class SamplerChain:
    """An owned ``llama_sampler`` chain built from a :class:`GenerationConfig`; free it with :meth:`close`."""

    def __init__(self, llama_cpp, vocab, n_vocab: int, gen: GenerationConfig, seed: int) -> None:
        L = self._L = llama_cpp
        params = L.llama_sampler_chain_default_params()
        params.no_perf = True
        self.handle = L.llama_sampler_chain_init(params)
        try:
            if gen.grammar is not None:
                grammar = L.llama_sampler_init_grammar(vocab, gen.grammar.encode("utf-8"), b"root")
                if not grammar:
                    raise UsageError("the GBNF grammar does not parse (see the llama_cpp log); fix it")
                L.llama_sampler_chain_add(self.handle, grammar)
            if gen.repeat_penalty != 1.0:
                L.llama_sampler_chain_add(
                    self.handle, L.llama_sampler_init_penalties(n_vocab, REPEAT_LAST_N, gen.repeat_penalty, 0.0, 0.0)
                )
            if gen.temperature == 0.0:
                L.llama_sampler_chain_add(self.handle, L.llama_sampler_init_greedy())
            else:
                if gen.top_k > 0:
                    L.llama_sampler_chain_add(self.handle, L.llama_sampler_init_top_k(gen.top_k))
                if gen.top_p < 1.0:
                    L.llama_sampler_chain_add(self.handle, L.llama_sampler_init_top_p(gen.top_p, 1))
                L.llama_sampler_chain_add(self.handle, L.llama_sampler_init_temp(gen.temperature))
                L.llama_sampler_chain_add(self.handle, L.llama_sampler_init_dist(seed))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.handle:
            self._L.llama_sampler_free(self.handle)  # frees the samplers added to the chain too
            self.handle = None

    def __enter__(self) -> "SamplerChain":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
