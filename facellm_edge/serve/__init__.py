"""``facellm-edge serve``: the toolkit as a local HTTP service for kiosks and robots (the ``serve`` extra: FastAPI,
uvicorn, prometheus-client).

* :mod:`~facellm_edge.serve.config` — :class:`ServeConfig`, the service's settings;
* :mod:`~facellm_edge.serve.app` — :func:`create_app` (the FastAPI app for a loaded model) and :func:`run_server`;
* :mod:`~facellm_edge.serve.openai_api` / :mod:`~facellm_edge.serve.openai_schema` — OpenAI-compatible chat;
* :mod:`~facellm_edge.serve.faces_api` — the native face API (per-face JSON, sessions to follow up in);
* :mod:`~facellm_edge.serve.live` — the live loop's events, frames and controls, the browser-camera mode;
* :mod:`~facellm_edge.serve.answering` — the model work of a request (runs in the model's worker thread);
* :mod:`~facellm_edge.serve.runner` — that worker thread and its bounded queue (503 + ``Retry-After`` when full);
* :mod:`~facellm_edge.serve.sessions` — kept conversations (TTL, LRU, clear 404s);
* :mod:`~facellm_edge.serve.images` — ``data:`` URLs and uploads through the bounded image decoder;
* :mod:`~facellm_edge.serve.guards` — API key, body size limit, request metrics;
* :mod:`~facellm_edge.serve.errors` — OpenAI's error JSON and the status codes;
* :mod:`~facellm_edge.serve.metrics` — the Prometheus metrics.

How to run and call it: ``docs/serve.md``. Import the submodules (this package imports nothing itself, so that
the CLI and the runtime never pay for FastAPI unless they serve).
"""
