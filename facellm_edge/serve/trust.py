"""Which browsers' requests the server takes: the defence against DNS rebinding and cross-site requests.

A web page the kiosk's user visits can make the browser send requests to the server on 127.0.0.1, even with no API
key set: by rebinding its own host name to 127.0.0.1 (the requests then carry ``Host: evil.example``), or by
cross-site requests the browser sends without asking (a "simple" POST with a form or ``text/plain`` body). Camera
frames and answers about faces must not leave the device that way, so:

* :class:`TrustedRequests` answers only requests whose ``Host`` names this server (:func:`trusted_hosts`): on a
  loopback or specific address the loopback names, that address and the ``--allowed-host`` names; on a wildcard
  address (``0.0.0.0``, ``::``, which needs an API key or ``--insecure``) any host unless names are given. Others
  get a 400 (``untrusted_host``).
* It refuses state-changing requests (POST, PUT, PATCH, DELETE) that carry an ``Origin`` other than the server's
  own (the ``Host`` they were sent to) or a ``--cors-origin``, with 403 (``foreign_origin``).
* JSON bodies must be sent as ``Content-Type: application/json`` (:func:`require_json`, 415 otherwise), which a
  browser only sends cross-site after a CORS preflight that the server does not grant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from facellm_edge.serve.errors import APIError
from facellm_edge.serve.guards import ASGIApp, Receive, Scope, Send, send_error

if TYPE_CHECKING:
    from fastapi import Request

    from facellm_edge.serve.config import ServeConfig

__all__ = ["LOOPBACK_NAMES", "TrustedRequests", "host_name", "require_json", "trusted_hosts"]

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")  # names a rebinding page cannot make its own
WILDCARDS = ("0.0.0.0", "::")  # every interface: the Host a client uses is unknowable without --allowed-host
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def host_name(value: str) -> str:
    """A ``Host`` header's (or an address's) name without the port, lower case: ``Kiosk:8080`` -> ``kiosk``,
    ``[::1]:8080`` -> ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:  # name:port (a bare IPv6 address has more colons)
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def trusted_hosts(config: "ServeConfig") -> frozenset[str] | None:
    """The ``Host`` names ``config``'s server answers to; None: any."""
    named = frozenset(host_name(h) for h in config.allowed_hosts)
    bind = host_name(config.host)
    if bind in WILDCARDS:
        return frozenset(LOOPBACK_NAMES) | named if named else None
    return frozenset(LOOPBACK_NAMES) | {bind} | named


def require_json(request: "Request", alternative: str = "") -> None:
    """415 unless the body is declared ``application/json`` (``alternative``: another accepted type, for the
    message)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        also = f" or {alternative}" if alternative else ""
        raise APIError(415, f"the body must be sent with Content-Type: application/json{also} (got "
                            f"{media[:60] or 'none'})", code="unsupported_media_type")


class TrustedRequests:
    """The ``Host`` check and the ``Origin`` check of the module docstring (an ASGI layer, outside CORS)."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str] | None, cors_origins: Iterable[str]) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = frozenset(o.rstrip("/").lower() for o in cors_origins)

    def _origin_ok(self, origin: str, host: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if "*" in self.origins or origin in self.origins:
            return True
        scheme, sep, netloc = origin.partition("://")  # "null" (a sandboxed page, a file) has none: refused
        return bool(sep) and scheme in ("http", "https") and netloc == host.strip().lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k: v.decode("latin-1") for k, v in scope.get("headers", []) if k in (b"host", b"origin")}
        host = headers.get(b"host", "")
        error = None
        if self.hosts is not None and host_name(host) not in self.hosts:
            error = APIError(400, f"this server does not answer to the host {host[:80]!r}; start it with "
                                  "--allowed-host NAME to add a name", code="untrusted_host")
        elif scope.get("method") in STATE_CHANGING and b"origin" in headers \
                and not self._origin_ok(headers[b"origin"], host):
            error = APIError(403, f"requests from the page origin {headers[b'origin'][:80]!r} are refused; allow "
                                  "it with --cors-origin ORIGIN", code="foreign_origin")
        if error is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await send_error(send, error)
