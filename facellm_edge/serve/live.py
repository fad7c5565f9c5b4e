"""The live endpoints of ``facellm-edge serve --source ...``: the live loop (headless) in a background thread, its
events as server-sent events, its annotated frames as JPEG / MJPEG, the standing question and follow-ups in, and
the browser-camera mode (``--source browser``: the kiosk page POSTs its camera's frames).

Routes (:meth:`LiveService.router`, all under ``/v1/live``): ``GET events`` (SSE; the events are listed in
:mod:`facellm_edge.serve.streams`), ``GET frame.jpg`` (503 before the first frame), ``GET video.mjpg``,
``GET status``, ``GET tracks``, ``GET|PUT question``, ``POST tracks/{id}/ask`` (202, 404 for a track that is not
live), ``POST frames`` (a JPEG/PNG body; 409 unless the source is the browser). The loop's callbacks update the
metrics ``live_fps`` (frames over the last :data:`FPS_WINDOW_S`), ``live_dropped_frames`` (frames the source had
that the loop never took: gaps in the frame numbers) and ``live_tracked_faces``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from facellm_edge.errors import UsageError
from facellm_edge.llm.generator import check_question
from facellm_edge.runtime.live.control import LiveControl
from facellm_edge.runtime.live.loop import LiveConfig, LiveStats, run_live
from facellm_edge.runtime.live.sources import FrameSource, open_source
from facellm_edge.serve.errors import APIError, Busy, not_found
from facellm_edge.serve.images import ImageBytes, decode
from facellm_edge.serve.pushed import BROWSER_SOURCE, PushedSource
from facellm_edge.serve.state import load_json
from facellm_edge.serve.streams import FrameHub, LiveFeed
from facellm_edge.serve.trust import require_json

if TYPE_CHECKING:
    from facellm_edge.runtime.pipeline import FaceLLM
    from facellm_edge.serve.config import ServeConfig
    from facellm_edge.serve.metrics import Metrics

__all__ = ["LiveService", "open_live_source"]

log = logging.getLogger(__name__)

TRACKS_INTERVAL_S = 0.2  # the per-frame ``tracks`` event goes out at most this often
FPS_WINDOW_S = 2.0  # live_fps: frames over the last seconds
MAX_FRAME_PIXELS = 3840 * 2160  # a browser camera frame above 4K UHD is refused


def open_live_source(spec: str, max_pixels: int) -> FrameSource:
    """``browser`` (:data:`~facellm_edge.serve.pushed.BROWSER_SOURCE`: frames POSTed by the kiosk page) or any
    ``run --source`` spec (camera index, file, folder, stream URL)."""
    if spec.strip().lower() == BROWSER_SOURCE:
        return PushedSource()
    return open_source(spec, max_pixels=max_pixels)


class LiveService:
    """The live loop of one server: started and stopped with the app, steered and watched through :meth:`router`."""

    def __init__(self, model: "FaceLLM", config: "ServeConfig", metrics: "Metrics",
                 source: FrameSource | None = None) -> None:
        if source is None:
            if not config.source:
                raise UsageError("the live service needs a source (--source CAMERA|FILE|URL|browser)")
            source = open_live_source(config.source, model.config.max_pixels)
        self.model, self.config, self.metrics, self.source = model, config, metrics, source
        self.feed = LiveFeed(check_question(config.question))
        self.frames = FrameHub()
        self.control = LiveControl(on_event=self._on_event, on_frame=self.frames.put)
        self.stats: LiveStats | None = None  # once the loop has ended
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._frame_times: deque[float] = deque()
        self._last_index: int | None = None
        self._frames = 0
        self._dropped = 0
        self._tracks_sent = 0.0
        self.fps = 0.0  # frames per second over the last FPS_WINDOW_S (0 once the loop has ended)

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop (headless) in a background thread."""
        if self._thread is not None:
            raise RuntimeError("the live service was already started")
        self.feed.running = True
        self._thread = threading.Thread(target=self._run, name="live-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # a file source that ends waits for its last answers, as long as a request may take
        cfg = LiveConfig(question=self.feed.question, display=False, drain_timeout_s=self.config.request_timeout_s,
                         detect_every=self.config.detect_every)
        try:
            self.stats = run_live(self.model, self.source, cfg, control=self.control)
            log.info("live source %s ended: %d frames, %d answers", self.source.description, self.stats.frames,
                     self.stats.answers)
        except Exception as exc:  # reported by status() and /health; the HTTP API goes on
            self.error = exc
            log.error("live loop stopped: %s", exc)
        finally:
            self.fps = 0.0
            self.metrics.live_fps.set(0.0)
            self.metrics.live_tracked_faces.set(0)
            self.feed.publish("status", {**self.status(), "running": False})

    def close_streams(self) -> None:
        """End the SSE and MJPEG responses (call it first at shutdown: open streams would hold the server)."""
        self.feed.close()
        self.frames.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop after its current frame, close the source, join; end the streams."""
        self.close_streams()
        self.control.stop()
        if self.source.live:  # a camera / the browser may be waiting for its next frame
            self.source.close()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the live loop did not stop within %.0fs", timeout)

    @property
    def ready(self) -> bool:
        """The loop is running (a source that has ended, or a failed loop, is not)."""
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def status(self) -> dict:
        return {"running": self.ready, "source": self.source.description,
                "browser_camera": isinstance(self.source, PushedSource), "question": self.feed.question,
                "frames": self._frames, "fps": round(self.fps, 2), "dropped_frames": self._dropped,
                "tracks": len(self.feed.tracks()), "error": str(self.error) if self.error else None}

    # -- the loop's callbacks (frame loop / VLM worker threads) ---------------------------------------------
    def _on_event(self, kind: str, payload: dict) -> None:
        if kind != "tracks":
            self.feed.publish(kind, payload)
            return
        now = time.monotonic()
        self._frame_tick(payload["frame"], len(payload["tracks"]), now)
        self.feed.update_boxes(payload["tracks"])
        if now - self._tracks_sent >= TRACKS_INTERVAL_S:
            self._tracks_sent = now
            self.feed.publish("tracks", payload, apply=False)

    def _frame_tick(self, index: int, n_tracks: int, now: float) -> None:
        if self._last_index is not None and index > self._last_index + 1:
            self._dropped += index - self._last_index - 1  # frames the source had but the loop never took
        self._last_index = index
        self._frames += 1
        times = self._frame_times  # the frame loop's thread only
        times.append(now)
        while now - times[0] > FPS_WINDOW_S:
            times.popleft()
        self.fps = (len(times) - 1) / (now - times[0]) if now > times[0] else 0.0
        self.metrics.live_fps.set(self.fps)
        self.metrics.live_dropped_frames.set(self._dropped)
        self.metrics.live_tracked_faces.set(n_tracks)

    # -- HTTP -----------------------------------------------------------------------------------------------
    def router(self) -> APIRouter:
        """``/v1/live/*``: events (SSE), frame.jpg, video.mjpg, status, question, tracks, follow-ups, frames.
        Errors are raised as :class:`~facellm_edge.serve.errors.APIError` (the app answers them in OpenAI's shape)."""
        r = APIRouter(prefix="/v1/live", tags=["live"])
        no_store = {"Cache-Control": "no-store"}

        @r.get("/events")
        async def events(last_event_id: str | None = Header(None)) -> StreamingResponse:
            last = int(last_event_id) if last_event_id and last_event_id.strip().isdigit() else None
            return StreamingResponse(self.feed.stream(last), media_type="text/event-stream",
                                     headers={**no_store, "X-Accel-Buffering": "no"})

        @r.get("/frame.jpg")
        async def frame_jpg() -> Response:
            got = await asyncio.to_thread(self.frames.jpeg)
            if got is None:
                raise APIError(503, "no frame yet: the live source has not delivered one", code="no_frame",
                               headers={"Retry-After": "1"})
            return Response(got[1], media_type="image/jpeg", headers=no_store)

        @r.get("/video.mjpg")
        async def video() -> StreamingResponse:
            return StreamingResponse(self.frames.mjpeg(), media_type="multipart/x-mixed-replace; boundary=frame",
                                     headers=no_store)

        @r.get("/status")
        async def status() -> dict:
            return self.status()

        @r.get("/tracks")
        async def tracks() -> dict:
            return {"tracks": self.feed.tracks()}

        @r.get("/question")
        async def get_question() -> dict:
            return {"question": self.feed.question}

        @r.put("/question")
        async def put_question(request: Request) -> dict:
            question = await _question(request)
            self.control.set_question(question)
            self.feed.publish("question", {"question": question})
            return {"question": question}

        @r.post("/tracks/{track_id}/ask", status_code=202)
        async def ask(track_id: int, request: Request) -> JSONResponse:
            question = await _question(request)
            if not self.control.ask_track(track_id, question):
                raise not_found(f"no live track {track_id} (it has left, or the live loop is not running)")
            return JSONResponse({"track_id": track_id, "question": question}, status_code=202)

        @r.post("/frames", status_code=202)
        async def frames(request: Request) -> JSONResponse:
            if not isinstance(self.source, PushedSource):
                raise APIError(409, f"the live source is {self.source.description}; start the server with "
                                    f"--source {BROWSER_SOURCE} to send camera frames", code="not_browser_source")
            data = await request.body()  # bounded by the app's --max-body-bytes layer (413)
            limit = min(self.model.config.max_pixels or MAX_FRAME_PIXELS, MAX_FRAME_PIXELS)
            image = await asyncio.to_thread(decode, ImageBytes(data, "the camera frame"), limit)
            try:
                index = self.source.push(image)
            except RuntimeError as exc:  # closed: the server is stopping
                raise Busy("the live loop is stopping", 5) from exc
            return JSONResponse({"frame": index}, status_code=202)

        return r


async def _question(request: Request) -> str:
    """The ``question`` of a JSON body ``{"question": "..."}``; a 400 otherwise. The question itself is checked once,
    by :class:`~facellm_edge.runtime.live.control.LiveControl` (set_question / ask_track: a blank one is a
    UsageError, which the app answers with a 400 too)."""
    require_json(request)
    body = load_json(await request.body())  # small: bounded by the --max-body-bytes layer
    return body.get("question") if isinstance(body, dict) else None
