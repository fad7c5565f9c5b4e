"""The kiosk page (``GET /``) in a real browser: Debian's chromium driven headless by Playwright (no browser
download), against a real server on 127.0.0.1 with the tiny bundle.

Checked: the page loads with no console error and no request to anywhere but the server; a card per person fills in
with the streamed answer (a video of the photos as the live source); the question box changes the standing
question; in browser-camera mode (``--source browser``) the page sends frames from Chromium's fake camera, fed from
a Y4M clip of the astronaut photo, and a card with the answer about that face appears; on a server without a live
source the page says so once. Screenshots at 1920x1080 and 800x480 (a 7" touch screen) are saved under the test's
tmp_path.

Without chromium (or Playwright) the test is skipped on a developer's machine and FAILS in CI (``CI`` set): .ci/run
installs Debian's chromium, so a missing browser there is a broken setup, not a reason to skip.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

CHROMIUM = os.environ.get("FACELLM_CHROMIUM", "/usr/bin/chromium")
SCREENS = {"1080p": (1920, 1080), "7inch": (800, 480)}
MAX_TOKENS = 8  # the answers of conftest's live_model: long enough for a card to show text


def _browser_or_skip() -> str:
    missing = None
    if importlib.util.find_spec("playwright") is None:
        missing = "the playwright package is not installed (pip install playwright; no browser download needed)"
    elif not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        missing = f"no chromium at {CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"kiosk page test in CI: {missing}")
        pytest.skip(missing)
    return CHROMIUM


def write_y4m(path: Path, image: np.ndarray, frames: int = 10) -> Path:
    """A 640x480 YUV4MPEG2 (4:2:0) clip of one still 640x480 image, for Chromium's fake camera (it loops the
    file)."""
    assert image.shape == (480, 640, 3)
    i420 = cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420).tobytes()
    with open(path, "wb") as f:
        f.write(b"YUV4MPEG2 W640 H480 F10:1 Ip A1:1 C420jpeg\n")
        for _ in range(frames):
            f.write(b"FRAME\n" + i420)
    return path


class PageWatch:
    """Everything a page logs as an error and every URL it requests."""

    def __init__(self, page, base: str) -> None:
        self.errors: list[str] = []
        self.foreign: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", lambda r: None if r.url.startswith((base, "data:")) else self.foreign.append(r.url))


def _cards(page) -> dict[str, str]:
    return page.eval_on_selector_all(
        ".card:not(.gone)", "cards => Object.fromEntries(cards.map(c => [c.dataset.track, "
        "c.querySelector('.a').textContent]))")


@pytest.mark.slow
def test_kiosk_page_in_chromium(live_model, astronaut_bgr, photo_video, letterbox, live_app, serving, tmp_path):
    executable = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    from facellm_edge.runtime.live.sources import open_source
    from facellm_edge.serve.pushed import PushedSource

    clip = write_y4m(tmp_path / "astronaut.y4m", letterbox(astronaut_bgr))
    args = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-video-capture={clip}"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=args)
        try:
            # 1. a video source: a card per person with its answer; the question box
            app, _ = live_app(live_model, open_source(str(photo_video)), question="How old is this person?")
            with serving(app) as base:
                # The page opens after the clip has ended (what a slow machine sees): the cards and the last
                # annotated frame must still show (Blink shows an MJPEG part only when the next part begins).
                deadline = time.monotonic() + 60
                while httpx.get(base + "/v1/live/status").json()["running"] and time.monotonic() < deadline:
                    time.sleep(0.1)
                page = browser.new_page(viewport={"width": 1920, "height": 1080})
                watch = PageWatch(page, base)
                page.goto(base + "/", wait_until="domcontentloaded")
                page.wait_for_function("document.querySelectorAll('.card').length >= 6 && "
                                       "!document.querySelector('.card.pending')", timeout=60_000)
                page.wait_for_function("document.getElementById('video').naturalWidth === 640 && "
                                       "!document.getElementById('video').hidden", timeout=30_000)
                served = {str(t["track_id"]): t["text"] for t in httpx.get(base + "/v1/live/tracks").json()["tracks"]}
                assert _cards(page) == served and len(served) >= 6  # the page shows what the server answered
                assert any(text.strip() for text in served.values())
                assert page.inner_text("#standing") == "How old is this person?"
                page.screenshot(path=str(tmp_path / "kiosk-1080p.png"))

                page.fill("#question", "What is the expression?")
                page.press("#question", "Enter")
                page.wait_for_function("document.getElementById('standing').textContent === "
                                       "'What is the expression?'", timeout=10_000)
                assert httpx.get(base + "/v1/live/question").json() == {"question": "What is the expression?"}

                page.set_viewport_size({"width": 800, "height": 480})
                page.wait_for_timeout(300)
                for selector in ("#video", "#question", ".card"):  # everything is on the small screen
                    box = page.locator(selector).first.bounding_box()
                    assert box and box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= 800 \
                        and box["y"] + box["height"] <= 480, selector
                page.screenshot(path=str(tmp_path / "kiosk-7inch.png"))
                page.close()
            assert watch.errors == [] and watch.foreign == []

            # 2. the browser's own camera: frames from Chromium's fake camera, answered about the astronaut
            source = PushedSource()
            app, _ = live_app(live_model, source, question="Describe this person.")
            with serving(app) as base:
                context = browser.new_context(viewport={"width": 800, "height": 480}, permissions=["camera"])
                page = context.new_page()
                watch = PageWatch(page, base)
                page.goto(base + "/", wait_until="domcontentloaded")
                page.wait_for_function("document.querySelector('.card .a') && "
                                       "!document.querySelector('.card').classList.contains('pending')",
                                       timeout=60_000)
                assert page.get_attribute("#camera", "aria-pressed") == "true" and source.pushed >= 1
                (answer,) = [t["text"] for t in httpx.get(base + "/v1/live/tracks").json()["tracks"]]
                assert list(_cards(page).values()) == [answer]
                page.screenshot(path=str(tmp_path / "kiosk-camera-7inch.png"))
                page.click("#camera")  # stop sending frames
                sent = source.pushed
                page.wait_for_timeout(600)
                assert source.pushed <= sent + 1  # at most the frame that was in flight
                context.close()
            assert watch.errors == [] and watch.foreign == []

            # 3. a server without a live source: the page says so and stops there (no retry loop)
            from facellm_edge.serve.app import create_app
            from facellm_edge.serve.config import ServeConfig

            with serving(create_app(live_model, ServeConfig())) as base:
                page = browser.new_page(viewport={"width": 800, "height": 480})
                watch = PageWatch(page, base)
                page.goto(base + "/", wait_until="load")
                page.wait_for_function("document.getElementById('novideo').textContent.includes('No live video')")
                page.wait_for_timeout(2500)  # the video would be retried every 2 s
                assert "start the server with --source" in page.inner_text("#status")
                assert len(watch.errors) == 1 and "404" in watch.errors[0]  # the status request, once
                page.close()
        finally:
            browser.close()
