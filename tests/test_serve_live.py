"""The live endpoints of ``facellm-edge serve``: a real uvicorn server on 127.0.0.1 (a free port, in a thread) with
the tiny bundle; the live source is a video made from the photos, or the browser-camera source fed over HTTP.
The event fan-out and the pushed source are also checked on their own (no model)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Iterator

import cv2
import httpx
import numpy as np
import pytest

from facellm_edge.serve import streams
from facellm_edge.serve.pushed import PushedSource
from facellm_edge.serve.streams import LiveFeed

JSON = {"Content-Type": "application/json"}


def sse(response: httpx.Response) -> Iterator[tuple[int, str, dict]]:
    """(id, event, data) of a text/event-stream response, as they arrive."""
    event_id, kind, data = 0, "message", []
    for line in response.iter_lines():
        if line.startswith("id:"):
            event_id = int(line[3:])
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:])
        elif not line and data:
            yield event_id, kind, json.loads("\n".join(data))
            kind, data = "message", []


def mjpeg_frames(response: httpx.Response, count: int) -> list[np.ndarray]:
    """The first ``count`` JPEG parts of a multipart/x-mixed-replace response, decoded."""
    buf, frames = b"", []
    for chunk in response.iter_bytes():
        buf += chunk
        while len(frames) < count:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                break
            headers = buf[:head_end].decode("latin-1").lower().split("\r\n")
            assert headers[0] == "--frame" and "content-type: image/jpeg" in headers
            length = int(next(h for h in headers if h.startswith("content-length:")).split(":")[1])
            if len(buf) < head_end + 4 + length + 2:
                break
            jpeg = buf[head_end + 4:head_end + 4 + length]
            frames.append(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))
            buf = buf[head_end + 4 + length + 2:]
        if len(frames) >= count:
            return frames
    return frames


# -- no model --------------------------------------------------------------------------------------------------


def test_pushed_source_keeps_the_newest_frame_and_wakes_the_loop():
    source = PushedSource()
    frames = [np.full((4, 4, 3), i, np.uint8) for i in range(3)]
    assert [source.push(f) for f in frames] == [0, 1, 2]
    first = source.take(timeout=0)
    assert first.index == 2 and first.image[0, 0, 0] == 2 and source.dropped == 2  # the newest only
    assert source.take(timeout=0.05) is None  # nothing new

    got: list[int] = []
    reader = threading.Thread(target=lambda: got.extend(f.index for f in source))
    reader.start()  # waits on the condition for the next push
    time.sleep(0.1)
    source.push(frames[0])
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    source.close()  # ends the iteration of a waiting reader
    reader.join(5)
    assert not reader.is_alive() and got == [3]
    with pytest.raises(RuntimeError, match="closed"):
        source.push(frames[0])


def test_feed_replays_missed_events_and_a_slow_client_gets_a_snapshot(monkeypatch):
    monkeypatch.setattr(streams, "CLIENT_QUEUE", 4)

    async def read(stream, n: int) -> list[tuple[str, dict]]:
        out = []
        async for chunk in stream:
            text = chunk.decode()
            if "\nevent: " in text:
                kind = text.split("\nevent: ")[1].split("\n")[0]
                out.append((kind, json.loads(text.split("\ndata: ")[1])))
            if len(out) == n:
                return out
        return out

    async def main() -> None:
        feed = LiveFeed("Age?")
        feed.publish("track_appeared", {"frame": 0, "track_id": 1, "box": [0, 0, 9, 9]})
        feed.publish("token", {"track_id": 1, "question": "Age?", "text": "thir"})
        # a new client: a snapshot with the state so far
        client = feed.stream()
        (kind, snap), = await read(client, 1)
        assert kind == "snapshot" and snap["question"] == "Age?"
        assert snap["tracks"] == [{"track_id": 1, "box": [0, 0, 9, 9], "question": "Age?", "text": "thir",
                                   "done": False}]
        await client.aclose()  # a client that leaves is forgotten
        # a client that reconnects after event 1 gets event 2 and then what comes next
        resumed = feed.stream(last_event_id=1)
        first = await read(resumed, 1)
        assert first == [("token", {"track_id": 1, "question": "Age?", "text": "thir"})]
        # a slow client: far more events than its queue holds, published without waiting for it (publish runs on
        # the loop's own thread here: had it waited for this reader, it would never return); counted, not timed
        for i in range(50):
            feed.publish("token", {"track_id": 1, "question": "Age?", "text": str(i)})
        feed.publish("answer", {"track_id": 1, "question": "Age?", "answer": "thirty", "box": [0, 0, 9, 9]})
        await asyncio.sleep(0.05)  # the fan-out runs on the loop: the queue takes 4, the rest is dropped
        assert [d["text"] for _, d in await read(resumed, 4)] == ["0", "1", "2", "3"] and feed.dropped == 47
        feed.publish("question", {"question": "Mood?"})
        (kind, snap), = await read(resumed, 1)  # it lost events: it gets the current state instead
        assert kind == "snapshot" and snap["question"] == "Mood?"
        assert [(t["text"], t["done"]) for t in snap["tracks"]] == [("thirty", True)]
        feed.publish("track_lost", {"frame": 9, "track_id": 1})
        feed.publish("answer", {"track_id": 1, "question": "Q", "answer": "late", "box": [0, 0, 9, 9]})
        assert feed.tracks() == []  # a late answer does not bring a lost track back
        feed.close()
        assert [k for k, _ in await read(resumed, 99)][-2:] == ["track_lost", "answer"]  # then the stream ends

    asyncio.run(main())


def test_frame_hub_encodes_each_frame_once_and_wakes_waiters():
    from facellm_edge.serve.streams import FrameHub

    hub = FrameHub()
    assert hub.jpeg() is None  # before the first frame

    async def main() -> None:
        assert await hub.wait_newer(0, timeout=0.05) is False  # no frame: times out
        waiting = asyncio.ensure_future(hub.wait_newer(0, timeout=10))
        await asyncio.sleep(0.01)
        threading.Thread(target=hub.put, args=(np.zeros((48, 64, 3), np.uint8),)).start()  # the frame loop
        assert await waiting is True
        first, again = hub.jpeg(), hub.jpeg()
        assert first[0] == 1 and again[1] is first[1]  # one encoding per frame, whoever asks
        hub.put(np.full((48, 64, 3), 255, np.uint8))
        second = hub.jpeg()
        assert second[0] == 2 and second[1] is not first[1]
        assert cv2.imdecode(np.frombuffer(second[1], np.uint8), cv2.IMREAD_GRAYSCALE).min() > 240
        hub.close()
        assert await hub.wait_newer(2, timeout=10) is True  # closed: no waiting
        assert [part async for part in hub.mjpeg()] == []  # a closed hub ends the video stream

    asyncio.run(main())


def test_mjpeg_shows_the_last_frame_of_a_paused_source(monkeypatch):
    """A browser shows an MJPEG part only when the next part's headers arrive: a new viewer gets the newest frame
    twice, and an idle source's newest frame is sent again every MJPEG_REPEAT_S (no new frame is put here)."""
    from facellm_edge.serve import streams

    monkeypatch.setattr(streams, "MJPEG_REPEAT_S", 0.05)
    hub = streams.FrameHub()
    hub.put(np.full((48, 64, 3), 200, np.uint8))

    async def main() -> list[bytes]:
        parts, stream = [], hub.mjpeg()
        async for chunk in stream:
            parts += [b"--frame" + p for p in chunk.split(b"--frame")[1:]]
            if len(parts) >= 3:
                await stream.aclose()
                return parts
        return parts

    parts = asyncio.run(asyncio.wait_for(main(), 10))
    assert len(parts) == 3 and parts[0] == parts[1] == parts[2]  # twice at once, then the idle repeat
    head, _, rest = parts[0].partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[:2] == [b"--frame", b"Content-Type: image/jpeg"] and rest.endswith(b"\r\n")
    image = cv2.imdecode(np.frombuffer(rest[:-2], np.uint8), cv2.IMREAD_GRAYSCALE)
    assert image.shape == (48, 64) and abs(int(image.mean()) - 200) <= 2


