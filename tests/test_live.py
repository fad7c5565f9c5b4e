"""The live loop on real sources: a video made from the photos, image folders, a stream that drops and comes back."""

from __future__ import annotations

import json
import threading

import cv2
import numpy as np
import pytest

from facellm_edge.errors import InputError, OutputError, UsageError
from facellm_edge.runtime.faces import Face
from facellm_edge.runtime.live.loop import LiveConfig, run_live
from facellm_edge.runtime.live.worker import DropOldestSlot
from facellm_edge.runtime.live.sources import LiveCapture, ReconnectPolicy, open_source
from facellm_edge.runtime.live.tracker import IouTracker, TrackerConfig
from facellm_edge.timings import STAGES

SIZE = (640, 480)  # video frame size (w, h)


@pytest.mark.slow  # tiny_bundle
def test_video_runs_headless_with_stable_tracks(live_model, photo_video, letterbox, tmp_path):
    jsonl, out = tmp_path / "answers.jsonl", tmp_path / "annotated.mp4"
    cfg = LiveConfig(question="How old is this person?", display=False, jsonl=jsonl, output=out)
    stats = run_live(live_model, open_source(str(photo_video)), cfg)
    assert stats.frames == 12 and len(stats.frame_ms) == 12
    # 1 astronaut track + 6 t1 tracks over 12 frames: ids are stable (a lost id would start an eighth track)
    assert stats.tracks == 7 and stats.faces == 6 * 1 + 6 * 6
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert sorted(r["track_id"] for r in lines) == list(range(1, 8)) and stats.answers == 7
    for r in lines:
        assert r["question"] == cfg.question and isinstance(r["answer"], str) and len(r["box"]) == 4
        assert list(r["timings_ms"]) == list(STAGES)  # the runtime's stage names, in order
        since = r["since_seen_ms"]
        assert 0 <= since["first_token"] <= since["answer"]
    assert live_model.generator.n_cached == 0  # every track's session was closed at the end
    cap = cv2.VideoCapture(str(out))
    assert cap.isOpened()
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == SIZE
    ok, first = cap.read()
    cap.release()
    assert ok and np.abs(first.astype(int) - letterbox(np.zeros((8, 8, 3), np.uint8))).sum() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotated.mp4", "answers.jsonl"]  # no temp files left


@pytest.mark.slow  # tiny_bundle
def test_detect_every_third_frame_draws_the_last_boxes_between(live_model, photo_video, tmp_path, monkeypatch):
    """--detect-every 3: the real detector runs on frames 0, 3, 6, 9 of the 12; every frame still shows its faces,
    the tracks stay the same 7 people (the tracker's miss budget counts detections) and each is answered once."""
    calls = []
    real = live_model.detect
    monkeypatch.setattr(live_model, "detect", lambda image: calls.append(1) or real(image))
    jsonl = tmp_path / "answers.jsonl"
    cfg = LiveConfig(question="How old is this person?", display=False, jsonl=jsonl, detect_every=3)
    stats = run_live(live_model, open_source(str(photo_video)), cfg)
    assert len(calls) == 4 and stats.frames == 12
    assert stats.faces == 6 * 1 + 6 * 6 and stats.tracks == 7 and stats.answers == 7
    assert sorted(json.loads(x)["track_id"] for x in jsonl.read_text().splitlines()) == list(range(1, 8))
    with pytest.raises(UsageError, match="detect_every -1 must be >= 0"):
        LiveConfig(question="q", detect_every=-1)


def test_detect_every_auto_strides_on_small_cpus_only():
    from facellm_edge.cpu import usable_cores
    from facellm_edge.runtime.live.tracker import resolve_detect_every

    assert [resolve_detect_every(0, cores) for cores in (1, 2, 4, 5, 16)] == [3, 3, 3, 1, 1]
    assert [resolve_detect_every(0, cores, busy=True) for cores in (1, 2, 4, 5, 16)] == [6, 6, 6, 1, 1]
    assert resolve_detect_every(2, cores=2) == 2 and resolve_detect_every(1, cores=2) == 1  # asked: kept
    assert resolve_detect_every(3, cores=2, busy=True) == 3 and resolve_detect_every(1, cores=2, busy=True) == 1
    assert LiveConfig(question="q").detect_every == 0 and LiveConfig(question="q").stride == resolve_detect_every(
        0, usable_cores())


