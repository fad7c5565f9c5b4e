"""Errors of the HTTP service, in OpenAI's error JSON shape, with the status codes clients expect.

Every error the server answers has the body ``{"error": {"message", "type", "param", "code"}}`` (what the official
``openai`` client parses into ``openai.APIStatusError``). The status says what the client may do:

=====  ===================================================================================================
400    the request is wrong: malformed JSON, a wrong type, a missing field, an image that does not decode, a
       remote image URL (never fetched), a question longer than the context, a ``Host`` the server does not
       answer to (:mod:`~facellm_edge.serve.trust`)
401    a missing or wrong API key (``Authorization: Bearer KEY``)
403    a state-changing request from another site's page (its ``Origin`` is neither the server's nor a
       ``--cors-origin``)
404    an unknown route, model or session (sessions expire: the message says so)
405    a known route with another method (``Allow`` lists the methods it takes)
413    a body above ``--max-body-bytes`` (from ``Content-Length`` or the bytes actually sent)
415    a JSON body not sent as ``Content-Type: application/json``
503    busy (the bounded queue is full, or the request waited too long for the model) or shutting down;
       always with ``Retry-After``
504    the answer took longer than ``--request-timeout`` (its generation is cancelled)
500    a fault of the server itself, never a user's input; the message does not echo the request
=====  ===================================================================================================
"""

from __future__ import annotations

import logging
from typing import Any

from facellm_edge.errors import FaceLLMEdgeError, InputError, RuntimeStageError, UsageError

__all__ = ["APIError", "Busy", "error_body", "from_library", "not_found"]

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error",
          500: "server_error", 503: "server_busy", 504: "timeout_error"}


class APIError(Exception):
    """An HTTP error answered in OpenAI's shape. ``headers`` (e.g. ``Retry-After``) go on the response."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())  # one line, whatever the library's text was
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, code=self.code, param=self.param)


class Busy(APIError):
    """503 with ``Retry-After``: the model's queue is full, the request waited too long for it, or the server is
    stopping. ``retry_after`` is in whole seconds."""

    def __init__(self, message: str, retry_after: int, *, code: str = "server_busy") -> None:
        super().__init__(503, message, code=code, headers={"Retry-After": str(max(1, int(retry_after)))})
        self.retry_after = max(1, int(retry_after))


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error" if status < 500
                                                             else "server_error"),
                      "param": param, "code": code}}


def not_found(what: str) -> APIError:
    return APIError(404, what, code="not_found")


def from_library(exc: BaseException) -> APIError:
    """The HTTP error for an exception raised while serving a request. The toolkit's own errors carry a one-line
    message naming the fix: usage and input errors are the client's (400; a closed or evicted session 404);
    anything else is the server's (500, logged with its traceback, the message not echoed)."""
    from facellm_edge.runtime.session import SessionError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SessionError):
        return APIError(404, str(exc), code="session_not_found")
    if isinstance(exc, (UsageError, InputError)):
        return APIError(400, str(exc), code="invalid_request")
    if isinstance(exc, RuntimeStageError):
        log.error("runtime stage failed: %s", exc)
        return APIError(500, f"a runtime stage failed: {exc}", code="runtime_error")
    if isinstance(exc, FaceLLMEdgeError):
        log.error("%s: %s", type(exc).__name__, exc)
        return APIError(500, str(exc), code="server_error")
    log.error("internal error while serving a request", exc_info=exc)
    return APIError(500, f"internal error ({type(exc).__name__}); see the server log", code="server_error")