# -- a real server ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_video_source_events_frames_and_question(live_model, photo_video, live_app, serving):
    from facellm_edge.runtime.live.sources import open_source

    app, live = live_app(live_model, open_source(str(photo_video)), question="How old is this person?")
    with serving(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        # Last-Event-ID 0: every event since the start, whenever this client connects
        with client.stream("GET", "/v1/live/events", headers={"Last-Event-ID": "0"}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = []
            for event_id, kind, data in sse(r):
                events.append((event_id, kind, data))
                if kind == "status" and not data["running"]:
                    break
        assert [i for i, _, _ in events] == list(range(1, len(events) + 1))  # nothing missed, in order
        kinds = [k for _, k, _ in events]
        assert sorted(d["track_id"] for _, k, d in events if k == "track_appeared") == list(range(1, 8))
        answers = {d["track_id"]: d for _, k, d in events if k == "answer"}
        assert sorted(answers) == list(range(1, 8)) and "tracks" in kinds
        for tid, a in answers.items():
            assert a["question"] == "How old is this person?" and len(a["box"]) == 4 and a["timings_ms"]["ttft"] > 0
            pieces = "".join(d["text"] for _, k, d in events if k == "token" and d["track_id"] == tid)
            assert pieces == a["answer"]  # the streamed tokens add up to the final answer
        assert events[-1][2]["frames"] == 12 and events[-1][2]["dropped_frames"] == 0

        jpg = client.get("/v1/live/frame.jpg")  # the latest annotated frame (the last one of the clip)
        assert jpg.status_code == 200 and jpg.headers["content-type"] == "image/jpeg"
        assert cv2.imdecode(np.frombuffer(jpg.content, np.uint8), cv2.IMREAD_COLOR).shape == (480, 640, 3)
        with client.stream("GET", "/v1/live/video.mjpg") as r:
            assert r.headers["content-type"] == "multipart/x-mixed-replace; boundary=frame"
            (frame,) = mjpeg_frames(r, 1)
        assert frame.shape == (480, 640, 3)

        tracks = client.get("/v1/live/tracks").json()["tracks"]
        assert tracks and all(t["done"] and t["text"] == answers[t["track_id"]]["answer"] for t in tracks)
        bad = client.put("/v1/live/question", json={"question": "  "})
        assert bad.status_code == 400 and "empty" in bad.json()["error"]["message"]
        assert client.put("/v1/live/question", content=b"{nope", headers=JSON).status_code == 400
        deep = client.put("/v1/live/question", content=b"[" * 50_000 + b"]" * 50_000, headers=JSON)
        assert deep.status_code == 400 and deep.json()["error"]["code"] == "invalid_json"
        plain = client.put("/v1/live/question", content=b'{"question": "Hi?"}', headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415  # what a cross-site page could send without a preflight
        assert client.put("/v1/live/question", json={"question": "Mood?"}).json() == {"question": "Mood?"}
        assert client.get("/v1/live/question").json() == {"question": "Mood?"}
        gone = client.post("/v1/live/tracks/2/ask", json={"question": "Hair?"})  # the loop has ended
        assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"
        refused = client.post("/v1/live/frames", content=b"\xff\xd8", headers={"Content-Type": "image/jpeg"})
        assert refused.status_code == 409 and "--source browser" in refused.json()["error"]["message"]
        assert client.get("/v1/live/status").json()["running"] is False
    assert live_model.generator.n_cached == 0  # every track's session closed


@pytest.mark.slow
def test_browser_source_answers_follow_ups_and_updates_metrics(live_model, astronaut_bgr, letterbox, live_app, serving):
    source = PushedSource()
    app, live = live_app(live_model, source, question="Age?", max_body_bytes=200_000)
    jpeg = cv2.imencode(".jpg", letterbox(astronaut_bgr))[1].tobytes()
    stop = threading.Event()

    with serving(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        assert live.ready
        early = client.get("/v1/live/frame.jpg")
        assert early.status_code == 503 and early.headers["retry-after"] == "1"
        bad = client.post("/v1/live/frames", content=b"not a jpeg", headers={"Content-Type": "image/jpeg"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_image"
        big = client.post("/v1/live/frames", content=bytes(300_000), headers={"Content-Type": "image/jpeg"})
        assert big.status_code == 413

        def camera() -> None:  # what the page does: one frame in flight, a modest rate
            with httpx.Client(base_url=base, timeout=30) as cam:
                while not stop.is_set():
                    assert cam.post("/v1/live/frames", content=jpeg).status_code == 202
                    stop.wait(0.05)

        sender = threading.Thread(target=camera, daemon=True)
        sender.start()
        follow_up = None
        try:
            with client.stream("GET", "/v1/live/events") as r:
                for _, kind, data in sse(r):
                    if kind == "answer" and not data["follow_up"]:
                        assert data["track_id"] == 1 and data["question"] == "Age?"
                        ask = client.post("/v1/live/tracks/1/ask", json={"question": "Hair colour?"})
                        assert ask.status_code == 202 and ask.json() == {"track_id": 1, "question": "Hair colour?"}
                        assert client.post("/v1/live/tracks/99/ask", json={"question": "Hi?"}).status_code == 404
                    elif kind == "answer":
                        follow_up = data
                        break
            metrics = client.get("/metrics").text
        finally:
            stop.set()
            sender.join(10)
    assert follow_up["question"] == "Hair colour?" and "image_prefill" not in follow_up["timings_ms"]
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("facellm_live_")}
    assert values["facellm_live_fps"] > 0 and values["facellm_live_tracked_faces"] == 1
    assert source.closed and not live.ready  # the app's shutdown stopped the loop and closed the source


@pytest.mark.slow
def test_a_failing_source_is_reported_not_fatal(live_model, tmp_path):
    from facellm_edge.runtime.live.sources import open_source
    from facellm_edge.serve.config import ServeConfig
    from facellm_edge.serve.live import LiveService
    from facellm_edge.serve.metrics import Metrics

    for name in ("a.jpg", "b.png"):
        (tmp_path / name).write_bytes(b"not an image")
    live = LiveService(live_model, ServeConfig(), Metrics(), open_source(str(tmp_path)))
    live.start()
    live.stop()  # joins the loop, which has failed on its own
    status = live.status()
    assert not live.ready and status["running"] is False and "could be read" in status["error"]


@pytest.mark.slow  # tiny_bundle
def test_serve_detect_every_reaches_the_live_loop(live_model, photo_video, monkeypatch):
    """serve --detect-every N: the server's live loop runs the real detector on every Nth frame only."""
    import pytest

    from facellm_edge.errors import UsageError
    from facellm_edge.runtime.live.sources import open_source
    from facellm_edge.serve.config import ServeConfig
    from facellm_edge.serve.live import LiveService
    from facellm_edge.serve.metrics import Metrics

    calls = []
    real = live_model.detect
    monkeypatch.setattr(live_model, "detect", lambda image: calls.append(1) or real(image))
    live = LiveService(live_model, ServeConfig(detect_every=4), Metrics(), open_source(str(photo_video)))
    live.start()
    live._thread.join(120)  # the file ends, its last answers come, the loop returns
    live.stop()
    assert live.stats is not None and live.stats.frames == 12 and len(calls) == 3  # frames 0, 4 and 8
    with pytest.raises(UsageError, match="detect_every -1"):
        ServeConfig(detect_every=-1)