@pytest.mark.slow  # tiny_bundle
@pytest.mark.parametrize("busy, frames", [(False, [0, 3, 6, 9]), (True, [0, 6])])
def test_auto_detection_pace_follows_the_worker_on_a_small_cpu(live_model, photo_video, monkeypatch, busy, frames):
    """Auto on a small CPU: the detector on every 3rd frame, every 6th while the VLM worker answers (the worker's
    state is pinned here so that the frames are known; it still answers the tracks for real)."""
    from facellm_edge.runtime.live import tracker
    from facellm_edge.runtime.live.worker import VlmWorker

    monkeypatch.setattr(tracker, "small_cpu", lambda cores=None: True)
    monkeypatch.setattr(VlmWorker, "busy", property(lambda self: busy))
    taken: list[int] = []  # frames the loop has taken from the video so far
    detected: list[int] = []  # which of them the real detector ran on
    real = live_model.detect
    monkeypatch.setattr(live_model, "detect", lambda image: detected.append(len(taken) - 1) or real(image))

    class Numbered:  # the real video source, counting the frames the loop takes
        def __init__(self, src):
            self.src = src

        def __iter__(self):
            for frame in self.src:
                taken.append(1)
                yield frame

        def __getattr__(self, name):
            return getattr(self.src, name)

    stats = run_live(live_model, Numbered(open_source(str(photo_video))), LiveConfig(question="Age?", display=False))
    assert stats.frames == 12 and detected == frames and stats.answers >= 1


@pytest.mark.slow  # tiny_bundle
def test_a_stop_while_the_loop_shuts_down_keeps_what_was_made(live_model, photo_video, tmp_path):
    """Ctrl-C / SIGTERM just as the video ended (the loop closing its source): the run counts as interrupted and
    keeps its video and answers; before, the stop escaped the loop's cleanup and the finished video was deleted."""
    import os
    import signal

    class StopOnClose:  # the real video source; its close() is where the user's Ctrl-C lands
        def __init__(self, src):
            self.src, self.sent = src, False

        def __iter__(self):
            return iter(self.src)

        def close(self):
            if not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)
            self.src.close()

        def __getattr__(self, name):
            return getattr(self.src, name)

    jsonl, out = tmp_path / "answers.jsonl", tmp_path / "annotated.mp4"
    cfg = LiveConfig(question="Age?", display=False, jsonl=jsonl, output=out)
    stats = run_live(live_model, StopOnClose(open_source(str(photo_video))), cfg)
    assert stats.interrupted and stats.frames == 12 and stats.answers >= 1
    assert len(jsonl.read_text().splitlines()) == stats.answers
    cap = cv2.VideoCapture(str(out))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
    cap.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotated.mp4", "answers.jsonl"]


def test_folder_and_image_sources(tmp_path, astronaut_bgr, t1_bgr):
    d = tmp_path / "imgs"
    d.mkdir()
    cv2.imwrite(str(d / "b.png"), t1_bgr)
    cv2.imwrite(str(d / "a.jpg"), astronaut_bgr)
    (d / "notes.txt").write_text("not an image")
    with open_source(str(d)) as src:
        frames = list(src)
    assert [f.name for f in frames] == ["a.jpg", "b.png"] and frames[1].image.shape == t1_bgr.shape
    with open_source(str(d / "a.jpg")) as src:
        assert len(list(src)) == 1
    (d / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="cannot decode"):
        list(open_source(str(d / "empty.png")))
    with pytest.raises(InputError, match="source not found"):
        open_source(str(tmp_path / "missing.mp4"))
    (tmp_path / "none").mkdir()
    with pytest.raises(InputError, match="no images"):
        open_source(str(tmp_path / "none"))


def test_camera_that_does_not_open(no_camera):
    with pytest.raises(InputError, match="cannot open camera 9"):
        open_source(9, opener=no_camera)
    assert no_camera.opened == [9]


