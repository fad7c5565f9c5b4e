"""``POST /v1/chat/completions`` through the official ``openai`` client against a real uvicorn server on 127.0.0.1
with the tiny bundle: greedy answers equal the in-process API's for the same face, streaming, one choice per face,
follow-ups that continue the face's cached session, JSON schema answers, stop strings, and errors as the client's
own exception classes with OpenAI's error shape."""

from __future__ import annotations

import base64
import json
import threading

import numpy as np
import pytest

from facellm_edge.serve.app import create_app
from facellm_edge.serve.config import ServeConfig

QUESTION = "How old is this person?"
FOLLOW_UP = "And what is their expression?"

pytestmark = pytest.mark.slow  # tiny_bundle


@pytest.fixture(scope="module")
def server(live_model, serving):
    app = create_app(live_model, ServeConfig(max_body_bytes=6_000_000))
    with serving(app) as url:
        yield url, app.state.serve


@pytest.fixture(scope="module")
def client(server):
    """The official client on the server. (openai is imported in the tests, not at the top: the fast lane collects
    this slow module without paying for that import.)"""
    import openai

    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def user(data_url):
    """``user(image, text=QUESTION)``: a user message with the question and the image as a data URL."""
    def message(image: np.ndarray, text: str = QUESTION) -> dict:
        return {"role": "user", "content": [{"type": "text", "text": text},
                                            {"type": "image_url", "image_url": {"url": data_url(image)}}]}

    return message


def test_answer_and_stream_equal_the_in_process_answer(client, live_model, astronaut_bgr, user):
    (expected,) = live_model.ask(astronaut_bgr, QUESTION)
    resp = client.chat.completions.create(model="facellm-edge", messages=[user(astronaut_bgr)], temperature=0)
    (choice,) = resp.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == "length"  # the tiny model never stops before max_tokens
    face = choice.model_extra["face"]
    assert face["box"] == expected.to_dict()["box"] and face["continued"] is False
    assert resp.model_extra["no_face"] is False and resp.model_extra["faces"] == [face]
    assert resp.usage.completion_tokens == len(expected.token_ids)
    rows = expected.session.face.embeds.shape[0]
    assert resp.usage.prompt_tokens == len(live_model.generator.prompt_tokens([rows], QUESTION))  # the whole first turn

    stream = client.chat.completions.create(model="facellm-edge", messages=[user(astronaut_bgr)], stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].model_extra["face"]["box"]
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == ["length"] and chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_follow_up_continues_the_cached_session(client, server, live_model, astronaut_bgr, user):
    (expected,) = live_model.ask(astronaut_bgr, QUESTION)
    expected_follow = expected.session.ask(FOLLOW_UP).text
    first = client.chat.completions.create(model="facellm-edge", messages=[user(astronaut_bgr)])
    history = [user(astronaut_bgr), {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": FOLLOW_UP}]
    follow = client.chat.completions.create(model="facellm-edge", messages=history)
    face = follow.choices[0].model_extra["face"]
    assert face["continued"] is True and face["session"] == first.choices[0].model_extra["face"]["session"]
    assert "encode" not in face["timings_ms"]  # no new encode, no image prefill: a warm TTFT
    assert follow.usage.prompt_tokens_details.cached_tokens == expected.session.n_prefix
    assert follow.choices[0].message.content == expected_follow  # as the same follow-up in process

    edited = [history[0], {"role": "assistant", "content": "something else"}, history[2]]
    reset = client.chat.completions.create(model="facellm-edge", messages=edited).choices[0].model_extra["face"]
    assert reset["continued"] is False and reset["context_reset"] is True  # a new conversation, said so


def test_face_all_gives_one_choice_per_face(client, live_model, t1_bgr, user):
    expected = live_model.ask(t1_bgr, QUESTION, max_tokens=2)
    resp = client.chat.completions.create(model="facellm-edge", messages=[user(t1_bgr)], max_tokens=2,
                                          extra_body={"face": "all"})
    assert len(resp.choices) == len(expected) == 6
    for i, (choice, ans) in enumerate(zip(resp.choices, expected)):
        face = choice.model_extra["face"]
        assert choice.index == i and face["face"] == ans.index and face["box"] == ans.to_dict()["box"]
        assert choice.message.content == ans.text
    assert resp.model_extra["faces"] == [c.model_extra["face"] for c in resp.choices]
    largest = max(expected, key=lambda a: (a.box[2] - a.box[0]) * (a.box[3] - a.box[1]))
    by_default = client.chat.completions.create(model="facellm-edge", messages=[user(t1_bgr)], max_tokens=1)
    assert by_default.choices[0].model_extra["face"]["face"] == largest.index
    second = client.chat.completions.create(model="facellm-edge", messages=[user(t1_bgr)], max_tokens=1,
                                            extra_body={"face": 1})
    assert second.choices[0].model_extra["face"]["box"] == expected[1].to_dict()["box"]


def test_face_all_is_answered_together(client, live_model, t1_bgr, user, monkeypatch):
    """The faces of one image are answered as ``ask`` answers them: one batched run for all (the streamed choices
    interleave), each choice the same text as ``ask``'s."""
    expected = live_model.ask(t1_bgr, QUESTION, max_tokens=3)
    calls = []
    real = live_model.generator.stream_many_checked
    monkeypatch.setattr(live_model.generator, "stream_many_checked",
                        lambda keys, *a, **k: (calls.append(len(keys)), real(keys, *a, **k))[1])
    stream = client.chat.completions.create(model="facellm-edge", messages=[user(t1_bgr)], max_tokens=3,
                                            stream=True, extra_body={"face": "all"})
    order, texts = [], {}
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.content:
                order.append(c.index)
                texts[c.index] = texts.get(c.index, "") + c.delta.content
    assert calls == [6]  # one run for the six faces
    assert order != sorted(order)  # tokens of different faces interleave
    assert [texts.get(i, "") for i in range(6)] == [a.text for a in expected]


def test_json_schema_and_stop_strings(client, astronaut_bgr, user):
    schema = {"type": "object", "properties": {"smiling": {"type": "boolean"}}, "required": ["smiling"],
              "additionalProperties": False}
    resp = client.chat.completions.create(
        model="facellm-edge", messages=[user(astronaut_bgr, "Is this person smiling?")], max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "smile", "schema": schema}})
    answer = json.loads(resp.choices[0].message.content)
    assert set(answer) == {"smiling"} and isinstance(answer["smiling"], bool)
    resp = client.chat.completions.create(model="facellm-edge", messages=[user(astronaut_bgr)], max_tokens=8,
                                          response_format={"type": "json_object"})
    assert resp.choices[0].message.content.startswith("{")  # the random model writes one endless key: cut at 8

    full = client.chat.completions.create(model="facellm-edge", messages=[user(astronaut_bgr)], max_tokens=6)
    text = full.choices[0].message.content
    cut = text[len(text) // 2:len(text) // 2 + 2]  # a stop string from the middle of the greedy answer
    resp = client.chat.completions.create(model="facellm-edge", messages=[user(astronaut_bgr)], max_tokens=6,
                                          stop=[cut])
    assert resp.choices[0].message.content == text[:text.index(cut)]
    assert resp.choices[0].finish_reason == "stop" and resp.usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="facellm-edge", messages=[user(astronaut_bgr)], max_tokens=6, stop=cut, stream=True) if c.choices)
    assert streamed == text[:text.index(cut)]


