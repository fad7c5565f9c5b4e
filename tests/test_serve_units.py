"""The server's pieces that need no model: the stop-string scanner, the model runner's queue (back-pressure,
cancellation, timeouts, the shutdown interrupt), how OpenAI chat messages become one image, the turns and the
question, the request limits (stop strings, max_tokens, schemas, nesting, charsets), the Host / Origin /
Content-Type checks, 405 and HEAD, and the request log's settings (the app around a stand-in model: every request
there is answered before any model work)."""

from __future__ import annotations

import json
import threading
import time
from typing import Iterator

import pytest


def test_stop_scanner_cuts_at_the_first_stop_across_pieces():
    from facellm_edge.serve.answering import StopScanner

    scanner = StopScanner(("\n\n", "END"))
    out = [scanner.feed(p) for p in ("Thirty", " years\n", "\nmore", " text")]
    assert out == ["Thirty", " years", "", ""] and scanner.hit  # "\n" held back until it proved to be a stop
    scanner = StopScanner(("END",))
    assert [scanner.feed(p) for p in ("a E", "N", "x")] == ["a ", "", "ENx"] and not scanner.hit
    assert scanner.feed("EN") == "" and scanner.flush() == "EN"  # the stream ended: what was held is text


def test_runner_bounds_the_queue_cancels_abandoned_streams_and_times_out():
    import asyncio

    from facellm_edge.serve.errors import APIError, Busy
    from facellm_edge.serve.runner import ModelRunner

    produced: list[int] = []
    gate = threading.Event()

    def slow(n: int) -> Iterator[int]:
        for i in range(n):
            gate.wait(5)
            produced.append(i)
            yield i
            time.sleep(0.01)
        return "done"

    async def main() -> None:
        runner = ModelRunner(max_queue=1, timeout_s=5.0)
        first = runner.stream(slow, 1000)
        second = runner.stream(slow, 2)  # waits behind the first
        with pytest.raises(Busy) as busy:
            runner.stream(slow, 2)
        assert busy.value.status == 503 and int(busy.value.headers["Retry-After"]) >= 1
        assert runner.busy == 2 and runner.depth == 1
        gate.set()
        assert [await first.__anext__() for _ in range(3)] == [0, 1, 2]
        await first.aclose()  # the client went away: the worker stops at its next item
        assert [x async for x in second] == [0, 1] and second.result == "done"
        assert len(produced) < 20 and runner.busy == 0
        assert await runner.call(sum, [1, 2]) == 3

        gate.clear()
        impatient = ModelRunner(max_queue=1, timeout_s=0.3)
        running, waiting = impatient.stream(slow, 1), impatient.stream(slow, 1)
        with pytest.raises(APIError) as late:
            await running.__anext__()
        with pytest.raises(Busy):
            await waiting.__anext__()  # never started: 503, dropped from the queue
        assert late.value.status == 504
        gate.set()
        impatient.close()
        runner.close()
        assert impatient.busy == 0

    asyncio.run(main())


def test_a_stream_ends_once_the_model_is_free():
    """The end of a stream (and an error) reaches the client only after the worker closed the iterator (the model's
    generation freed) and let the request go: a client that asks again at once is not refused as busy."""
    import asyncio

    from facellm_edge.serve.runner import ModelRunner

    class SlowToClose:  # an answer whose close() (the generation's cleanup) takes a while
        def __init__(self) -> None:
            self.closed, self.n = threading.Event(), 0

        def __iter__(self):
            return self

        def __next__(self) -> int:
            if self.n:
                raise StopIteration("done")
            self.n += 1
            return 1

        def close(self) -> None:
            time.sleep(0.3)
            self.closed.set()

    async def main() -> None:
        runner = ModelRunner(max_queue=0, timeout_s=5.0)
        answer = SlowToClose()
        stream = runner.stream(lambda: answer)
        assert [x async for x in stream] == [1] and stream.result == "done"
        assert answer.closed.is_set() and runner.busy == 0
        again = SlowToClose()
        assert [x async for x in runner.stream(lambda: again)] == [1]  # admitted: max_queue 0, nothing running
        runner.close()

    asyncio.run(main())


def test_chat_messages_make_one_image_the_turns_and_the_question(astronaut_bgr, png, data_url):
    from facellm_edge.serve.errors import APIError
    from facellm_edge.serve.openai_schema import ChatRequest, conversation

    url = data_url(astronaut_bgr)
    image = {"type": "image_url", "image_url": {"url": url}}
    req = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [image]}, {"role": "user", "content": "How old?"},  # merged into one turn
        {"role": "assistant", "content": "Thirty."},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "the mood?"}, image]}]})
    conv = conversation(req)
    assert conv.turns == (("How old?", "Thirty."),) and conv.question == "And\nthe mood?"
    assert conv.image.sha256 == __import__("hashlib").sha256(png(astronaut_bgr)).hexdigest()
    with pytest.raises(APIError, match="start and end with a user message"):
        conversation(ChatRequest.model_validate({"model": "m", "messages": [
            {"role": "assistant", "content": "Hi"}, {"role": "user", "content": [image]}]}))