def test_lost_stream_reconnects(photo_video):
    """A live source whose capture ends (a real EOF), then fails to open once, then comes back: frames continue."""
    calls = []

    def opener(target):
        calls.append(target)
        cap = cv2.VideoCapture(str(photo_video))
        if len(calls) == 2:
            cap.release()  # the camera is "still gone": a closed capture
        return cap

    src = LiveCapture("fake-camera", opener=opener, reconnect=ReconnectPolicy(initial_s=0.01, max_s=0.05))
    try:
        seen = []
        for frame in src:
            seen.append(frame.index)
            if frame.index >= 14:  # 12 frames per capture: index 14 only exists after a reconnect
                break
    finally:
        src.close()
    assert len(calls) == 3 and src.reconnects == 1
    assert seen == sorted(seen) and seen[-1] >= 14
    assert not src._thread.is_alive()


def test_tracker_ids():
    def face(x):
        return Face(box=np.array([x, 10, x + 50, 60]), score=0.9, landmarks=np.zeros((5, 2)))

    tr = IouTracker(TrackerConfig(iou_threshold=0.3, max_missed=1))
    a, b = tr.update([face(0), face(200)], 0)[0]
    ids = (a.track_id, b.track_id)
    assert ids[0] != ids[1]
    faces, ended = tr.update([face(205), face(3)], 1)  # moved a little, order swapped
    assert (faces[0].track_id, faces[1].track_id) == (ids[1], ids[0]) and ended == []
    faces, ended = tr.update([face(6)], 2)
    assert faces[0].track_id == ids[0] and ended == []
    faces, ended = tr.update([face(9), face(400)], 3)
    assert ended == [ids[1]] and faces[1].track_id not in ids


def test_a_lost_track_ends_after_the_same_frames_at_any_detection_pace():
    """max_missed counts frames of the source, not detections: at every 3rd or every 6th frame a face that left ends
    its track after 15 frames, and a person stepping into the same spot later is a new track."""
    def face(x):
        return Face(box=np.array([x, 10, x + 50, 60]), score=0.9, landmarks=np.zeros((5, 2)))

    for stride in (1, 3, 6):
        tr = IouTracker(TrackerConfig(max_missed=15))
        (first,), _ = tr.update([face(0)], 0)
        ends = [k for k in range(stride, 60, stride) if tr.update([], k)[1]]
        assert ends[0] == next(k for k in range(stride, 60, stride) if k > 15), stride  # the first detection after 15
        (newcomer,), _ = tr.update([face(2)], ends[0] + stride)
        assert newcomer.track_id != first.track_id
        # someone in the same spot at the first detection after the gap is new too, not the one who left
        tr = IouTracker(TrackerConfig(max_missed=15))
        (first,), _ = tr.update([face(0)], 0)
        k = next(k for k in range(stride, 60, stride) if k > 15)
        for j in range(stride, k, stride):
            assert tr.update([], j)[1] == []
        (back,), ended = tr.update([face(1)], k)
        assert ended == [first.track_id] and back.track_id != first.track_id, stride


def test_drop_oldest_slot():
    q = DropOldestSlot()
    q.put(1)
    q.put(2)
    assert q.get() == 2 and q.dropped == 1
    got = []
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    q.put(3)
    t.join(timeout=5)
    assert got == [3]
    q.close()
    assert q.get() is None


def test_overlay_screenshot(astronaut_bgr, yunet_model, tmp_path):
    from facellm_edge.runtime.detect import DetectorConfig, create_detector
    from facellm_edge.runtime.live.overlay import draw, wrap_text

    faces = create_detector(DetectorConfig(model_path=yunet_model)).detect(astronaut_bgr)
    faces[0].track_id = 1
    answer = ("The person appears to be a woman in her early forties, smiling, with short brown hair, wearing an "
              "orange spacesuit in front of an American flag.")
    out = draw(astronaut_bgr, faces, {1: answer})
    path = tmp_path / "overlay.png"
    assert cv2.imwrite(str(path), out)
    back = cv2.imread(str(path))
    assert back.shape == astronaut_bgr.shape
    x1, y1, x2, y2 = (int(v) for v in faces[0].box)
    changed = np.abs(back.astype(int) - astronaut_bgr.astype(int)).sum(axis=2) > 30
    assert changed[y1:y2 + 1, x1:x2 + 1].mean() < 0.2  # the face itself stays visible
    assert changed[:, x2 + 8:].sum() > 2000  # the text panel beside the face (roomier side)
    lines = wrap_text(answer, 248, 0.5, 1)
    assert len(lines) > 3 and " ".join(lines) == answer
    assert all(cv2.getTextSize(s, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)[0][0] <= 248 for s in lines)


