"""The FastAPI application of ``facellm-edge serve`` (:func:`create_app`) and the uvicorn server that runs it
(:func:`run_server`).

Routes: ``/v1/chat/completions`` and ``/v1/models`` (:mod:`~facellm_edge.serve.openai_api`), ``/v1/faces``
(:mod:`~facellm_edge.serve.faces_api`), ``/v1/live/*`` (the live service's router, when one is given), ``/`` (the
kiosk page) and ``/static/*`` (its files, shipped in the package), ``/health`` and ``/metrics``. No route fetches
anything from the network, and no interactive API docs are served (they would load scripts from a CDN).

One model per process: the model is loaded before the app is made and closed by whoever loaded it, after
:func:`run_server` returns. The app's lifespan starts and stops the live service, expires sessions, and on shutdown
cancels what is still running, closes the kept sessions and stops taking requests (``/health`` answers 503).
Towards the end of the shutdown grace, what is still running is interrupted (:meth:`ModelRunner.interrupt`): an
open chat stream gets a ``shutting_down`` error event and ``data: [DONE]`` before its connection closes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from facellm_edge.errors import FaceLLMEdgeError
from facellm_edge.serve import faces_api, openai_api
from facellm_edge.serve.errors import APIError, Busy, from_library, not_found
from facellm_edge.serve.guards import ApiKey, BodyLimit, RequestMetrics
from facellm_edge.serve.metrics import CONTENT_TYPE, Metrics
from facellm_edge.serve.runner import ModelRunner
from facellm_edge.serve.sessions import SessionStore
from facellm_edge.serve.state import ServerState, server_state
from facellm_edge.serve.trust import TrustedRequests, trusted_hosts

if TYPE_CHECKING:
    import socket

    from facellm_edge.runtime.pipeline import FaceLLM
    from facellm_edge.runtime.session import FaceSession
    from facellm_edge.serve.config import ServeConfig
    from facellm_edge.serve.live import LiveService

__all__ = ["STARTUP_LOG", "STATIC_DIR", "create_app", "listen", "log_levels", "run_server", "uvicorn_config"]

log = logging.getLogger(__name__)
STARTUP_LOG = "facellm_edge.serve.startup"  # the "serving ... on http://..." line, shown without -v (log_levels)

STATIC_DIR = Path(__file__).resolve().parent / "static"
_FLUSH_S = 1.0  # the end of the shutdown grace (at most half of it) left to streams to send their error and end


def create_app(model: "FaceLLM", config: "ServeConfig", live: "LiveService | None" = None, *,
               metrics: Metrics | None = None) -> FastAPI:
    """The server's app for a loaded ``model``. ``metrics``: the registry the live service reports into (by default
    ``live.metrics`` when the live service has one, else a new one)."""
    metrics = metrics or getattr(live, "metrics", None) or Metrics()
    closer = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="facellm-close")
    state = ServerState(model=model, config=config, runner=ModelRunner(config.max_queue, config.request_timeout_s,
                                                                       metrics),
                        store=SessionStore(config.session_ttl_s, _max_sessions(model, config),
                                           lambda s: _close(closer, s)),
                        metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(_sweep(state))
        if live is not None:
            await asyncio.to_thread(live.start)
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            sweeper.cancel()
            if live is not None:
                await asyncio.to_thread(live.stop)
            await asyncio.to_thread(state.runner.close)  # cancels the running answer at its next token
            state.store.close_all()
            await asyncio.to_thread(closer.shutdown, True)

    app = FastAPI(title="facellm-edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    app.state.live = live

    def stopping() -> None:  # the server begins to shut down: /health says so, endless streams end now
        state.ready = False
        if live is not None:
            live.close_streams()

    def interrupt() -> None:  # the shutdown grace is ending: streams still open get an error event and their end
        state.runner.interrupt(Busy("the server is shutting down", 1, code="shutting_down"))

    app.state.stopping = stopping
    app.state.interrupt = interrupt
    _add_error_handlers(app)
    routers = [openai_api.router, faces_api.router] + ([live.router()] if live is not None else [])
    for router in routers:
        app.include_router(router)
    _add_service_routes(app)
    routes = [route for router in routers for route in router.routes] + list(app.router.routes)
    # ASGI layers, innermost first (Starlette wraps each added one around the previous ones)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(ApiKey, api_key=config.api_key)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After"])
    # Host and Origin checks (DNS rebinding, cross-site requests) before anything else answers, counted by metrics
    app.add_middleware(TrustedRequests, hosts=trusted_hosts(config), cors_origins=config.cors_origins)
    app.add_middleware(RequestMetrics, metrics=metrics, log_requests=config.log_requests, routes=routes)
    return app


def _max_sessions(model: "FaceLLM", config: "ServeConfig") -> int:
    """``max_sessions``, but no more than the model's KV cache keeps: a session beyond that would only hold its
    face's crop and embeddings until its first use says it was evicted."""
    slots = model.generator.max_slots
    if slots < config.max_sessions:
        log.info("keeping at most %d face sessions (the KV cache's slots; --max-sessions %d)", slots,
                 config.max_sessions)
    return min(slots, config.max_sessions)


