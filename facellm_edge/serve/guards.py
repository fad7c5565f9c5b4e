"""The server's ASGI layers around every request, outermost first: :class:`RequestMetrics` (requests by route and
status, and with ``--log-requests`` one log line per request), then CORS when ``--cors-origin`` is given, then
:class:`ApiKey` (401 without ``Authorization: Bearer KEY``) and :class:`BodyLimit` (413 above ``--max-body-bytes``).

Plain ASGI (no ``BaseHTTPMiddleware``): streamed responses pass through untouched, and a client that disconnects
is seen by the route (its generation is cancelled)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, MutableMapping, Sequence

from facellm_edge.serve.errors import APIError

if TYPE_CHECKING:
    from facellm_edge.serve.metrics import Metrics

__all__ = ["ApiKey", "BodyLimit", "RequestMetrics", "send_error"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_BODY_METHODS = {"POST", "PUT", "PATCH"}
_DRAIN_FACTOR = 8  # an oversize body is read and dropped up to this many times the limit, so the client gets the 413
_DRAIN_S = 10.0  # ... for at most this long
_DRAIN_IDLE_S = 0.5  # ... and only while bytes keep coming


async def send_error(send: Send, error: APIError) -> None:
    """Answer ``error`` in OpenAI's JSON shape from inside an ASGI layer."""
    body = json.dumps(error.body()).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Counts every HTTP request by route template and status (``facellm_http_requests_total``)."""

    def __init__(self, app: ASGIApp, metrics: "Metrics", log_requests: bool, routes: Sequence[Any]) -> None:
        self.app = app
        self.metrics = metrics
        self.log_requests = log_requests
        self.routes = [(r.path_regex, r.path) for r in routes if hasattr(r, "path_regex")]

    def label(self, path: str) -> str:
        """The template of the route ``path`` goes to (also when a guard answered before routing)."""
        return next((template for regex, template in self.routes if regex.match(path)), "unmatched")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]
        t0 = time.perf_counter()

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            label = self.label(scope.get("path", ""))
            self.metrics.requests.labels(route=label, status=str(status[0])).inc()
            if self.log_requests:
                log.info("%s %s %d %.0f ms", scope["method"], label, status[0], (time.perf_counter() - t0) * 1e3)


class ApiKey:
    """With an API key set, every route but the page, its static files and ``/health`` needs it, as
    ``Authorization: Bearer KEY`` or, for browser APIs that cannot set headers (``EventSource``, ``<img>``), an
    ``api_key`` query parameter. Compared in constant time."""

    OPEN = ("/", "/health", "/favicon.ico")

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode("utf-8") if api_key else None

    def _needs_key(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        return self.key is not None and scope.get("method") != "OPTIONS" and path not in self.OPEN \
            and not path.startswith("/static/")

    def _given(self, scope: Scope) -> bytes | None:
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return value[7:].strip()
        from urllib.parse import parse_qs

        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key")
        return query[0].encode("utf-8") if query else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self._needs_key(scope):
            given = self._given(scope)
            if given is None or not hmac.compare_digest(given, self.key):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                why = "missing API key" if given is None else "wrong API key"
                await send_error(send, APIError(401, f"{why}: send the header Authorization: Bearer KEY",
                                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses bodies above ``max_bytes`` with 413: from ``Content-Length`` before reading, and from the bytes
    actually received (chunked or lying clients). The body is read here and replayed to the route."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"the request body is {size}, above the server's limit of {self.max_bytes} bytes "
                        "(--max-body-bytes); send a smaller image", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if declared is not None:
            if not declared.strip().isdigit():
                await send_error(send, APIError(400, "Content-Length is not a number", code="invalid_request"))
                return
            if int(declared) > self.max_bytes:
                await self._drain(receive, 0)
                await send_error(send, self._too_large(f"{int(declared)} bytes"))
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                more = message.get("more_body", False)
                if more:
                    await self._drain(receive, size)
                await send_error(send, self._too_large(f"more than {self.max_bytes} bytes"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for the client to disconnect

        await self.app(scope, replay, send)

    async def _drain(self, receive: Receive, read: int) -> None:
        """Read and drop the rest of an oversize body (bounded in bytes and time), so the client is not cut off
        mid-upload and reads the 413 instead of a connection reset."""
        deadline = time.monotonic() + _DRAIN_S
        while read <= _DRAIN_FACTOR * self.max_bytes:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(_DRAIN_IDLE_S, deadline - time.monotonic())))
            except asyncio.TimeoutError:  # a client that declared more than it sends, or a slow one
                return
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