class _InterruptedFrames:
    """A real file source that the user interrupts (Ctrl-C arrives in the main thread) after ``n`` frames."""

    live = False
    fps = 10.0

    def __init__(self, source, n: int) -> None:
        self.source, self.n = source, n

    def __iter__(self):
        for frame in self.source:
            if frame.index == self.n:
                raise KeyboardInterrupt
            yield frame

    def close(self) -> None:
        self.source.close()


@pytest.mark.slow  # tiny_bundle
def test_ctrl_c_finalises_outputs(live_model, photo_video, tmp_path):
    jsonl, out = tmp_path / "a.jsonl", tmp_path / "a.mp4"
    cfg = LiveConfig(question="Age?", display=False, jsonl=jsonl, output=out, join_timeout_s=10)
    before = {t.name for t in threading.enumerate()}
    stats = run_live(live_model, _InterruptedFrames(open_source(str(photo_video)), 4), cfg)
    assert stats.frames == 4
    assert "vlm-worker" not in {t.name for t in threading.enumerate()} - before
    assert jsonl.is_file()  # finalised (possibly with fewer answers than faces)
    cap = cv2.VideoCapture(str(out))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    cap.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "a.mp4"]


@pytest.mark.slow  # tiny_bundle
def test_each_answer_is_on_disk_when_it_is_reported(live_model, photo_video, tmp_path):
    """--jsonl is appended and flushed per answer (a crash or power cut keeps every complete line), not a temp file
    renamed at the end; the user sees each line in the file as soon as the answer exists."""
    jsonl = tmp_path / "a.jsonl"
    seen: list[bool] = []

    def on_record(rec: dict) -> None:
        lines = jsonl.read_text().splitlines() if jsonl.exists() else []
        seen.append(bool(lines) and json.loads(lines[-1]) == rec)

    cfg = LiveConfig(question="Age?", display=False, jsonl=jsonl)
    stats = run_live(live_model, open_source(str(photo_video)), cfg, on_record=on_record)
    assert stats.answers == 7 and seen == [True] * 7
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]


@pytest.mark.slow  # tiny_bundle
def test_interrupt_at_any_point_finalises(live_model, photo_video, tmp_path):
    """Ctrl-C / SIGTERM (the CLI raises KeyboardInterrupt in the main thread) landing wherever the main thread is
    when the first answer arrives — detection, drawing, encoding the video, or waiting for the worker."""
    import _thread

    jsonl, out = tmp_path / "a.jsonl", tmp_path / "a.mp4"
    fired: list[int] = []

    def on_record(rec: dict) -> None:
        if not fired:
            fired.append(rec["track_id"])
            _thread.interrupt_main()

    cfg = LiveConfig(question="Age?", display=False, jsonl=jsonl, output=out, join_timeout_s=30)
    before = {t.name for t in threading.enumerate()}
    stats = run_live(live_model, open_source(str(photo_video)), cfg, on_record=on_record)
    assert fired and stats.interrupted
    assert "vlm-worker" not in {t.name for t in threading.enumerate()} - before
    assert [json.loads(x)["track_id"] for x in jsonl.read_text().splitlines()][0] == fired[0]
    cap = cv2.VideoCapture(str(out))
    written = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    # every frame the loop finished is in the video; a stop landing between a frame's write and its count (one
    # bytecode boundary) leaves that frame in the video too
    assert stats.frames > 0 and written - stats.frames in (0, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "a.mp4"]


