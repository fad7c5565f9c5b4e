"""What every route of one server shares (:class:`ServerState`, at ``app.state.serve``) and the request helpers the
routes have in common: JSON bodies parsed off the event loop into one-line 400s, a request's token limit checked
against the model's context, and a request that is cancelled when its client goes away."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from facellm_edge.io import loads_json
from facellm_edge.serve.errors import APIError
from facellm_edge.serve.trust import require_json

if TYPE_CHECKING:
    from facellm_edge.runtime.pipeline import FaceLLM
    from facellm_edge.serve.config import ServeConfig
    from facellm_edge.serve.metrics import Metrics
    from facellm_edge.serve.runner import ModelRunner
    from facellm_edge.serve.sessions import SessionStore

__all__ = ["ServerState", "check_max_tokens", "load_json", "parse_json", "server_state", "until_disconnected",
           "validation_message"]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


@dataclass
class ServerState:
    """One server: the model, its settings, the model's queue, the kept sessions, the metrics."""

    model: "FaceLLM"
    config: "ServeConfig"
    runner: "ModelRunner"
    store: "SessionStore"
    metrics: "Metrics"
    ready: bool = False  # the model is loaded and the server accepts requests (False again while stopping)
    started: float = field(default_factory=time.time)


def server_state(request: Request) -> ServerState:
    return request.app.state.serve


def validation_message(exc: ValidationError) -> str:
    """Pydantic's errors as one line: ``messages.0.content: Input should be a valid string; ...`` (no input
    values: they may be images or personal text)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if not str(x).startswith(("function-", "union[")))
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def load_json(body: bytes) -> Any:
    """The JSON value of ``body``; a 400 when it is not JSON (:func:`~facellm_edge.io.loads_json`: nesting deeper
    than the parser's recursion allows is malformed JSON too)."""
    try:
        return loads_json(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON ({exc.__class__.__name__}: {str(exc)[:80]})",
                       code="invalid_json") from None


def _load(body: bytes, schema: type[M]) -> M:
    data = load_json(body)
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise APIError(400, validation_message(exc), code="invalid_request") from None
    except RecursionError:
        raise APIError(400, "the body's JSON is nested too deeply", code="invalid_json") from None


async def parse_json(request: Request, schema: type[M], then: Callable[[M], T] | None = None) -> "M | T":
    """The JSON body as ``schema`` (and ``then(parsed)``, e.g. decoding its images or building a grammar), parsed
    in a worker thread: a 20 MB body of base64 takes the event loop's time otherwise. 415 unless it is declared
    ``application/json``."""
    require_json(request)
    body = await request.body()

    def work() -> Any:
        parsed = _load(body, schema)
        return then(parsed) if then is not None else parsed

    return await asyncio.to_thread(work)


def check_max_tokens(value: int | None, n_ctx: int, param: str = "max_tokens") -> int | None:
    """``value``, or a 400 when it is above the model's context (``n_ctx`` tokens, image and question included):
    no answer can be longer, and a huge one would hold the model until the context is full."""
    if value is not None and value > n_ctx:
        raise APIError(400, f"{param} is above the model's context of {n_ctx} tokens (an answer cannot be longer); "
                            f"ask for at most {n_ctx}", code="invalid_request", param=param)
    return value


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first (its model work is then cancelled too)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request is cancelled itself (server shutdown)
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        log.debug("client went away: request cancelled")
        raise APIError(499, "the client closed the connection", code="client_closed")
    return task.result()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
