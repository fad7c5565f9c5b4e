"""The body of ``POST /v1/chat/completions`` as OpenAI clients send it, and what the server makes of it: one image,
the conversation so far, the question, the face(s) to answer about, and the generation settings.

Content parts ``text`` and ``image_url`` (a ``data:`` URL; remote URLs are refused). One image per conversation: it
may be repeated (clients resend it every turn) but not replaced. ``system`` / ``developer`` messages are accepted
and not applied: the system message is the server's (``--system``), fixed when the model loads, because a
conversation's image prefix is cached with it. Fields of OpenAI's API that the server cannot honour (``n`` > 1,
``logprobs``, ``tools``, a ``seed`` other than the server's with sampling on) are refused with a 400 naming them;
unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from facellm_edge.llm.sampling import GenerationConfig, schema_to_grammar
from facellm_edge.serve.answering import FaceChoice, parse_face_choice
from facellm_edge.serve.errors import APIError
from facellm_edge.serve.images import ImageBytes, from_url
from facellm_edge.serve.sessions import Turns
from facellm_edge.serve.state import check_max_tokens

__all__ = ["MAX_SCHEMA_CHARS", "MAX_STOP_CHARS", "ChatRequest", "Conversation", "conversation", "generation_for"]

MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # a longer stop string is refused: stop strings are short markers, and each is scanned per token
MAX_SCHEMA_CHARS = 32_000  # response_format's JSON schema, as compact JSON; its grammar takes a while to build


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageURL(_Open):
    url: str
    detail: Optional[str] = None


class Part(_Open):
    type: str
    text: Optional[str] = None
    image_url: Optional[Union[ImageURL, str]] = None


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[Part]]] = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[dict[str, Any]] = None


class StreamOptions(_Open):
    include_usage: bool = False


class ChatRequest(_Open):
    """The fields the server reads (others are accepted and ignored)."""

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    n: Optional[int] = None
    response_format: Optional[ResponseFormat] = None
    logprobs: Optional[bool] = None
    tools: Optional[list[Any]] = None
    # extension: "all" | "largest" (default) | a face index; Any, so that parse_face_choice sees a JSON true as
    # true (pydantic would make it 1)
    face: Any = None

    def stops(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"stop takes at most {MAX_STOPS} strings", code="invalid_request", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"a stop string may have at most {MAX_STOP_CHARS} characters", code="invalid_request",
                           param="stop")
        return tuple(s for s in stops if s)

    def face_choice(self) -> FaceChoice:
        return parse_face_choice(self.face)


class Conversation(BaseModel):
    """What a chat request asks: about ``image``, ``question``, after the earlier ``turns``."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    image: ImageBytes
    question: str
    turns: Turns


def _unsupported(param: str, why: str) -> APIError:
    return APIError(400, f"{param}: {why}", code="unsupported_parameter", param=param)


def conversation(request: ChatRequest) -> Conversation:
    """The image, the earlier turns (user text, assistant text) and the last user message's question."""
    turns: list[list[Any]] = []  # [role, texts], consecutive messages of one role merged
    images: dict[str, ImageBytes] = {}
    for i, message in enumerate(request.messages):
        if message.role in ("system", "developer"):
            continue  # the server's system message applies (see the module docstring)
        if message.role == "tool":
            raise _unsupported(f"messages[{i}]", "tool messages are not supported (this model has no tools)")
        texts: list[str] = []
        parts = [Part(type="text", text=message.content)] if isinstance(message.content, str) else message.content or []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                if not isinstance(part.text, str):
                    raise APIError(400, f"{where}: a text part needs \"text\"", code="invalid_request", param=where)
                texts.append(part.text)
            elif part.type == "image_url":
                if message.role != "user":
                    raise APIError(400, f"{where}: only user messages may carry images", code="invalid_request",
                                   param=where)
                url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
                image = from_url(url, f"{where}.image_url")
                images.setdefault(image.sha256, image)
            else:
                raise _unsupported(where, f"content parts of type {part.type!r} are not supported (text, image_url)")
        if turns and turns[-1][0] == message.role:
            turns[-1][1].extend(texts)
        else:
            turns.append([message.role, texts])
    if not images:
        raise APIError(400, "no image: send the photo as an image_url content part of a user message "
                       "(data:image/jpeg;base64,...)", code="missing_image", param="messages")
    if len(images) > 1:
        raise APIError(400, f"{len(images)} different images in one conversation; this endpoint answers about the "
                       "faces of one image (start a new conversation for another)", code="too_many_images",
                       param="messages")
    roles = [role for role, _ in turns]
    if not roles or roles[0] != "user" or roles[-1] != "user":
        raise APIError(400, "the conversation must start and end with a user message", code="invalid_request",
                       param="messages")
    text = ["\n".join(t for t in texts if t) for _, texts in turns]
    pairs = tuple((text[k], text[k + 1]) for k in range(0, len(text) - 1, 2))
    return Conversation(image=next(iter(images.values())), question=text[-1], turns=pairs)


def generation_for(request: ChatRequest, base: GenerationConfig, server_seed: int, n_ctx: int) -> GenerationConfig:
    """The server's generation settings with the request's (a 400 for what cannot be honoured: ``max_tokens``
    above the model's ``n_ctx``, a JSON schema above :data:`MAX_SCHEMA_CHARS`). Blocking (a schema's grammar is
    built here): call it off the event loop."""
    if request.n not in (None, 1):
        raise _unsupported("n", "one choice per face; ask with \"face\": \"all\" for every face instead of n > 1")
    if request.logprobs:
        raise _unsupported("logprobs", "log probabilities are not returned by this server")
    if request.tools:
        raise _unsupported("tools", "tool calls are not supported by this model")
    changes: dict[str, Any] = {}
    max_tokens = check_max_tokens(request.max_completion_tokens or request.max_tokens, n_ctx)
    if max_tokens is not None:
        changes["max_tokens"] = max_tokens
    if request.temperature is not None:
        changes["temperature"] = request.temperature
    if request.top_p is not None:
        changes["top_p"] = request.top_p
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        changes["grammar"] = schema_to_grammar({"type": "object"})
    elif fmt is not None and fmt.type == "json_schema":
        schema = (fmt.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema object",
                           code="invalid_request", param="response_format")
        changes["grammar"] = _grammar(schema)
    gen = replace(base, **changes) if changes else base
    if request.seed is not None and request.seed != server_seed and gen.temperature > 0:
        raise _unsupported("seed", f"the server samples every answer with seed {server_seed}, set when the model "
                                   f"loads; send seed {server_seed}, no seed, or temperature 0 (greedy: no seed)")
    return gen


def _grammar(schema: dict[str, Any]) -> str:
    """The grammar of a request's ``schema``; a 400 when it is above :data:`MAX_SCHEMA_CHARS` or nests too deeply
    for the converter."""
    try:
        size = len(json.dumps(schema, separators=(",", ":")))
        if size <= MAX_SCHEMA_CHARS:
            return schema_to_grammar(schema)
    except RecursionError:
        raise APIError(400, "response_format.json_schema.schema nests too deeply", code="invalid_request",
                       param="response_format") from None
    raise APIError(400, f"response_format.json_schema.schema is above the server's limit of {MAX_SCHEMA_CHARS} "
                        "characters (as compact JSON)", code="invalid_request", param="response_format")