def test_no_face_and_errors_in_openai_shape(client, server, user):
    import openai

    blank = np.full((240, 320, 3), 127, np.uint8)
    resp = client.chat.completions.create(model="facellm-edge", messages=[user(blank)])
    assert resp.model_extra["no_face"] is True and resp.model_extra["faces"] == []
    assert "No face" in resp.choices[0].message.content and resp.usage.total_tokens == 0

    def error(exc_type, **kwargs) -> dict:
        with pytest.raises(exc_type) as info:
            client.chat.completions.create(**{"model": "facellm-edge", **kwargs})
        return info.value.body

    not_image = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"junk" * 100).decode()
    bad = [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                        {"type": "image_url", "image_url": {"url": not_image}}]}]
    assert error(openai.BadRequestError, messages=bad)["code"] == "invalid_image"
    remote = [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                           {"type": "image_url", "image_url": {"url": "http://example.com/a.jpg"}}]}]
    body = error(openai.BadRequestError, messages=remote)
    assert body["code"] == "remote_image_url" and "never downloads" in body["message"]
    huge = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + "A" * 7_000_000}}]}]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="facellm-edge", messages=huge)
    assert info.value.status_code == 413 and info.value.body["code"] == "request_too_large"
    assert error(openai.NotFoundError, messages=bad, model="gpt-4o")["code"] == "not_found"
    assert [m.id for m in client.models.list()] == ["facellm-edge"]


def test_api_key_and_busy_as_openai_exceptions(live_model, astronaut_bgr, user, serving, model_held, wait_until):
    import openai

    app = create_app(live_model, ServeConfig(api_key="right", max_queue=0))
    with serving(app) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="right", max_retries=0, timeout=60)
        assert [m.id for m in keyed.models.list()] == ["facellm-edge"]
        got: list[str] = []

        def stream() -> None:  # admitted, then waits for the model (the headers come with its first event)
            got.extend(c.choices[0].delta.content or "" for c in keyed.chat.completions.create(
                model="facellm-edge", messages=[user(astronaut_bgr)], stream=True) if c.choices)

        with model_held(live_model, astronaut_bgr):
            waiting = threading.Thread(target=stream)
            waiting.start()
            wait_until(lambda: app.state.serve.runner.busy == 1)
            with pytest.raises(openai.InternalServerError) as info:
                keyed.chat.completions.create(model="facellm-edge", messages=[user(astronaut_bgr)])
            assert info.value.status_code == 503 and int(info.value.response.headers["retry-after"]) >= 1
            assert info.value.body["code"] == "server_busy"
        waiting.join(60)
        assert "".join(got)