@pytest.mark.slow  # tiny_bundle
def test_outputs_are_checked_before_the_first_frame(live_model, photo_video, tmp_path):
    from facellm_edge.errors import OutputError

    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "old.mp4").write_bytes(b"mine")

    class NoFrames:
        live, fps, skipped = False, 10.0, 0

        def __iter__(self):
            raise AssertionError("a frame was read before the outputs were checked")

        def close(self) -> None:
            pass

    for cfg, message in ((LiveConfig(question="q", display=False, jsonl=tmp_path / "dir.jsonl"), "is a folder"),
                         (LiveConfig(question="q", display=False, output=tmp_path / "old.mp4"), "already exists")):
        with pytest.raises(OutputError, match=message):
            run_live(live_model, NoFrames(), cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.jsonl", "old.mp4"]
    assert (tmp_path / "old.mp4").read_bytes() == b"mine" and list((tmp_path / "dir.jsonl").iterdir()) == []


class _Frames:
    """An in-memory file-like source (not live: the loop drains the worker at its end)."""

    live, fps, skipped, unit, description = False, 10.0, 0, "frames", "memory"

    def __init__(self, images: list[np.ndarray]) -> None:
        self.images = images

    def __iter__(self):
        from facellm_edge.runtime.live.sources import Frame

        for i, image in enumerate(self.images):
            yield Frame(i, image)

    def close(self) -> None:
        pass


@pytest.mark.slow  # tiny_bundle
def test_control_streams_events_and_takes_questions(live_model, astronaut_bgr, letterbox, tmp_path):
    """What the server builds on: events and annotated frames out; the standing question and a follow-up about a
    live track in (answered in the track's session, no second image prefill)."""
    from facellm_edge.runtime.live.control import LiveControl

    events: list[tuple[str, dict]] = []
    frames: list[np.ndarray] = []
    control: LiveControl

    def on_event(kind: str, payload: dict) -> None:
        events.append((kind, payload))
        if kind == "answer" and not payload["follow_up"]:
            assert control.ask_track(payload["track_id"], "And the gender?")

    control = LiveControl(on_event=on_event, on_frame=frames.append)
    control.set_question("What is the expression?")
    jsonl = tmp_path / "a.jsonl"
    clip = [np.roll(letterbox(astronaut_bgr), i, axis=1) for i in range(8)]
    stats = run_live(live_model, _Frames(clip), LiveConfig(question="Age?", display=False, jsonl=jsonl),
                     control=control)
    kinds = [k for k, _ in events]
    assert stats.frames == 8 and len(frames) == 8 and frames[0].shape == clip[0].shape
    assert kinds.count("tracks") == 8 and kinds.count("track_appeared") == 1 and kinds.count("answer") == 2
    answers = [p for k, p in events if k == "answer"]
    assert [a["question"] for a in answers] == ["What is the expression?", "And the gender?"]
    assert [a["follow_up"] for a in answers] == [False, True] and "image_prefill" not in answers[1]["timings_ms"]
    tokens = "".join(p["text"] for k, p in events if k == "token" and p["question"] == "And the gender?")
    assert tokens == answers[1]["answer"]
    assert [json.loads(x)["question"] for x in jsonl.read_text().splitlines()] == [a["question"] for a in answers]
    assert control.ask_track(1, "Still there?") is False  # the loop has ended


@pytest.mark.slow  # tiny_bundle
def test_still_image_output_carries_every_answer(live_model, t1_bgr, astronaut_bgr, tmp_path):
    """`run --source photo.jpg --output out.png`: the frame waits for its answers, so the written image shows them
    (it differs from the same run's frame drawn before any answer); a folder of photos answers every photo's faces
    even where faces of two photos sit at the same place (each image is a new scene)."""
    import cv2

    from facellm_edge.runtime.live.control import LiveControl

    photo = tmp_path / "t1.png"
    cv2.imwrite(str(photo), t1_bgr)
    out = tmp_path / "out.png"
    records: list[dict] = []
    answers_when_drawn: list[int] = []
    control = LiveControl(on_frame=lambda image: answers_when_drawn.append(len(records)))
    stats = run_live(live_model, open_source(str(photo)), LiveConfig(question="Age?", display=False, output=out),
                     on_record=records.append, control=control)
    written = cv2.imread(str(out))
    assert stats.frames == 1 and len(records) == 6 and written.shape == t1_bgr.shape
    assert answers_when_drawn == [6]  # the frame was drawn (and written) once all six answers were there
    with pytest.raises(OutputError, match="writes one image, but the source is"):
        run_live(live_model, open_source(str(tmp_path)), LiveConfig(question="Age?", display=False,
                                                               output=tmp_path / "x.jpg"))
    folder = tmp_path / "two"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), astronaut_bgr)
    cv2.imwrite(str(folder / "b.png"), cv2.flip(astronaut_bgr, 1))  # the face at nearly the same place
    records.clear()
    stats = run_live(live_model, open_source(str(folder)), LiveConfig(question="Age?", display=False),
                     on_record=records.append)
    assert stats.frames == 2 and stats.tracks == 2 and len(records) == 2


