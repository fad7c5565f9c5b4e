"""``facellm-edge serve``'s native face API and how it is operated: sessions (follow-ups, delete, TTL, LRU), junk
input (never a 500), body limits, back-pressure (503 + Retry-After), timeouts, a client that disconnects
mid-stream, API key, CORS, /health and /metrics, and the CLI (SIGTERM -> exit 0). Real uvicorn on 127.0.0.1 with
the tiny bundle (real YuNet, ONNX Runtime, llama.cpp); FastAPI's TestClient where a socket adds nothing."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from facellm_edge.errors import UsageError
from facellm_edge.serve.app import create_app
from facellm_edge.serve.config import ServeConfig

QUESTION = "How old is this person?"
MAX_TOKENS = 3
LOCAL = "http://127.0.0.1:8080"  # TestClient's own host, testserver, is not one the server answers to


@pytest.fixture()
def served(serving):
    """``with served(model, **serve_config) as (base URL, server state):`` a real uvicorn server for ``model``."""
    @contextmanager
    def run(model, **config) -> Iterator[tuple[str, object]]:
        app = create_app(model, ServeConfig(**config))
        with serving(app) as url:
            yield url, app.state.serve

    return run


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "\n" not in body["error"]["message"]
    return body["error"]


# -- native face API ------------------------------------------------------------------------------------------


@pytest.mark.slow  # tiny_bundle
def test_faces_api_answers_follow_ups_and_deletes(live_model, astronaut_bgr, png, data_url):
    expected = live_model.ask(astronaut_bgr, QUESTION)
    with TestClient(create_app(live_model, ServeConfig()), base_url=LOCAL) as c:
        r = c.post("/v1/faces", files={"image": ("me.png", png(astronaut_bgr), "image/png")},
                   data={"question": QUESTION})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["question"] == QUESTION and body["no_face"] is False
        (face,) = body["faces"]
        ref = expected[0].to_dict()  # ask --json's record, key for key
        assert set(face) == set(ref)
        assert face["box"] == ref["box"] and face["landmarks"] == ref["landmarks"]
        assert face["answer"] == ref["answer"] and face["n_tokens"] == MAX_TOKENS  # greedy: the same answer
        assert {"detect", "encode", "image_prefill", "ttft", "decode"} <= set(face["timings_ms"])
        sid = face["session"]

        follow = expected[0].session.ask("And the mood?")  # the same follow-up in process
        r = c.post(f"/v1/faces/{sid}/messages", json={"question": "And the mood?"})
        assert r.status_code == 200, r.text
        (again,) = r.json()["faces"]
        assert again["session"] == sid and again["answer"] == follow.text
        assert "encode" not in again["timings_ms"] and "image_prefill" not in again["timings_ms"]  # warm

        r = c.post("/v1/faces", json={"image": base64.b64encode(png(astronaut_bgr)).decode(), "question": QUESTION,
                                      "face": "largest", "max_tokens": 1})
        assert r.status_code == 200 and r.json()["faces"][0]["n_tokens"] == 1

        assert c.delete(f"/v1/faces/{sid}").json() == {"id": sid, "object": "face.session", "deleted": True}
        err = _error(c.post(f"/v1/faces/{sid}/messages", json={"question": "Hello?"}), 404)
        assert "was deleted" in err["message"] and err["code"] == "session_expired"
        _error(c.delete(f"/v1/faces/{sid}"), 404)
        err = _error(c.post("/v1/faces/nope/messages", json={"question": "Hello?"}), 404)
        assert err["code"] == "session_not_found"

        blank = np.full((240, 320, 3), 127, np.uint8)
        r = c.post("/v1/faces", json={"image": data_url(blank), "question": QUESTION})
        assert r.status_code == 200 and r.json() == {"question": QUESTION, "faces": [], "no_face": True}


@pytest.mark.slow  # tiny_bundle
def test_sessions_expire_by_ttl_and_lru_with_a_clear_404(live_model, astronaut_bgr, png):
    photo = base64.b64encode(png(astronaut_bgr)).decode()
    with TestClient(create_app(live_model, ServeConfig(session_ttl_s=1.0, max_sessions=1)), base_url=LOCAL) as c:
        first = c.post("/v1/faces", json={"image": photo, "question": QUESTION, "max_tokens": 1}).json()
        second = c.post("/v1/faces", json={"image": photo, "question": QUESTION, "max_tokens": 1}).json()
        old, new = first["faces"][0]["session"], second["faces"][0]["session"]
        err = _error(c.post(f"/v1/faces/{old}/messages", json={"question": "Hi?"}), 404)
        assert "more than 1 sessions were open" in err["message"]  # LRU
        assert c.post(f"/v1/faces/{new}/messages", json={"question": "Hi?", "max_tokens": 1}).status_code == 200
        time.sleep(1.3)
        err = _error(c.post(f"/v1/faces/{new}/messages", json={"question": "Hi?"}), 404)
        assert "expired after 1 s without use" in err["message"]
        state = c.app.state.serve
        deadline = time.monotonic() + 5
        while live_model.generator.has(new) and time.monotonic() < deadline:  # the closer freed its cells
            time.sleep(0.05)
        assert not live_model.generator.has(new) and len(state.store) == 0


# -- junk never makes a 500 -----------------------------------------------------------------------------------

PNG_1PX = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg==")


def _chat(content, **extra) -> dict:
    return {"model": "facellm-edge", "messages": [{"role": "user", "content": content}], **extra}


def _img(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.mark.slow  # tiny_bundle
def test_junk_input_gets_a_4xx_in_openai_error_shape(live_model, astronaut_bgr, data_url):
    good = data_url(astronaut_bgr)
    png = cv2.imencode(".png", astronaut_bgr)[1].tobytes()
    truncated = "data:image/png;base64," + base64.b64encode(png[: len(png) // 3]).decode()
    text = {"type": "text", "text": QUESTION}
    cases = [
        ("invalid JSON", b"{junk", 400, "invalid_json"),
        ("a JSON array", [1, 2], 400, "invalid_json"),
        ("missing fields", {}, 400, "invalid_request"),
        ("messages not a list", {"model": "facellm-edge", "messages": "hi"}, 400, "invalid_request"),
        ("content a number", _chat(5), 400, "invalid_request"),
        ("model a number", {**_chat([text, _img(good)]), "model": 5}, 400, "invalid_request"),
        ("no image", _chat("Hello?"), 400, "missing_image"),
        ("remote URL", _chat([text, _img("https://example.com/a.jpg")]), 400, "remote_image_url"),
        ("ftp URL", _chat([text, _img("ftp://example.com/a.jpg")]), 400, "invalid_image"),
        ("not an image", _chat([text, _img("data:image/png;base64," + base64.b64encode(b"hello" * 50).decode())]),
         400, "invalid_image"),
        ("bad base64", _chat([text, _img("data:image/png;base64,@@@@")]), 400, "invalid_image"),
        ("empty data URL", _chat([text, _img("data:image/png;base64,")]), 400, "invalid_image"),
        ("text data URL", _chat([text, _img("data:text/plain;base64,aGVsbG8=")]), 400, "invalid_image"),
        ("truncated PNG", _chat([text, _img(truncated)]), 400, "invalid_image"),
        ("two images", _chat([text, _img(good), _img("data:image/png;base64," +
                                                     base64.b64encode(PNG_1PX).decode())]), 400, "too_many_images"),
        ("empty question", _chat([_img(good)]), 400, "invalid_request"),
        ("unknown part", _chat([{"type": "input_audio"}, _img(good)]), 400, "unsupported_parameter"),
        ("bad face", _chat([text, _img(good)], face="bogus"), 400, "invalid_face"),
        ("face out of range", _chat([text, _img(good)], face=7), 400, "invalid_face"),
        ("max_tokens 0", _chat([text, _img(good)], max_tokens=0), 400, "invalid_request"),
        ("negative temperature", _chat([text, _img(good)], temperature=-1), 400, "invalid_request"),
        ("top_p 0", _chat([text, _img(good)], top_p=0), 400, "invalid_request"),
        ("n 2", _chat([text, _img(good)], n=2), 400, "unsupported_parameter"),
        ("logprobs", _chat([text, _img(good)], logprobs=True), 400, "unsupported_parameter"),
        ("five stops", _chat([text, _img(good)], stop=["a", "b", "c", "d", "e"]), 400, "invalid_request"),
        ("seed with sampling", _chat([text, _img(good)], seed=123, temperature=0.7), 400, "unsupported_parameter"),
        ("schema missing", _chat([text, _img(good)], response_format={"type": "json_schema", "json_schema": {}}),
         400, "invalid_request"),
        ("schema broken", _chat([text, _img(good)], response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 3}}}),
         400, "invalid_request"),
        ("assistant image", {"model": "facellm-edge", "messages": [
            {"role": "user", "content": [text, _img(good)]}, {"role": "assistant", "content": [_img(good)]},
            {"role": "user", "content": "and?"}]}, 400, "invalid_request"),
        ("ends with assistant", {"model": "facellm-edge", "messages": [
            {"role": "user", "content": [text, _img(good)]}, {"role": "assistant", "content": "x"}]},
         400, "invalid_request"),
        ("unknown model", {**_chat([text, _img(good)]), "model": "gpt-4o"}, 404, "not_found"),
        ("longer than the context", _chat([{"type": "text", "text": "age " * 5000}, _img(good)]), 400,
         "context_length_exceeded"),
    ]
    with TestClient(create_app(live_model, ServeConfig()), base_url=LOCAL, raise_server_exceptions=False) as c:
        for name, body, status, code in cases:
            r = c.post("/v1/chat/completions", content=body if isinstance(body, bytes) else json.dumps(body),
                       headers={"content-type": "application/json"})
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), (name, r.text)
            _error(r, status)
        native = [
            ({"question": QUESTION}, "invalid_request"),  # no image
            ({"image": "@@@", "question": QUESTION}, "invalid_image"),
            ({"image": base64.b64encode(b"not an image").decode(), "question": QUESTION}, "invalid_image"),
            ({"image": base64.b64encode(PNG_1PX).decode(), "question": 5}, "invalid_request"),
            ({"image": base64.b64encode(PNG_1PX).decode(), "question": QUESTION, "colour": 1}, "invalid_request"),
        ]
        for body, code in native:
            assert _error(c.post("/v1/faces", json=body), 400)["code"] == code, body
        form = c.post("/v1/faces", data={"question": QUESTION}, files={"note": ("a.txt", b"x", "text/plain")})
        assert _error(form, 400)["code"] == "missing_image"  # a form without the image file
        r = c.post("/v1/faces", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
        _error(r, 400)
        _error(c.get("/v1/chat/completions"), 405)
        _error(c.get("/v1/nothing"), 404)
        assert c.get("/v1/models/gpt-4o").status_code == 404


@pytest.mark.slow  # tiny_bundle
def test_body_limits_from_content_length_and_from_the_bytes_sent(live_model, served):
    with served(live_model, max_body_bytes=100_000) as (url, _):
        big = json.dumps(_chat([_img("data:image/png;base64," + "A" * 200_000)])).encode()
        err = _error(httpx.post(f"{url}/v1/chat/completions", content=big,
                                headers={"content-type": "application/json"}), 413)
        assert "100000 bytes" in err["message"] and err["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer, counted as it arrives
            for _ in range(30):
                yield b" " * 10_000

        _error(httpx.post(f"{url}/v1/faces", content=chunks(), headers={"content-type": "application/json"}), 413)
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:  # a bogus Content-Length
            s.sendall(b"POST /v1/faces HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99999999999\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 413")


# -- operating it: back-pressure, timeouts, disconnects ---------------------------------------------------------


@pytest.mark.slow  # tiny_bundle
def test_full_queue_answers_503_with_retry_after_and_waiting_requests_time_out(live_model, astronaut_bgr, png, served,
                                                                               model_held, wait_until):
    body = {"image": base64.b64encode(png(astronaut_bgr)).decode(), "question": QUESTION, "max_tokens": 1}
    with served(live_model, max_queue=0) as (url, state):
        results: list[httpx.Response] = []
        with model_held(live_model, astronaut_bgr):
            first = threading.Thread(target=lambda: results.append(httpx.post(f"{url}/v1/faces", json=body,
                                                                               timeout=30)))
            first.start()
            wait_until(lambda: state.runner.busy == 1)  # admitted, waiting for the model in the worker
            busy = httpx.post(f"{url}/v1/faces", json=body)
            err = _error(busy, 503)
            assert int(busy.headers["retry-after"]) >= 1 and err["code"] == "server_busy"
            assert 'facellm_http_requests_total{route="/v1/faces",status="503"} 1.0' in httpx.get(f"{url}/metrics").text
        first.join(30)
        assert results[0].status_code == 200  # served once the model was free
    with served(live_model, max_queue=1, request_timeout_s=1.0) as (url, state):
        with model_held(live_model, astronaut_bgr):
            out: dict[str, httpx.Response] = {}
            running = threading.Thread(target=lambda: out.update(a=httpx.post(f"{url}/v1/faces", json=body)))
            running.start()
            wait_until(lambda: state.runner.busy == 1)
            waiting = httpx.post(f"{url}/v1/faces", json=body, timeout=30)  # queued behind it, never started
            running.join(30)
            assert "waited 1 s for the model" in _error(waiting, 503)["message"]
            assert "took longer than the request timeout" in _error(out["a"], 504)["message"]
        wait_until(lambda: state.runner.busy == 0)  # the cancelled answer let the model go at its first token


@pytest.mark.slow  # tiny_bundle
def test_client_disconnect_mid_stream_cancels_the_generation(live_model, astronaut_bgr, data_url, served, wait_until):
    body = _chat([{"type": "text", "text": QUESTION}, _img(data_url(astronaut_bgr))], stream=True, max_tokens=2000)
    with served(live_model) as (url, state):
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            opened = json.loads(next(line for line in lines if line.startswith("data:"))[5:])
            sid = opened["choices"][0]["face"]["session"]
            assert next(line for line in lines if line.startswith("data:"))  # the first token has come
        wait_until(lambda: state.runner.busy == 0, timeout=60)
        entry = state.store.acquire(sid)
        state.store.release(entry)
        session = entry.session
        # cancelled, not finished (counted, not timed): the 2000-token answer never completed (one that ends, at its
        # length or at a full context, is a turn); the session is still usable
        assert session.turns == 0 and session.cached
        r = httpx.post(f"{url}/v1/faces/{sid}/messages", json={"question": "Hi?", "max_tokens": 1}, timeout=30)
        assert r.status_code == 200


# -- security, health, metrics --------------------------------------------------------------------------------


@pytest.mark.slow  # tiny_bundle
def test_api_key_cors_health_and_metrics(live_model):
    config = ServeConfig(api_key="s3cret", cors_origins=("http://kiosk:3000",))
    with TestClient(create_app(live_model, config), base_url=LOCAL) as c:
        assert c.get("/health").json()["status"] == "ok"  # open: for supervisors and load balancers
        err = _error(c.get("/v1/models"), 401)
        assert "missing API key" in err["message"]
        r = c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert _error(r, 401)["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).json()["data"][0]["id"] == \
            "facellm-edge"
        assert c.get("/v1/models?api_key=s3cret").status_code == 200  # EventSource / <img> cannot send headers
        _error(c.get("/metrics"), 401)
        metrics = c.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        assert metrics.headers["content-type"].startswith("text/plain")
        assert 'facellm_http_requests_total{route="/v1/models",status="401"} 2.0' in metrics.text
        assert "facellm_queue_depth 0.0" in metrics.text and "facellm_live_fps" in metrics.text
        pre = c.options("/v1/models", headers={"Origin": "http://kiosk:3000", "Access-Control-Request-Method": "GET"})
        assert pre.headers["access-control-allow-origin"] == "http://kiosk:3000"
        other = c.get("/health", headers={"Origin": "http://evil:1"})
        assert "access-control-allow-origin" not in other.headers
    with TestClient(create_app(live_model, ServeConfig()), base_url=LOCAL) as c:  # CORS off by default
        r = c.get("/v1/models", headers={"Origin": "http://kiosk:3000"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert c.app.state.serve.ready is False  # the lifespan ended: /health would say 503


def test_serve_config_refuses_an_open_host_without_a_key():
    with pytest.raises(UsageError, match="--api-key"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", api_key="k").api_key == "k"
    assert ServeConfig(host="0.0.0.0", insecure=True).insecure
    assert ServeConfig(host="::1").host == "::1"  # loopback
    with pytest.raises(UsageError, match="spaces"):
        ServeConfig(api_key="two words")


# -- the command line -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # tiny_bundle, a server process
def test_cli_serves_until_sigterm_then_exits_0(tiny_bundle, yunet_model, astronaut_bgr, png, data_url):
    """The URL is logged without -v; SIGTERM ends an open stream with an error event and [DONE] when the grace
    ends (not a cut connection), then exits 0."""
    exe = Path(sys.executable).with_name("facellm-edge")
    bad = subprocess.run([str(exe), "serve", "--host", "0.0.0.0", "--bundle", str(tiny_bundle)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--api-key" in bad.stderr
    port = _free_port()
    proc = subprocess.Popen([str(exe), "serve", "--bundle", str(tiny_bundle), "--port", str(port), "--max-tokens",
                             "2", "--detector-model", str(yunet_model), "--quant", "f32", "--shutdown-grace", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FACELLM_EDGE_API_KEY": "k"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/faces", headers={"Authorization": "Bearer k"}, timeout=60,
                       json={"image": base64.b64encode(png(astronaut_bgr)).decode(), "question": QUESTION})
        assert r.status_code == 200 and r.json()["faces"][0]["n_tokens"] == 2
        body = _chat([{"type": "text", "text": QUESTION}, _img(data_url(astronaut_bgr))], stream=True,
                     max_tokens=4096)  # the whole context: still running when the grace ends
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"},
                          timeout=30) as stream:
            lines = (line for line in stream.iter_lines() if line.startswith("data:"))
            assert '"content": ""' in next(lines) and next(lines)  # the role chunk, then the first token
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][5:])["error"]["code"] == "shutting_down"
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert f"serving facellm-edge on {url}" in err  # where it listens, without -v
        assert QUESTION not in err and "astronaut" not in err  # nothing about the request is logged by default
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
