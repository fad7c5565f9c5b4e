"""``facellm-edge serve``: the model as a local HTTP service (OpenAI-compatible chat, face sessions, live events,
the kiosk page). Takes the model options of ``ask`` / ``run`` (:mod:`facellm_edge.commands.runtime_options`);
the service's own options map to the fields of :class:`~facellm_edge.serve.config.ServeConfig`, whose defaults
they show. FastAPI and uvicorn are imported when the command runs (the ``serve`` extra)."""

from __future__ import annotations

import logging
from typing import List, Optional

import typer

from facellm_edge.commands.defaults import field_default
from facellm_edge.commands.runtime_options import DETECT_EVERY_HELP, RuntimeOptions, runtime_options
from facellm_edge.serve.config import ServeConfig

log = logging.getLogger(__name__)


def _default(name: str):
    return field_default(ServeConfig, name)


@runtime_options(live=False)
def serve_cmd(
    source: Optional[str] = typer.Option(None, "--source", help="Run the live loop on this source too: camera "
                                         "index, video file, folder, rtsp:// / http:// stream, or 'browser' (the "
                                         "kiosk page sends its own camera's frames)."),
    question: str = typer.Option(_default("question"), "--question", "-q",
                                 help="The live loop's standing question (PUT /v1/live/question changes it)."),
    detect_every: int = typer.Option(_default("detect_every"), "--detect-every", min=0, help=DETECT_EVERY_HELP),
    host: str = typer.Option(_default("host"), "--host", help="Address to listen on. Anything but loopback needs "
                             "--api-key (or --insecure)."),
    port: int = typer.Option(_default("port"), "--port", min=0, max=65535, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="FACELLM_EDGE_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' (or the environment variable "
                                          "FACELLM_EDGE_API_KEY, which keeps the key out of the process list)."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --host without an API key."),
    cors_origin: Optional[List[str]] = typer.Option(None, "--cors-origin", help="Allow browser pages of this origin "
                                                    "(http://host:port) to call the API; repeat for several. "
                                                    "Off by default."),
    allowed_host: Optional[List[str]] = typer.Option(None, "--allowed-host", help="Also answer requests sent to "
                                                     "this host name (e.g. the kiosk's own name); repeat for several. "
                                                     "By default: localhost, 127.0.0.1, [::1] and the --host address "
                                                     "(any name on 0.0.0.0 / ::)."),
    max_queue: int = typer.Option(_default("max_queue"), "--max-queue", min=0, help="Requests that may wait for "
                                  "the model beside the running one; more get 503 with Retry-After."),
    request_timeout: float = typer.Option(_default("request_timeout_s"), "--request-timeout", min=0.001,
                                          help="Seconds a request may wait and run; then 503 (never started) or 504 "
                                          "(cancelled)."),
    session_ttl: float = typer.Option(_default("session_ttl_s"), "--session-ttl", min=0.001,
                                      help="Seconds a face session is kept unused for follow-ups."),
    max_sessions: int = typer.Option(_default("max_sessions"), "--max-sessions", min=1,
                                     help="Face sessions kept at once (least recently used closed first)."),
    max_body_bytes: int = typer.Option(_default("max_body_bytes"), "--max-body-bytes", min=1024,
                                       help="Largest request body (an image upload) in bytes; larger gets 413."),
    model_name: str = typer.Option(_default("model_name"), "--model-name",
                                   help="The model id clients send (GET /v1/models)."),
    log_requests: bool = typer.Option(False, "--log-requests", help="Log every request and its questions and "
                                      "answers (nothing about requests is logged or stored otherwise)."),
    shutdown_grace: float = typer.Option(_default("shutdown_grace_s"), "--shutdown-grace", min=0.001,
                                         help="On SIGTERM / Ctrl-C: seconds in-flight requests get to finish."),
    *,
    options: RuntimeOptions,
) -> None:
    """Binds 127.0.0.1:8080 by default; SIGTERM or Ctrl-C stop it gracefully (exit 0). See docs/serve.md."""
    from facellm_edge.errors import require

    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require(module, "serve")
    config = ServeConfig(host=host, port=port, api_key=api_key, max_queue=max_queue,
                         request_timeout_s=request_timeout, session_ttl_s=session_ttl, max_sessions=max_sessions,
                         max_body_bytes=max_body_bytes, model_name=model_name, source=source, question=question,
                         detect_every=detect_every,
                         insecure=insecure, cors_origins=tuple(cors_origin or ()),
                         allowed_hosts=tuple(allowed_host or ()),
                         log_requests=log_requests, shutdown_grace_s=shutdown_grace)
    serve(config, options)


def serve(config: ServeConfig, options: RuntimeOptions) -> None:
    """Load the model, open the live source (if any), serve until stopped, close both."""
    from facellm_edge.runtime.pipeline import FaceLLM
    from facellm_edge.serve.app import create_app, listen, run_server
    from facellm_edge.serve.metrics import Metrics

    runtime = options.runtime_config()
    if config.source:  # the frame loop shares the CPU: the live thread policy for thread counts left unset
        runtime = runtime.for_live()
    sock = listen(config.host, config.port)  # a taken port fails now, not after the model has loaded
    source = None
    try:
        if config.source:
            from facellm_edge.serve.live import open_live_source

            source = open_live_source(config.source, runtime.max_pixels)  # fails before the model loads
        with FaceLLM.load(options.bundle_dir(), runtime) as model:
            model.detector  # load the detector now, not on the first request
            metrics = Metrics()
            live = None
            if source is not None:
                from facellm_edge.serve.live import LiveService

                live = LiveService(model, config, metrics, source)
            run_server(create_app(model, config, live, metrics=metrics), config, sock)
    finally:
        sock.close()
        if source is not None:
            source.close()
    log.info("server stopped")