@pytest.mark.slow  # tiny_bundle
def test_several_sources_share_one_worker_and_name_themselves(live_model, astronaut_bgr, t1_bgr, tmp_path):
    """`run --source a --source b` (or a .streams file): frames in turn, one tracker per source with ids unique
    across them, one VLM worker; records and events carry the source."""
    from facellm_edge.runtime.live.control import LiveControl
    from facellm_edge.runtime.live.sources import MultiSource, open_sources

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    cv2.imwrite(str(a), astronaut_bgr)
    cv2.imwrite(str(b), t1_bgr)
    streams = tmp_path / "cams.streams"
    streams.write_text(f"# two cameras\n{a}\n\n{b}  # the group\n")
    source = open_sources([str(streams)])
    assert isinstance(source, MultiSource) and source.description == f"{a} + {b}"
    events: list[tuple[str, dict]] = []
    records: list[dict] = []
    stats = run_live(live_model, source, LiveConfig(question="Age?", display=False), on_record=records.append,
                     control=LiveControl(on_event=lambda kind, payload: events.append((kind, payload))))
    assert stats.frames == 2 and stats.tracks == 7 and len(records) == 7
    assert sorted(r["track_id"] for r in records) == list(range(1, 8))  # unique across the two trackers
    assert sorted(r["source"] for r in records) == [str(a)] + [str(b)] * 6
    appeared = [p for k, p in events if k == "track_appeared"]
    assert {p["source"] for p in appeared} == {str(a), str(b)} and len(appeared) == 7
    with pytest.raises(InputError, match="given twice"):
        open_sources([str(a), str(a)])
    with pytest.raises(OutputError, match="records one source"):
        run_live(live_model, open_sources([str(a), str(b)]), LiveConfig(question="Age?", display=False,
                                                                   output=tmp_path / "x.mp4"))


def test_live_policy_on_small_and_large_cpus(monkeypatch):
    """for_live: the detector gets 1 thread (unless given), its resolution is kept; the encoder and llama.cpp keep
    every core; the detector's stride is auto: every 3rd frame on <= 4 usable cores."""
    import facellm_edge.cpu
    from facellm_edge.runtime.config import DetectorConfig, RuntimeConfig

    monkeypatch.setattr(facellm_edge.cpu, "usable_cores", lambda: 2)
    small = RuntimeConfig().for_live()
    assert (small.detector.n_threads, small.detector.input_size, small.detector.size) == (1, None, 640)
    assert (small.engine.n_threads, small.encoder.n_threads) == (None, None)
    given = RuntimeConfig(detector=DetectorConfig(input_size=320, n_threads=2)).for_live().detector
    assert (given.input_size, given.size, given.n_threads) == (320, 320, 2)  # what the user asked for is kept
    assert LiveConfig(question="q").stride == 3
    monkeypatch.setattr(facellm_edge.cpu, "usable_cores", lambda: 16)
    assert LiveConfig(question="q").stride == 1
    with pytest.raises(UsageError, match="multiple of 32"):
        DetectorConfig(input_size=300)
