"""OpenAI-compatible chat: ``GET /v1/models``, ``POST /v1/chat/completions`` (JSON or server-sent events).

The answer is about the image's largest face by default; the extension field ``"face"`` (the ``openai`` client's
``extra_body``) chooses ``"all"`` (one choice per face, in detection order) or a face index. Each choice carries
the face it answers about as ``choices[i].face`` (box, score, landmarks, timings, session id, whether a kept
conversation was continued); the top level carries ``faces`` (the same records) and ``no_face``. An image without
a face gets a normal answer saying so, with ``"no_face": true``.

A follow-up that sends back the same image and the earlier turns as this server answered them continues that
face's kept session (``usage.prompt_tokens_details.cached_tokens`` > 0, ``face.continued``): no encode, no image
prefill. Earlier turns that match no kept session (edited, expired) start a new one (``face.context_reset``): the
model then sees the image and the last question only.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from facellm_edge.llm.generator import check_question
from facellm_edge.serve.answering import FaceOpened, NoFace, Piece, Replied, Task, face_record, faces_job
from facellm_edge.serve.errors import from_library, not_found
from facellm_edge.serve.openai_schema import ChatRequest, conversation, generation_for
from facellm_edge.serve.runner import ModelStream
from facellm_edge.serve.state import ServerState, parse_json, server_state, until_disconnected

__all__ = ["NO_FACE_TEXT", "router"]

log = logging.getLogger(__name__)

router = APIRouter()

NO_FACE_TEXT = "No face was found in this image, so there is no one to answer about."


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.config.model_name, "object": "model", "created": int(state.started), "owned_by": "facellm-edge"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(server_state(request))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    state = server_state(request)
    if model_id != state.config.model_name:
        raise _unknown_model(model_id, state)
    return _model_card(state)


def _unknown_model(name: str, state: ServerState):
    return not_found(f"the model {name!r} does not exist; this server serves {state.config.model_name!r} "
                     "(GET /v1/models)")


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
    t0 = time.perf_counter()
    state = server_state(request)
    cfg, n_ctx = state.model.config, state.model.generator.n_ctx
    # the generation settings are made in the parsing thread too: a response_format schema's grammar takes a while
    req, conv, gen = await parse_json(request, ChatRequest, lambda r: (
        r, conversation(r), generation_for(r, cfg.generation, cfg.engine.seed, n_ctx)))
    if req.model != state.config.model_name:
        raise _unknown_model(req.model, state)
    task = Task(conv.image, check_question(conv.question), req.face_choice(), gen, req.stops(), conv.turns,
                index=True, max_pixels=cfg.max_pixels)
    events = state.runner.stream(faces_job, state.model, state.store, task)
    completion = _Completion(state, req, conv.question, t0)
    if req.stream:
        try:  # an error before the first event is a plain HTTP error
            first = await until_disconnected(request, events.__anext__())
        except BaseException:
            await events.aclose()
            raise
        return StreamingResponse(completion.sse(events, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    async with events:
        await until_disconnected(request, completion.collect(events))
    return JSONResponse(completion.body())


class _Completion:
    """One chat completion being assembled from the model's events."""

    def __init__(self, state: ServerState, request: ChatRequest, question: str, t0: float) -> None:
        self.state = state
        self.request = request
        self.question = question
        self.t0 = t0
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.texts: dict[int, list[str]] = {}
        self.faces: dict[int, dict[str, Any]] = {}
        self.finish: dict[int, str] = {}
        self.prompt = self.generated = self.cached = 0
        self.no_face = False
        self._ttft_seen = False

    # -- events ---------------------------------------------------------------------------------------------
    def apply(self, event: object) -> None:
        if isinstance(event, Piece):
            if not self._ttft_seen:
                self._ttft_seen = True
                self.state.metrics.ttft_seconds.observe(time.perf_counter() - self.t0)
            self.texts.setdefault(event.choice, []).append(event.text)
        elif isinstance(event, FaceOpened):
            self.texts.setdefault(event.choice, [])
            self.faces[event.choice] = {**event.session.face.to_dict(), "face": event.session.index,
                                        "session": event.session.id, "continued": event.continued,
                                        "context_reset": event.reset}
        elif isinstance(event, Replied):
            reply = event.reply
            record = face_record(event.session, reply, event.first)
            record.pop("answer")
            self.faces[event.choice].update(record)
            self.finish[event.choice] = reply.finish_reason
            self.prompt += reply.n_prompt
            self.generated += reply.n_generated
            self.cached += reply.n_cached
            if reply.tokens_per_s > 0:
                self.state.metrics.decode_tokens_per_s.observe(reply.tokens_per_s)
            if self.state.config.log_requests:
                log.info("%s face %d: %r -> %r", self.id, event.session.index, self.question, reply.text)
        elif isinstance(event, NoFace):
            self.no_face = True
            self.texts[0] = [NO_FACE_TEXT]
            self.finish[0] = "stop"

    async def collect(self, events: ModelStream) -> None:
        async for event in events:
            self.apply(event)

    # -- JSON -----------------------------------------------------------------------------------------------
    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.state.config.model_name,
                "system_fingerprint": None}

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.generated,
                "total_tokens": self.prompt + self.generated, "prompt_tokens_details": {"cached_tokens": self.cached}}

    def body(self) -> dict[str, Any]:
        choices = [{"index": c, "message": {"role": "assistant", "content": "".join(self.texts[c]), "refusal": None},
                    "logprobs": None, "finish_reason": self.finish.get(c, "stop"), "face": self.faces.get(c)}
                   for c in sorted(self.texts)]
        return {**self._head("chat.completion"), "choices": choices, "usage": self.usage(),
                "faces": [self.faces[c] for c in sorted(self.faces)], "no_face": self.no_face}

    def _chunk(self, choice: int, delta: dict[str, Any], finish: str | None = None,
               face: dict[str, Any] | None = None) -> bytes:
        item: dict[str, Any] = {"index": choice, "delta": delta, "logprobs": None, "finish_reason": finish}
        if face is not None:
            item["face"] = face
        return _sse({**self._head("chat.completion.chunk"), "choices": [item], "no_face": self.no_face})

    async def sse(self, events: ModelStream, first: object) -> AsyncIterator[bytes]:
        """OpenAI's chunk stream: per face, a role chunk (with the face's box), content chunks, a final chunk with
        ``finish_reason`` (and the face's full record); ``usage`` last when ``stream_options.include_usage``; then
        ``data: [DONE]``. An error after the first chunk is sent as an ``error`` event."""
        try:
            async with events:
                event: object = first
                while True:
                    self.apply(event)
                    for chunk in self._chunks_for(event):
                        yield chunk
                    try:
                        event = await events.__anext__()
                    except StopAsyncIteration:
                        break
            if self.request.stream_options is not None and self.request.stream_options.include_usage:
                yield _sse({**self._head("chat.completion.chunk"), "choices": [], "usage": self.usage()})
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error event; cancellation passes
            yield _sse(from_library(exc).body())
        yield b"data: [DONE]\n\n"

    def _chunks_for(self, event: object) -> list[bytes]:
        if isinstance(event, FaceOpened):
            return [self._chunk(event.choice, {"role": "assistant", "content": ""}, face=self.faces[event.choice])]
        if isinstance(event, Piece):
            return [self._chunk(event.choice, {"content": event.text})]
        if isinstance(event, Replied):
            return [self._chunk(event.choice, {}, self.finish[event.choice], face=self.faces[event.choice])]
        if isinstance(event, NoFace):
            return [self._chunk(0, {"role": "assistant", "content": NO_FACE_TEXT}, "stop")]
        return []


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"