# -- audit fixes that need no model: a fake one whose routes refuse the request before any model work ------------


def test_stop_scanner_work_is_bounded_by_the_stop_not_the_answer():
    from facellm_edge.serve.answering import StopScanner

    scanner = StopScanner(("x" * 100_000,))  # above the API's limit (a 400 there): the scanner itself stays cheap
    t0 = time.perf_counter()
    out = "".join(scanner.feed("ab ") for _ in range(300))
    assert out == "ab " * 300 and time.perf_counter() - t0 < 1.0  # the old scan copied each prefix every piece
    scanner = StopScanner(("abcab", "zz"))  # only the end that can still start a stop is held back
    assert scanner.feed("xxabca") == "xx" and scanner.feed("b") == "" and scanner.hit
    scanner = StopScanner(("abcab",))
    assert scanner.feed("abcabc") == "" and scanner.hit  # found inside the text
    scanner = StopScanner(("aab",))
    assert scanner.feed("caaa") == "ca" and scanner.feed("c") == "aac" and not scanner.hit


def _chat(**extra) -> dict:
    return {"model": "facellm-edge", "messages": [{"role": "user", "content": "Age?"}], **extra}


def test_chat_request_limits_stops_tokens_schemas_and_faces():
    from facellm_edge.llm.sampling import GenerationConfig
    from facellm_edge.serve.errors import APIError
    from facellm_edge.serve.openai_schema import MAX_SCHEMA_CHARS, MAX_STOP_CHARS, ChatRequest, generation_for

    assert ChatRequest.model_validate(_chat(stop="x" * MAX_STOP_CHARS)).stops() == ("x" * MAX_STOP_CHARS,)
    with pytest.raises(APIError, match=f"at most {MAX_STOP_CHARS} characters") as long_stop:
        ChatRequest.model_validate(_chat(stop=["\n", "x" * (MAX_STOP_CHARS + 1)])).stops()
    assert long_stop.value.status == 400 and long_stop.value.param == "stop"
    gen = generation_for(ChatRequest.model_validate(_chat(max_tokens=512)), GenerationConfig(), 0, 512)
    assert gen.max_tokens == 512
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(APIError, match="above the model's context of 512 tokens") as big:
            generation_for(ChatRequest.model_validate(_chat(**{field: 10**30})), GenerationConfig(), 0, 512)
        assert big.value.status == 400
    schema = {"type": "object", "properties": {f"p{i}": {"enum": ["a", "b"]} for i in range(MAX_SCHEMA_CHARS // 10)}}
    req = ChatRequest.model_validate(_chat(response_format={"type": "json_schema", "json_schema": {"schema": schema}}))
    t0 = time.perf_counter()
    with pytest.raises(APIError, match=f"limit of {MAX_SCHEMA_CHARS} characters"):
        generation_for(req, GenerationConfig(), 0, 512)
    assert time.perf_counter() - t0 < 1.0  # refused before its grammar is built
    with pytest.raises(APIError, match="face must be") as face:
        ChatRequest.model_validate(_chat(face=True)).face_choice()  # not face 1
    assert face.value.status == 400 and face.value.code == "invalid_face"
    assert ChatRequest.model_validate(_chat(face=1)).face_choice() == 1


def test_json_bodies_nested_too_deeply_and_unknown_form_charsets_are_400s():
    from facellm_edge.serve.errors import APIError
    from facellm_edge.serve.images import parse_multipart
    from facellm_edge.serve.state import load_json

    with pytest.raises(APIError, match="nested too deeply") as deep:
        load_json(b"[" * 100_000 + b"]" * 100_000)
    assert deep.value.status == 400 and deep.value.code == "invalid_json"
    body = (b"--B\r\nContent-Disposition: form-data; name=\"question\"\r\nContent-Type: text/plain; charset=bogus\r\n"
            b"\r\nAge?\r\n--B--\r\n")
    with pytest.raises(APIError, match="unknown charset 'bogus'") as charset:
        parse_multipart(body, "multipart/form-data; boundary=B")
    assert charset.value.status == 400
    assert parse_multipart(body.replace(b"bogus", b"latin-1"), "multipart/form-data; boundary=B") == {"question": "Age?"}


def test_runner_interrupt_ends_open_streams_with_the_error_at_once():
    """The end of the shutdown grace: a stream gets the error as its next item even while the worker is busy (its
    generation stops at its next piece), so the client still gets an error event and [DONE]."""
    import asyncio

    from facellm_edge.serve.errors import Busy
    from facellm_edge.serve.runner import ModelRunner

    gate, stopped = threading.Event(), threading.Event()

    def stuck() -> Iterator[int]:
        try:
            yield 1
            gate.wait(10)  # a long prefill: no piece for a while
            yield 2
        finally:
            stopped.set()

    async def main() -> None:
        runner = ModelRunner(max_queue=1, timeout_s=30.0)
        running, waiting = runner.stream(stuck), runner.stream(stuck)
        assert await running.__anext__() == 1
        t0 = time.monotonic()
        runner.interrupt(Busy("the server is shutting down", 1, code="shutting_down"))
        for stream in (running, waiting):
            with pytest.raises(Busy) as err:
                await stream.__anext__()
            assert err.value.code == "shutting_down"
        assert time.monotonic() - t0 < 2.0
        gate.set()
        await asyncio.to_thread(stopped.wait, 5)
        assert stopped.is_set()  # the worker stopped at its next piece
        runner.close()

    asyncio.run(main())


def test_log_requests_works_without_verbose_and_never_logs_raw_query_strings():
    import logging

    from facellm_edge.serve.app import STARTUP_LOG, log_levels, uvicorn_config
    from facellm_edge.serve.config import ServeConfig

    serve = logging.getLogger("facellm_edge.serve")
    saved = {name: logging.getLogger(name).level for name in ("facellm_edge.serve", STARTUP_LOG)}
    try:
        for name in saved:
            logging.getLogger(name).setLevel(logging.WARNING)  # as the CLI's root logger is without -v
        log_levels(ServeConfig())
        assert logging.getLogger(STARTUP_LOG).isEnabledFor(logging.INFO) and not serve.isEnabledFor(logging.INFO)
        log_levels(ServeConfig(log_requests=True))
        assert logging.getLogger("facellm_edge.serve.guards").isEnabledFor(logging.INFO)
        serve.setLevel(logging.DEBUG)
        log_levels(ServeConfig(log_requests=True))
        assert serve.level == logging.DEBUG  # --debug stays
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
    assert uvicorn_config(object(), ServeConfig(log_requests=True)).access_log is False


def test_serve_config_checks_allowed_hosts():
    from facellm_edge.errors import UsageError
    from facellm_edge.serve.config import ServeConfig
    from facellm_edge.serve.trust import trusted_hosts

    for bad in ("", "http://kiosk", "two words", "user@kiosk"):
        with pytest.raises(UsageError, match="allowed host"):
            ServeConfig(allowed_hosts=(bad,))
    assert trusted_hosts(ServeConfig()) == {"localhost", "127.0.0.1", "::1"}
    assert trusted_hosts(ServeConfig(host="10.0.0.5", api_key="k", allowed_hosts=("Kiosk.lan",))) == \
        {"localhost", "127.0.0.1", "::1", "10.0.0.5", "kiosk.lan"}
    assert trusted_hosts(ServeConfig(host="0.0.0.0", api_key="k")) is None  # any, unless hosts are named
    assert trusted_hosts(ServeConfig(host="::", api_key="k", allowed_hosts=("kiosk",))) == \
        {"localhost", "127.0.0.1", "::1", "kiosk"}


@pytest.fixture()
def fake_app():
    """``fake_app(**serve_config)``: the real app around a stand-in model; every request below is refused before
    any model work."""
    from types import SimpleNamespace

    from facellm_edge.runtime.config import RuntimeConfig
    from facellm_edge.serve.app import create_app
    from facellm_edge.serve.config import ServeConfig

    model = SimpleNamespace(config=RuntimeConfig(), generator=SimpleNamespace(max_slots=4, n_ctx=512))
    return lambda **config: create_app(model, ServeConfig(**config))


def _refused(r, status: int, code: str | None) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_host_origin_and_content_type_checks(fake_app):
    """DNS rebinding (a foreign Host) and cross-site pages (a foreign Origin, a body not declared as JSON) cannot
    reach a server on loopback."""
    from fastapi.testclient import TestClient

    with TestClient(fake_app(), base_url="http://127.0.0.1:8080") as c:
        assert c.get("/health").status_code == 200
        for host in ("localhost:8080", "[::1]:8080", "LOCALHOST", "127.0.0.1"):
            assert c.get("/health", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example:8080", "evil.example", "127.0.0.1.evil.example", ""):
            _refused(c.get("/v1/models", headers={"Host": host}), 400, "untrusted_host")
        refused = c.post("/v1/chat/completions", json=_chat(), headers={"Host": "evil.example"})
        _refused(refused, 400, "untrusted_host")
        # a page of another site: refused when it writes, whatever its body; the server's own page is fine
        _refused(c.post("/v1/chat/completions", content=json.dumps(_chat()), headers={
            "Origin": "http://evil.example", "Content-Type": "text/plain"}), 403, "foreign_origin")
        _refused(c.delete("/v1/faces/abc", headers={"Origin": "null"}), 403, "foreign_origin")
        _refused(c.post("/v1/faces", files={"image": ("a.png", b"x")}, headers={"Origin": "http://evil.example"}),
                 403, "foreign_origin")
        own = c.delete("/v1/faces/abc", headers={"Origin": "http://127.0.0.1:8080"})
        _refused(own, 404, "session_not_found")  # past the check
        assert c.get("/v1/models", headers={"Origin": "http://evil.example"}).status_code == 200  # reads: CORS's
        # JSON bodies must say so (a cross-site page can only send text/plain, forms, ... without a preflight)
        for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"Content-Type": ctype} if ctype else {}
            _refused(c.post("/v1/chat/completions", content=json.dumps(_chat()), headers=headers), 415,
                     "unsupported_media_type")
            _refused(c.post("/v1/faces", content=b'{"question": "Age?"}', headers=headers), 415,
                     "unsupported_media_type")
            _refused(c.post("/v1/faces/abc/messages", content=b'{"question": "Age?"}', headers=headers), 415,
                     "unsupported_media_type")
    with TestClient(fake_app(host="0.0.0.0", api_key="k", cors_origins=("http://kiosk:3000",)),
                    base_url="http://kiosk.lan:8080", headers={"Authorization": "Bearer k"}) as c:
        assert c.get("/v1/models", headers={"Host": "anything:1"}).status_code == 200  # wildcard: any host
        assert c.delete("/v1/faces/abc", headers={"Origin": "http://kiosk:3000"}).status_code == 404  # a CORS origin
        _refused(c.delete("/v1/faces/abc", headers={"Origin": "http://evil:3000"}), 403, "foreign_origin")
    with TestClient(fake_app(allowed_hosts=("kiosk.lan",)), base_url="http://kiosk.lan:8080") as c:
        assert c.get("/health").status_code == 200  # --allowed-host


def test_bad_bodies_get_400s_before_the_model(fake_app, astronaut_bgr, png):
    import base64

    from fastapi.testclient import TestClient

    image = base64.b64encode(png(astronaut_bgr)).decode()
    with TestClient(fake_app(), base_url="http://127.0.0.1:8080") as c:
        deep = b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        _refused(c.post("/v1/chat/completions", content=deep, headers={"Content-Type": "application/json"}), 400,
                 "invalid_json")
        form = c.post("/v1/faces", files={"image": ("a.png", png(astronaut_bgr), "image/png"),
                                          "question": (None, b"Age?", "text/plain; charset=bogus-charset")})
        _refused(form, 400, "invalid_request")
        for extra, code in (({"max_tokens": 10**30}, "invalid_request"), ({"max_tokens": 1e20}, "invalid_request"),
                            ({"temperature": 50}, "invalid_request"), ({"face": True}, "invalid_face")):
            _refused(c.post("/v1/faces", json={"image": image, "question": "Age?", **extra}), 400, code)
        _refused(c.post("/v1/faces/abc/messages", json={"question": "Age?", "max_tokens": 513}), 400,
                 "invalid_request")
        url = "data:image/png;base64," + image
        big = {"type": "object", "properties": {f"p{i}": {"enum": ["a"]} for i in range(5_000)}}  # ~110 000 chars
        body = {**_chat(response_format={"type": "json_schema", "json_schema": {"schema": big}}),
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Age?"},
                                                          {"type": "image_url", "image_url": {"url": url}}]}]}
        _refused(c.post("/v1/chat/completions", json=body), 400, "invalid_request")
        _refused(c.post("/v1/chat/completions", json={**body, "response_format": None, "stop": "x" * 1_000_000}),
                 400, "invalid_request")


def test_405_names_the_allowed_methods_and_head_works(fake_app):
    from fastapi.testclient import TestClient

    with TestClient(fake_app(), base_url="http://127.0.0.1:8080") as c:
        for path in ("/health", "/", "/metrics"):
            r = c.head(path)
            assert r.status_code == 200 and r.content == b"", path
        r = c.delete("/health")
        _refused(r, 405, None)
        assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
        assert c.get("/v1/chat/completions").headers["allow"] == "POST"
