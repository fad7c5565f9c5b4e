"""What ``facellm-edge serve`` can be told: one frozen :class:`ServeConfig` (the CLI options read their defaults from
its fields). The model's own settings (bundle, context, generation defaults, image size bound) stay in
:class:`~facellm_edge.runtime.config.RuntimeConfig`."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from facellm_edge.errors import UsageError
from facellm_edge.runtime.live.tracker import DEFAULT_DETECT_EVERY

__all__ = ["ServeConfig", "is_loopback"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


@dataclass(frozen=True)
class ServeConfig:
    """The HTTP service's settings; every value is checked when the config is made."""

    host: str = "127.0.0.1"  # loopback by default: a device on a network needs --host and an API key
    port: int = 8080
    api_key: str | None = None  # required as ``Authorization: Bearer KEY`` on /v1/* and /metrics when set
    max_queue: int = 8  # requests waiting for the model beyond the running one; more -> 503 + Retry-After
    request_timeout_s: float = 120.0  # waiting + answering; then 503 (never started) or 504 (cancelled)
    session_ttl_s: float = 600.0  # a conversation unused this long is closed (its KV cells freed)
    max_sessions: int = 64  # conversations kept at once; the least recently used is closed beyond that
    max_body_bytes: int = 20_000_000  # request bodies above this are refused with 413
    model_name: str = "facellm-edge"  # the model id of /v1/models and of chat completion requests
    source: str | None = None  # live source spec (camera index, file, URL); None: browser camera / no live loop
    question: str = "Describe this person."  # the live loop's standing question
    detect_every: int = DEFAULT_DETECT_EVERY  # the live loop's detector on every Nth frame (LiveConfig.detect_every; 0 = auto)
    insecure: bool = False  # allow a non-loopback host without an API key (the user said so explicitly)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API from other pages; none by default
    allowed_hosts: tuple[str, ...] = ()  # Host names answered beside the default ones (serve/trust.py); none
    log_requests: bool = False  # log each request (method, path, status, time) and its questions and answers
    shutdown_grace_s: float = 10.0  # on SIGTERM / Ctrl-C: in-flight requests get this long, then are cancelled

    def __post_init__(self) -> None:
        if not self.host:
            raise UsageError("the host is empty; use --host 127.0.0.1 (this machine only) or an address")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"port {self.port} must be in 0..65535 (0 = any free port)")
        if self.api_key is not None and (not self.api_key.strip() or any(c.isspace() for c in self.api_key)):
            raise UsageError("the API key must be non-empty and contain no spaces")
        if not is_loopback(self.host) and self.api_key is None and not self.insecure:
            raise UsageError(f"--host {self.host} accepts connections from other machines: give --api-key KEY "
                             "(clients send Authorization: Bearer KEY), or --insecure to serve without one")
        if self.max_queue < 0:
            raise UsageError(f"max_queue {self.max_queue} must be >= 0 (0 = only the running request)")
        for name in ("request_timeout_s", "session_ttl_s", "shutdown_grace_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise UsageError(f"{name} {value} must be a positive number of seconds")
        if self.max_sessions < 1:
            raise UsageError(f"max_sessions {self.max_sessions} must be >= 1")
        if self.max_body_bytes < 1024:
            raise UsageError(f"max_body_bytes {self.max_body_bytes} must be >= 1024")
        if not self.model_name.strip():
            raise UsageError("the model name is empty")
        if not self.question.strip():
            raise UsageError("the live question is empty; ask something")
        if self.detect_every < 0:
            raise UsageError(f"detect_every {self.detect_every} must be >= 0 (0 = auto, 1 = every frame)")
        for name in self.allowed_hosts:
            if not name.strip() or any(c.isspace() or c in "/@" for c in name):
                raise UsageError(f"allowed host {name!r} must be a host name or address (kiosk.local, 10.0.0.5), "
                                 "without a scheme or path")
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise UsageError(f"CORS origin {origin!r} must be like http://host:port (or *)")