def _add_service_routes(app: FastAPI) -> None:
    # HEAD too on the plain GET routes (FastAPI does not add it): monitoring probes use it
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health(request: Request) -> JSONResponse:
        state = server_state(request)
        if not state.ready:
            return JSONResponse({"status": "unavailable"}, status_code=503, headers={"Retry-After": "1"})
        live = getattr(request.app.state, "live", None)
        return JSONResponse({"status": "ok", "model": state.config.model_name, "sessions": len(state.store),
                             "queue_depth": state.runner.depth,
                             "live": None if live is None else bool(live.ready)})

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics(request: Request) -> Response:
        return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE)

    @app.api_route("/", methods=["GET", "HEAD"])
    async def index() -> FileResponse:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise not_found("the kiosk page is not installed (facellm_edge/serve/static/index.html is missing)")
        return FileResponse(page, headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")


def _add_error_handlers(app: FastAPI) -> None:
    def respond(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(FaceLLMEdgeError)
    async def library_error(_request: Request, exc: FaceLLMEdgeError) -> JSONResponse:
        return respond(from_library(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.url.path} does not take {request.method}"
        else:
            message = str(exc.detail)
        return respond(APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None,
                                headers=exc.headers))  # a 405's Allow

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return respond(APIError(400, f"{where}: {first.get('msg', 'invalid request')}", code="invalid_request"))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        return respond(from_library(exc))


async def _sweep(state: ServerState) -> None:
    """Close the sessions unused for the TTL, a few times per TTL (and at least every 5 s)."""
    interval = max(0.05, min(5.0, state.config.session_ttl_s / 4))
    while True:
        await asyncio.sleep(interval)
        expired = state.store.sweep()
        if expired:
            log.debug("%d sessions expired", expired)


def _close(closer: cf.ThreadPoolExecutor, sessions: list["FaceSession"]) -> None:
    """Close sessions off the event loop (closing waits for the model's lock)."""

    def close_all() -> None:
        for session in sessions:
            try:
                session.close()
            except FaceLLMEdgeError as exc:  # the model was closed meanwhile: nothing left to free
                log.debug("closing session %s: %s", session.id, exc)

    try:
        closer.submit(close_all)
    except RuntimeError:  # shut down: the model is being closed, which frees every session
        pass


def run_server(app: FastAPI, config: "ServeConfig", sock: "socket.socket | None" = None) -> None:
    """Serve ``app`` until SIGTERM or Ctrl-C, then stop gracefully: no new connections, in-flight requests get
    ``shutdown_grace_s`` to finish and are then cancelled, the lifespan closes the sessions. Returns normally
    (exit code 0): the signal was the way to stop a server, not a failure. ``sock``: a socket from :func:`listen`
    (bound before the model loads, so a taken port fails at once); by default one is bound here."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                logging.getLogger(STARTUP_LOG).info("serving %s on %s", config.model_name, _url(sock))

        async def shutdown(self, sockets: Any = None) -> None:
            app.state.stopping()
            # uvicorn cancels the requests still running when the grace ends, cutting a stream mid-body; interrupt
            # them a little before, so that each ends as the API says (an error event, then data: [DONE])
            grace = config.shutdown_grace_s
            ending = asyncio.get_running_loop().call_later(max(grace / 2, grace - _FLUSH_S), app.state.interrupt)
            try:
                await super().shutdown(sockets)
            finally:
                ending.cancel()

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            with super().capture_signals():
                yield
                self._captured_signals.clear()  # handled here: uvicorn would re-raise it to the CLI after exiting

    log_levels(config)
    sock = sock or listen(config.host, config.port)
    server = _Server(uvicorn_config(app, config))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def uvicorn_config(app: FastAPI, config: "ServeConfig") -> Any:
    """uvicorn's settings for ``app``. No access log, even with ``--log-requests``: it would write raw query strings
    (the ``?api_key=`` of EventSource and <img> clients); :class:`RequestMetrics` logs the route template."""
    import uvicorn

    return uvicorn.Config(app, host=config.host, port=config.port, log_config=None, access_log=False, lifespan="on",
                          timeout_graceful_shutdown=config.shutdown_grace_s, server_header=False)


def log_levels(config: "ServeConfig") -> None:
    """The startup line (where the server listens) at INFO, and with ``--log-requests`` every ``facellm_edge.serve``
    logger: the CLI's root logger is at WARNING without ``-v``, which would hide them. A lower level (``--debug``)
    is kept."""
    for name in ("facellm_edge.serve",) if config.log_requests else (STARTUP_LOG,):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)


def _url(sock: "socket.socket") -> str:
    host, port = sock.getsockname()[:2]  # the bound port (--port 0 picks one)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listen(host: str, port: int) -> "socket.socket":
    """The listening socket, bound here so that a taken port or a foreign address is a one-line usage error."""
    import socket

    from facellm_edge.errors import UsageError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise UsageError(f"cannot serve on {host}:{port}: {exc.strerror or exc}; check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot serve on {host}:{port}: {exc.strerror or exc}; choose another --port (or "
                         "--host)") from None
    sock.set_inheritable(True)
    return sock
