"""LLM backends for data generation: an OpenAI-compatible HTTP client (stdlib only) and a local GGUF model.

Both expose ``complete(system, user, image) -> Completion``. Transient failures (HTTP 429/5xx, connection errors,
timeouts) raise :class:`TransientBackendError` (with the server's Retry-After when given) so the builder can back
off and retry; anything else that retrying cannot fix raises :class:`FatalBackendError`.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Protocol

from facellm_edge.errors import InputError, UsageError, require
from facellm_edge.io import loads_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImagePayload:
    data: bytes
    mime: str  # e.g. "image/jpeg"


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int


class TransientBackendError(Exception):
    """A failure worth retrying; ``retry_after`` is the server's hint in seconds (None when absent)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FatalBackendError(Exception):
    """A failure that retrying will not fix (bad key, unknown model, malformed request)."""


class ChatBackend(Protocol):
    name: str
    model: str

    def complete(self, system: str, user: str, image: ImagePayload | None) -> Completion: ...


def api_key_from_env(var: str) -> str:
    """Read the API key from the environment variable ``var`` (never from a flag or a file)."""
    key = os.environ.get(var, "").strip()
    if not key:
        raise UsageError(f"no API key: set the environment variable {var} (or name another one with --api-key-env)")
    return key


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        import time

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class OpenAIConfig:
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o"
    timeout_s: float = 120.0
    max_tokens: int = 700
    temperature: float = 0.7
    json_mode: bool = True


class OpenAIBackend:
    """``POST {base_url}/chat/completions`` with the image as a base64 data URL (OpenAI chat format)."""

    name = "openai"

    def __init__(self, config: OpenAIConfig, api_key: str) -> None:
        if not config.base_url.startswith(("http://", "https://")):
            raise UsageError(f"--base-url must start with http:// or https://, got {config.base_url!r}")
        self.config = config
        self.model = config.model
        self._api_key = api_key
        self._url = config.base_url.rstrip("/") + "/chat/completions"

    def _payload(self, system: str, user: str, image: ImagePayload | None) -> dict:
        content: list[dict] = [{"type": "text", "text": user}]
        if image is not None:
            url = f"data:{image.mime};base64,{base64.b64encode(image.data).decode('ascii')}"
            content.append({"type": "image_url", "image_url": {"url": url}})
        body = {
            "model": self.config.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": content}],
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
        }
        if self.config.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    def complete(self, system: str, user: str, image: ImagePayload | None) -> Completion:
        data = json.dumps(self._payload(system, user, image)).encode("utf-8")
        req = urllib.request.Request(
            self._url, data=data, method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._api_key}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.config.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode("utf-8", "replace").strip()
            if exc.code == 429 or exc.code >= 500:
                raise TransientBackendError(f"HTTP {exc.code} from {self._url}",
                                            _retry_after(exc.headers.get("Retry-After"))) from exc
            hint = ""
            if exc.code == 400 and self.config.json_mode and "response_format" in detail:
                hint = " (this endpoint may not support JSON mode: try --no-json-mode)"
            elif exc.code in (401, 403):
                hint = " (check the API key in the environment variable)"
            raise FatalBackendError(f"HTTP {exc.code} from {self._url}: {detail}{hint}") from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TransientBackendError(f"cannot reach {self._url}: {reason}") from exc
        try:
            obj = loads_json(raw)
            text = obj["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            # A 200 with a body that is not a chat completion: a broken proxy or a wrong URL.
            raise TransientBackendError(f"malformed chat completion from {self._url}") from exc
        usage = obj.get("usage") or {}
        return Completion(text=text, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or 0))


# The reply of the local model is constrained (llama.cpp grammar from a JSON schema) to
#   {"question": "<q>", "answer": "<a>"}
# with printable-ASCII strings of bounded length, so that the grammar can always close within max_tokens: llama.cpp's
# converter allows at most one space at each of its 9 whitespace points, the fixed JSON text is 27 bytes, every
# allowed character is one byte, and every token is at least one byte. Unbounded strings let a small model run into
# the token cap mid-string and return JSON that does not parse.
QA_FIXED_BYTES = 27 + 9
QA_MIN_TOKENS = QA_FIXED_BYTES + 2  # one character each
QA_MAX_QUESTION = 200
_ASCII_CHAR = r"[ !#-\[\]-~]"  # printable ASCII except '"' and '\' (they would need JSON escapes)


def _bounded_string(n: int) -> dict:
    return {"type": "string", "minLength": 1, "maxLength": n, "pattern": f"^{_ASCII_CHAR}{{1,{n}}}$"}


def qa_schema(max_tokens: int) -> dict:
    """The JSON schema of a reply that fits in ``max_tokens`` whatever the model writes (see above)."""
    free = max_tokens - QA_FIXED_BYTES
    if free < 2:
        raise UsageError(f"--max-tokens {max_tokens} is too small for --backend llama: the JSON reply needs at least "
                         f"{QA_MIN_TOKENS} tokens")
    q = min(QA_MAX_QUESTION, max(1, free // 3))
    return {
        "type": "object",
        "properties": {"question": _bounded_string(q), "answer": _bounded_string(free - q)},
        "required": ["question", "answer"],
        "additionalProperties": False,
    }


@dataclass(frozen=True)
class LlamaConfig:
    gguf: Path
    n_ctx: int = 2048
    max_tokens: int = 256
    temperature: float = 0.7
    n_threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        qa_schema(self.max_tokens)  # a budget the reply cannot fit in is a usage error, before the model loads


class LlamaBackend:
    """A local GGUF chat model through llama-cpp-python; text-only models never see the image (logged once)."""

    name = "llama"

    def __init__(self, config: LlamaConfig) -> None:
        gguf = Path(config.gguf)
        if not gguf.is_file():
            raise InputError(f"GGUF model {gguf} does not exist: pass a chat model file with --gguf")
        llama_cpp = require("llama_cpp", "export")
        self.config = config
        self.model = gguf.name
        try:
            self._llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=config.n_ctx, n_threads=config.n_threads,
                                        seed=config.seed, verbose=False)
        except ValueError as exc:
            raise InputError(f"cannot load GGUF model {gguf}: {exc}") from exc
        self._lock = threading.Lock()  # one llama context: requests are served one at a time
        self._warned = False
        self.schema = qa_schema(config.max_tokens)

    def complete(self, system: str, user: str, image: ImagePayload | None) -> Completion:
        with self._lock:
            if image is not None and not self._warned:
                log.warning("local GGUF backend %s is text-only: it is sent the text prompt only and does not see "
                            "the image", self.model)
                self._warned = True
            out = self._llm.create_chat_completion(
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                max_tokens=self.config.max_tokens, temperature=self.config.temperature,
                response_format={"type": "json_object", "schema": self.schema},
            )
        usage = out.get("usage") or {}
        return Completion(text=out["choices"][0]["message"]["content"] or "",
                          prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or 0))
