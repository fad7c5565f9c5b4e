"""`run`'s files: every annotated frame reaches --output or the run fails (exit 4, nothing kept); --output's suffix
is a known video or image; no output is one of the files the run reads; a failed write leaves one error line and
nothing this run created; sources are told apart as resolved paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from facellm_edge.cli import main
from facellm_edge.errors import InputError, OutputError, UsageError
from facellm_edge.runtime.live.loop import LiveConfig, run_live
from facellm_edge.runtime.live.outputs import LiveOutputs, check_outputs
from facellm_edge.runtime.live.sources import open_source, open_sources

MAX_TOKENS = 2  # live_model's answer length

# Runs facellm-edge with RLIMIT_FSIZE: a write past `limit` bytes fails with EFBIG, as a write to a full disk fails
# with ENOSPC (the kernel refuses it; nothing is faked). SIGXFSZ, which would kill the process, stays ignored
# across exec.
_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
{body}
"""


def _limited(body: str, limit: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LIMITED.format(body=body), str(limit), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _frames(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        frames.append(image)
    cap.release()
    return frames


def _outputs(path: Path, **kw) -> LiveOutputs:
    return LiveOutputs(LiveConfig(question="q", display=False, output=path, **kw), SimpleNamespace(fps=10.0))


def test_frames_of_other_sizes_are_letterboxed_into_the_video(tmp_path):
    """A folder of photos of mixed sizes: each frame is in the video, fitted (aspect kept) into the first one's
    size; before, the encoder dropped every frame of another size with only OpenCV's own warning."""
    out = _outputs(tmp_path / "o.mp4")
    out.write_frame(np.full((480, 640, 3), 100, np.uint8))
    out.write_frame(np.full((886, 1280, 3), 255, np.uint8))  # wider: black bands above and below
    out.write_frame(np.full((320, 320, 3), 255, np.uint8))  # square: black bands left and right
    out.close(keep=True)
    frames = _frames(tmp_path / "o.mp4")
    assert len(frames) == 3 and all(f.shape == (480, 640, 3) for f in frames)
    wide, square = frames[1], frames[2]
    assert wide[:8].mean() < 30 and wide[-8:].mean() < 30 and wide[200:280].mean() > 220
    assert square[:, :60].mean() < 30 and square[:, -60:].mean() < 30 and square[:, 200:440].mean() > 220
    assert [p.name for p in tmp_path.iterdir()] == ["o.mp4"]


def test_a_video_that_does_not_read_back_is_not_kept(tmp_path):
    """The temporary video cut short (what a full disk leaves: no index, it does not open) is checked before it
    is committed: OutputError (exit 4), the temporary file removed, the user's file (--force) left as it was."""
    dest = tmp_path / "o.mp4"
    dest.write_bytes(b"the previous video")
    out = _outputs(dest, overwrite=True)
    for i in range(5):
        out.write_frame(np.full((240, 320, 3), 40 * i, np.uint8))
    out.writer.release()  # complete, then cut short
    os.truncate(out.video, os.path.getsize(out.video) // 2)
    with pytest.raises(OutputError, match="0 of its 5 frames could be read back"):
        out.close(keep=True)
    assert [p.name for p in tmp_path.iterdir()] == ["o.mp4"] and dest.read_bytes() == b"the previous video"


def test_output_suffix_is_a_known_video_or_image(tmp_path):
    """Other suffixes are refused before anything is made (.gif made OpenCV fall back to its image-sequence writer,
    which left annotated frames as hidden files); each video container reads back frame for frame; .tif/.tiff are
    TIFF images (they were MPEG-4 streams)."""
    for name in ("o.gif", "o.webm", "o.txt", "o"):
        with pytest.raises(UsageError, match=r"cannot write a .* file; end it with a video suffix \(.mp4"):
            check_outputs(LiveConfig(question="q", display=False, output=tmp_path / name))
    assert list(tmp_path.iterdir()) == []
    for suffix in (".mp4", ".m4v", ".mov", ".avi", ".mkv"):  # outputs.VIDEO_SUFFIXES
        out = _outputs(tmp_path / f"v{suffix}")
        for i in range(3):
            out.write_frame(np.full((240, 320, 3), 60 * i, np.uint8))
        out.close(keep=True)
        assert len(_frames(tmp_path / f"v{suffix}")) == 3, suffix
    for suffix in (".tif", ".tiff"):
        out = _outputs(tmp_path / f"i{suffix}")
        out.write_frame(np.full((240, 320, 3), 90, np.uint8))
        out.close(keep=True)
        assert (tmp_path / f"i{suffix}").read_bytes()[:4] in (b"II*\x00", b"MM\x00*"), suffix
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("case", ["output = file source", "jsonl = file source", "output in folder source",
                                  "jsonl = link to a folder image", "jsonl = .streams list", "gif"])
def test_run_refuses_an_output_that_is_a_source_before_any_work(tmp_path, capsys, case):
    """`run` never writes into what it reads, --force / --append or not: one line, exit 2, before the sources open
    and the bundle loads (the bundle given does not exist); the files are byte-identical. So is an unknown --output
    suffix."""
    img = tmp_path / "in.png"
    assert cv2.imwrite(str(img), np.full((60, 80, 3), 128, np.uint8))
    folder = tmp_path / "frames"
    folder.mkdir()
    assert cv2.imwrite(str(folder / "a.png"), np.full((60, 80, 3), 30, np.uint8))
    (tmp_path / "link.png").symlink_to(folder / "a.png")
    streams = tmp_path / "cams.streams"
    streams.write_text(f"{img}\n")
    source, opts = {
        "output = file source": (img, ["--output", str(img), "--force"]),
        "jsonl = file source": (img, ["--jsonl", str(img), "--append"]),
        "output in folder source": (f"{folder}/", ["--output", str(folder / "a.png"), "--force"]),
        "jsonl = link to a folder image": (folder, ["--jsonl", str(tmp_path / "link.png"), "--append"]),
        "jsonl = .streams list": (streams, ["--jsonl", str(streams), "--append"]),
        "gif": (img, ["--output", str(tmp_path / "o.gif")]),
    }[case]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    rc = main(["run", "--source", str(source), "-q", "Age?", "--no-display", *opts,
               "--bundle", str(tmp_path / "nobundle")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    assert ("cannot write a .gif file" if case == "gif" else "which this run reads") in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_the_same_source_twice_is_told_by_its_resolved_path_or_index(tmp_path, no_camera):
    """`--source dir --source dir/` (or ./dir, or a link to it) is one folder, `--source 0 --source 00` one
    camera: refused before any is opened, as the same text twice was."""
    folder = tmp_path / "frames"
    folder.mkdir()
    assert cv2.imwrite(str(folder / "a.png"), np.full((60, 80, 3), 30, np.uint8))
    (tmp_path / "link").symlink_to(folder)
    for specs in ([str(folder), f"{folder}/"], [str(folder), str(tmp_path / "link")], ["0", "00"], [0, "0"]):
        with pytest.raises(InputError, match="is given twice"):
            open_sources(specs)
    assert no_camera.opened == []


def test_a_jsonl_write_that_fails_leaves_nothing_it_created(tmp_path):
    """The disk refuses the first line (here: a file size limit): the error names the file, and closing (which
    flushes the refused line again and fails again) still removes the file this run created; before, close()
    raised first and an empty or torn file stayed."""
    body = """
from pathlib import Path
from types import SimpleNamespace
from facellm_edge.errors import OutputError
from facellm_edge.runtime.live.loop import LiveConfig
from facellm_edge.runtime.live.outputs import LiveOutputs
out = LiveOutputs(LiveConfig(question="q", display=False, jsonl=Path("a.jsonl")), SimpleNamespace(fps=10.0))
try:
    out.record({"answer": "x" * 500})
except OutputError as exc:
    print(exc)
out.close(keep=False)
"""
    r = _limited(body, 64, [], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "cannot write a.jsonl: file too large" and list(tmp_path.iterdir()) == []


@pytest.mark.slow  # tiny_bundle
@pytest.mark.parametrize("case", ["video", "jsonl"])
def test_run_on_a_full_disk_exits_4_with_one_line_and_leaves_nothing(tmp_path, bundle_args, long_video, photos,
                                                                       case):
    """The whole command with the disk refusing writes past a few KB: exit 4, one line on stderr (before: exit 0
    with an unplayable video committed; or two lines and an empty jsonl left behind), no file of this run left."""
    opts = (["--source", str(long_video), "--output", "o.mp4", "--max-frames", "30"] if case == "video" else
            ["--source", str(photos["t1"]), "--jsonl", "a.jsonl"])
    body = "from facellm_edge.cli import main\nsys.exit(main(sys.argv[2:]))"
    r = _limited(body, 8192 if case == "video" else 64, ["run", "-q", "Age?", "--no-display", *opts, *bundle_args],
                 tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 4, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: cannot write "), r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # tiny_bundle
def test_max_frames_on_a_file_waits_for_the_answers_in_progress(live_model, photo_video, tmp_path):
    """`--max-frames` ends a file's input as its end does: the faces of the frames read are answered (before:
    the stop abandoned them, 0 answers and no word)."""
    jsonl = tmp_path / "a.jsonl"
    cfg = LiveConfig(question="Age?", display=False, jsonl=jsonl, max_frames=1, detect_every=1)
    stats = run_live(live_model, open_source(str(photo_video)), cfg)
    assert stats.frames == 1 and stats.answers == 1
    assert [json.loads(line)["frame"] for line in jsonl.read_text().splitlines()] == [0]


@pytest.mark.slow  # tiny_bundle
def test_max_frames_on_a_camera_says_what_it_drops(live_model, astronaut_bgr, caplog):
    """A live source is cut at `--max-frames` (it has no end to wait for): the faces left unanswered are counted in
    a warning instead of vanishing without a word."""
    from facellm_edge.runtime.live.sources import Frame

    class Camera:
        live, fps, skipped, unit, description = True, 10.0, 0, "frames", "camera 0"

        def __iter__(self):
            for i in range(3):
                yield Frame(i, astronaut_bgr)

        def close(self) -> None:
            pass

    with caplog.at_level("WARNING", logger="facellm_edge.runtime.live.loop"):
        stats = run_live(live_model, Camera(), LiveConfig(question="Age?", display=False, max_frames=1,
                                                          detect_every=1))
    assert stats.frames == 1 and stats.answers == 0
    assert "stopped after --max-frames 1: 1 face(s) seen were not answered" in caplog.text
