"""``facellm-edge serve`` under load (issue 12, Tests: Load): a real uvicorn server on 127.0.0.1 with the tiny bundle,
a live source running (the photos' video, looped at camera pace) and a queue of 2. Sixteen concurrent clients send
two chat completions each (one plain, one streamed): every request gets a 200 with an answer or a 503 with
``Retry-After``, nothing else and nothing hangs (every call has a timeout); the frame loop keeps taking frames (even
while the model is held); the process's RSS stays within a bound; a client that leaves mid-stream frees its place
in the queue. Counted, not timed: the 503s come from a wave sent while the model is busy elsewhere."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from facellm_edge.bench.live import video_frames
from facellm_edge.bench.live import PacedClip
from facellm_edge.bench.stages import RssSampler, rss_mb

pytestmark = pytest.mark.slow  # tiny_bundle, a server, the live loop

QUESTION = "How old is this person?"
MAX_TOKENS = 3  # the live loop's answers (conftest's live_model)
CLIENTS, QUEUE = 16, 2
RSS_GROWTH_MB = 300  # generous: the load keeps at most 1 + QUEUE requests' images and answers in flight
TIMEOUT_S = 60.0


@pytest.fixture()
def looped_video(photo_video):
    """The photos' clip (astronaut, then the six faces of t1) as a camera at 25 FPS, looped: people keep coming."""
    frames = video_frames(str(photo_video), 12)
    return PacedClip(lambda i: frames[i % len(frames)], 25.0, "the photos' video, looped")


def _chat(image_url: str, stream: bool, max_tokens: int = 2) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": QUESTION}]
    return {"model": "facellm-edge", "stream": stream, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}]}


def _ask(client: httpx.Client, body: dict) -> tuple[int, str]:
    """(status, the answer's text or the error's code) of one chat completion; a 503 must say when to come back."""
    if body["stream"]:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
            else:
                data = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
                assert data[-1] == "[DONE]", data[-1]
                chunks = [json.loads(d) for d in data[:-1]]
                assert all("error" not in c for c in chunks), chunks
                return 200, "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    else:
        r = client.post("/v1/chat/completions", json=body)
        if r.status_code == 200:
            return 200, r.json()["choices"][0]["message"]["content"]
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "server_busy"
    return 503, r.json()["error"]["code"]


def test_sixteen_clients_get_an_answer_or_a_503_while_the_frame_loop_runs(
        live_model, looped_video, astronaut_bgr, data_url, live_app, serving, model_held, wait_until):
    app, live = live_app(live_model, looped_video, question=QUESTION, max_queue=QUEUE, request_timeout_s=TIMEOUT_S)
    state = app.state.serve
    url = data_url(astronaut_bgr)
    replies: list[list[tuple[int, str]]] = [[] for _ in range(CLIENTS)]
    start, second_wave = threading.Barrier(CLIENTS + 1), threading.Event()

    def client(i: int) -> None:
        with httpx.Client(base_url=base, timeout=TIMEOUT_S) as c:
            start.wait(TIMEOUT_S)
            replies[i].append(_ask(c, _chat(url, stream=i % 2 == 0)))
            second_wave.wait(TIMEOUT_S)
            replies[i].append(_ask(c, _chat(url, stream=i % 2 == 1)))

    with serving(app) as base, httpx.Client(base_url=base, timeout=TIMEOUT_S) as probe:
        frames = lambda: probe.get("/v1/live/status").json()["frames"]  # noqa: E731
        wait_until(lambda: frames() > 0, timeout=TIMEOUT_S)
        assert _ask(probe, _chat(url, stream=False))[0] == 200  # warm: first-call allocations are not load
        rss_before, frames_before = rss_mb(), frames()
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
        with RssSampler() as rss:
            for t in threads:
                t.start()
            with model_held(live_model, astronaut_bgr):  # busy elsewhere (as with a live answer): the queue fills
                start.wait(TIMEOUT_S)
                first = lambda: [r[0][0] for r in replies if r]  # noqa: E731
                wait_until(lambda: first().count(503) == CLIENTS - 1 - QUEUE, timeout=TIMEOUT_S)
                assert state.runner.busy == 1 + QUEUE and not any(s == 200 for s in first())
                held_at = frames()
                wait_until(lambda: frames() >= held_at + 5, timeout=TIMEOUT_S)  # the loop only needs the detector
                health = probe.get("/health").json()
                assert health["status"] == "ok" and health["queue_depth"] == QUEUE and health["live"] is True
            wait_until(lambda: len(first()) == CLIENTS, timeout=TIMEOUT_S)  # the admitted ones, once it is free
            second_wave.set()  # all at once again, the model free: whoever finds the queue full gets a 503
            for t in threads:
                t.join(2 * TIMEOUT_S)
        assert not any(t.is_alive() for t in threads), "a client hung"
        status = probe.get("/v1/live/status").json()
        metrics = probe.get("/metrics").text

    statuses = [status for r in replies for status, _ in r]
    assert len(statuses) == 2 * CLIENTS and set(statuses) <= {200, 503}
    assert [r[0][0] for r in replies].count(200) == 1 + QUEUE  # the wave sent while the model was held
    assert any(r[1][0] == 200 for r in replies)  # the second wave: at least the first one admitted
    assert all(text for r in replies for status, text in r if status == 200)  # answers, streamed or not
    assert status["running"] and status["error"] is None and status["frames"] > frames_before + 10
    assert f'facellm_http_requests_total{{route="/v1/chat/completions",status="503"}} ' \
           f'{float(statuses.count(503))}' in metrics
    assert rss.peak_mb - rss_before < RSS_GROWTH_MB, (rss_before, rss.peak_mb)


def test_a_client_that_leaves_mid_stream_frees_its_place_in_the_queue(
        live_model, looped_video, astronaut_bgr, data_url, live_app, serving, wait_until):
    app, live = live_app(live_model, looped_video, question=QUESTION, max_queue=QUEUE, request_timeout_s=TIMEOUT_S)
    state = app.state.serve
    url = data_url(astronaut_bgr)
    waiting: list[tuple[int, str]] = []
    with serving(app) as base, httpx.Client(base_url=base, timeout=TIMEOUT_S) as client:
        with client.stream("POST", "/v1/chat/completions", json=_chat(url, stream=True, max_tokens=2000)) as r:
            events = (json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:"))
            sid = next(events)["choices"][0]["face"]["session"]
            assert next(events)["choices"][0]["delta"]["content"]  # the first token has come: it holds the model
            def wait_in_queue() -> None:
                with httpx.Client(base_url=base, timeout=TIMEOUT_S) as c:
                    waiting.append(_ask(c, _chat(url, stream=False)))

            queued = [threading.Thread(target=wait_in_queue, daemon=True) for _ in range(QUEUE)]
            for t in queued:
                t.start()
            wait_until(lambda: state.runner.busy == 1 + QUEUE, timeout=TIMEOUT_S)
            assert _ask(client, _chat(url, stream=False))[0] == 503  # the queue is full behind the long answer
        # the client has gone: its generation is cancelled and the requests behind it are served
        for t in queued:
            t.join(TIMEOUT_S)
        assert [status for status, _ in waiting] == [200] * QUEUE and all(text for _, text in waiting)
        wait_until(lambda: state.runner.busy == 0, timeout=TIMEOUT_S)
        entry = state.store.acquire(sid)
        state.store.release(entry)
        assert entry.session.turns == 0  # cancelled, not finished: the 2000-token answer never completed
        assert _ask(client, _chat(url, stream=True))[0] == 200  # and a new request is served at once
        assert live.ready  # the frame loop went on throughout
