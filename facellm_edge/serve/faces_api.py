"""The native face API: the per-face JSON of ``facellm-edge ask --json`` over HTTP, with sessions to follow up in.

* ``POST /v1/faces`` — a photo (``multipart/form-data`` with an ``image`` file, or JSON with ``image`` as base64 or
  a ``data:`` URL) and a ``question`` (optional ``face``: ``all`` (default) | ``largest`` | an index, ``max_tokens``,
  ``temperature``) -> ``{"question", "faces": [{"face", "box", "score", "landmarks", "answer", "timings_ms",
  "session", ...}], "no_face"}``.
* ``POST /v1/faces/{session}/messages`` — ``{"question"}``: a follow-up in that face's session (its cached prefix:
  no new encode) -> the same shape with one face.
* ``DELETE /v1/faces/{session}`` — close it now. Sessions also end after ``--session-ttl`` unused, or when more than
  ``--max-sessions`` are open; their id then answers a 404 that says so.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Optional, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from facellm_edge.llm.generator import check_question
from facellm_edge.serve.answering import Piece, Replied, Task, face_record, faces_job, followup_job, parse_face_choice
from facellm_edge.serve.errors import APIError
from facellm_edge.serve.images import ImageBytes, from_base64, parse_multipart
from facellm_edge.serve.state import (ServerState, check_max_tokens, parse_json, server_state, until_disconnected,
                                      validation_message)
from facellm_edge.serve.trust import require_json

__all__ = ["router"]

router = APIRouter()


class _Question(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)  # as chat completions


class _Photo(_Question):
    image: Union[str, bytes]
    face: Any = None  # checked by parse_face_choice (pydantic would read a JSON true as face 1)


def _photo_from_form(fields: dict[str, Any]) -> _Photo:
    image = fields.get("image")
    if not isinstance(image, bytes):
        raise APIError(400, "the form needs an \"image\" file field (the photo)", code="missing_image", param="image")
    try:
        return _Photo.model_validate(fields)
    except ValidationError as exc:
        raise APIError(400, validation_message(exc), code="invalid_request") from None


@router.post("/v1/faces")
async def ask_faces(request: Request) -> dict[str, Any]:
    t0 = time.perf_counter()
    state = server_state(request)
    ctype = request.headers.get("content-type", "")
    if ctype.lower().startswith("multipart/form-data"):
        body = await request.body()
        photo = await asyncio.to_thread(lambda: _photo_from_form(parse_multipart(body, ctype)))
        image = ImageBytes(photo.image, "image")
    else:
        require_json(request, "multipart/form-data")
        photo, image = await parse_json(request, _Photo, lambda p: (p, from_base64(p.image, "image")))
    cfg = state.model.config
    max_tokens = check_max_tokens(photo.max_tokens, state.model.generator.n_ctx)
    task = Task(image, check_question(photo.question), parse_face_choice(photo.face, default="all"),
                cfg.generation.with_overrides(max_tokens, photo.temperature), index=False,
                max_pixels=cfg.max_pixels)
    records = await _records(request, state, t0, faces_job, state.model, state.store, task)
    return {"question": photo.question, "faces": records, "no_face": not records}


@router.post("/v1/faces/{session_id}/messages")
async def follow_up(session_id: str, request: Request) -> dict[str, Any]:
    t0 = time.perf_counter()
    state = server_state(request)
    q = await parse_json(request, _Question)
    max_tokens = check_max_tokens(q.max_tokens, state.model.generator.n_ctx)
    gen = state.model.config.generation.with_overrides(max_tokens, q.temperature)
    check_question(q.question)
    state.store.check(session_id)  # a fast 404 before taking a place in the model's queue
    records = await _records(request, state, t0, followup_job, state.model, state.store, session_id, q.question, gen)
    return {"question": q.question, "faces": records, "no_face": False}


@router.delete("/v1/faces/{session_id}")
async def delete_session(session_id: str, request: Request) -> dict[str, Any]:
    server_state(request).store.delete(session_id)
    return {"id": session_id, "object": "face.session", "deleted": True}


async def _records(request: Request, state: ServerState, t0: float, job: Any, *args: Any) -> list[dict[str, Any]]:
    """Run ``job`` in the model's queue and collect its per-face records (cancelled if the client goes away)."""
    records: list[dict[str, Any]] = []

    async def consume() -> None:
        first = True
        async with state.runner.stream(job, *args) as events:
            async for event in events:
                if isinstance(event, Piece) and first:
                    first = False
                    state.metrics.ttft_seconds.observe(time.perf_counter() - t0)
                elif isinstance(event, Replied):
                    records.append(face_record(event.session, event.reply, event.first))
                    if event.reply.tokens_per_s > 0:
                        state.metrics.decode_tokens_per_s.observe(event.reply.tokens_per_s)

    await until_disconnected(request, consume())
    return records
