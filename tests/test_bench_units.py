"""Unit tests of the benchmark's building blocks: statistics, isolated runs and their memory, config, machine info."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from facellm_edge.bench.config import BenchConfig, LiveConfig, parse_csv, resolve_naive
from facellm_edge.bench.stages import RssSampler, StageTimer, percentile, repeat, run_isolated, summarize
from facellm_edge.bench.system import machine_info, machine_slug, versions
from facellm_edge.errors import InputError, RuntimeStageError, UsageError


def test_percentile_and_summary_match_numpy():
    rng = np.random.default_rng(0)
    xs = list(rng.exponential(10.0, size=37))
    for q in (0, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    s = summarize(xs)
    assert s["median"] == pytest.approx(float(np.median(xs)), abs=1e-3)
    assert s["n"] == 37 and s["min"] <= s["median"] <= s["p90"] <= s["p99"] <= s["max"]
    with pytest.raises(ValueError):
        summarize([])


def test_repeat_discards_warmup_runs():
    calls = []

    def one(timer: StageTimer) -> None:
        calls.append(1)
        timer.add("run", len(calls))

    timer = repeat(one, runs=3, warmup=2)
    assert len(calls) == 5
    assert timer.samples["run"] == [3.0, 4.0, 5.0]
    with timer.time("sleepless"):
        sum(range(1000))
    assert timer.summary()["sleepless"]["n"] == 1


def test_rss_sampler_sees_an_allocation():
    with RssSampler(interval_s=0.005) as s:
        before = s.peak_mb
        block = np.ones(120 * 2**20, dtype=np.uint8)  # touched: resident
        block[::4096] = 2
        s._stop.wait(0.05)
    assert s.peak_mb - before > 80
    del block


PROBE = textwrap.dedent('''
    import numpy as np
    from facellm_edge.errors import InputError

    def allocate(p):
        a = np.ones(p["mb"] * 2**20, dtype=np.uint8)
        return {"name": "probe", "sum": int(a[::4096].sum())}

    def bad_input(p):
        raise InputError("no such photo: " + p["path"])

    def crash(p):
        raise ValueError("boom")
''')


@pytest.fixture()
def probe_module(tmp_path, monkeypatch):
    (tmp_path / "bench_probe.py").write_text(PROBE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "bench_probe"


def test_isolated_run_measures_its_own_peak_not_the_parents(probe_module):
    parent_block = np.ones(400 * 2**20, dtype=np.uint8)  # resident in the parent, must not count for the child
    parent_block[::4096] = 3
    r = run_isolated(f"{probe_module}:allocate", {"mb": 60}, timeout_s=120, label="probe")
    assert r["sum"] == 60 * 2**20 // 4096
    assert 60 <= r["memory"]["peak_rss_mb"] < 400
    assert r["wall_s"] > 0
    del parent_block


def test_isolated_run_reraises_typed_errors_and_wraps_crashes(probe_module):
    with pytest.raises(InputError, match="no such photo: x.jpg"):
        run_isolated(f"{probe_module}:bad_input", {"path": "x.jpg"}, timeout_s=120, label="probe")
    with pytest.raises(RuntimeStageError, match="probe.*ValueError: boom"):
        run_isolated(f"{probe_module}:crash", {}, timeout_s=120, label="probe")


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(UsageError, match="exactly one"):
        BenchConfig(out=tmp_path)
    with pytest.raises(UsageError, match="exactly one"):
        BenchConfig(out=tmp_path, bundle=tmp_path, synthetic="tiny")
    for kw, msg in (({"runs": 0}, "--runs"), ({"warmup": -1}, "--warmup"), ({"decode_tokens": 1}, "decode-tokens"),
                    ({"threads": 0}, "--threads"), ({"naive": ("gpu-fp8",)}, "unknown naive"),
                    ({"live": LiveConfig(frames=3)}, "live-frames")):
        with pytest.raises(UsageError, match=msg):
            BenchConfig(out=tmp_path, synthetic="tiny", **kw)
    with pytest.raises(UsageError):
        parse_csv(" , ", "quant")


def test_resolve_naive_records_what_auto_leaves_out():
    targets, skipped = resolve_naive(("auto",), cuda=False, native_bf16=False)
    assert targets == ("cpu-fp32",)
    assert {s["name"] for s in skipped} == {"cpu-bf16", "cuda-bf16"}
    targets, skipped = resolve_naive(("auto",), cuda=True, native_bf16=True)
    assert targets == ("cpu-fp32", "cpu-bf16", "cuda-bf16") and skipped == []
    targets, skipped = resolve_naive(("auto", "cpu-bf16"), cuda=False, native_bf16=False)
    assert targets == ("cpu-fp32", "cpu-bf16") and [s["name"] for s in skipped] == ["cuda-bf16"]
    assert resolve_naive(("none",), cuda=False, native_bf16=False) == ((), [])
    with pytest.raises(UsageError, match="CUDA"):
        resolve_naive(("cuda-bf16",), cuda=False, native_bf16=False)


def test_machine_info_describes_this_machine():
    import os

    info = machine_info()
    assert info["usable_cores"] == len(os.sched_getaffinity(0))
    assert info["ram_gb"] > 0 and info["cpu_model"]
    assert "CPUExecutionProvider" in info["ort_providers"]
    assert set(info["cpu_flags"]) >= {"avx2", "avx512_bf16"}
    slug = machine_slug(info)
    assert slug.endswith(f"-{info['usable_cores']}c") and "/" not in slug
    v = versions()
    assert {"onnxruntime", "llama-cpp-python", "torch", "transformers", "python"} <= set(v)


def test_missing_inputs_fail_before_any_work(tmp_path, capsys):
    from facellm_edge.cli import main

    rc = main(["bench", "--synthetic", "facellm-99b", "--out", str(tmp_path / "o")])
    assert rc == UsageError.exit_code and "unknown model 'facellm-99b'" in capsys.readouterr().err
    rc = main(["bench", "--synthetic", "tiny", "--quant", "q3_x", "--out", str(tmp_path / "o")])
    assert rc == UsageError.exit_code and "q3_x" in capsys.readouterr().err
    rc = main(["bench", "--bundle", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc == InputError.exit_code and "bundle not found" in capsys.readouterr().err
    rc = main(["bench", "--synthetic", "tiny", "--image", str(tmp_path / "none.jpg"), "--out", str(tmp_path / "o")])
    assert rc == InputError.exit_code and "image not found" in capsys.readouterr().err
    rc = main(["bench", "--synthetic", "tiny", "--live-llama-threads", "1,x", "--out", str(tmp_path / "o")])
    assert rc == UsageError.exit_code and "--live-llama-threads" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    rc = main(["bench", "--synthetic", "tiny", "--out", str(tmp_path / "exists")])
    assert rc == 4 and "already exists" in capsys.readouterr().err
    # --force replaces only bench results: a folder of the user's is refused before any work, byte-identical
    (tmp_path / "exists" / "thesis.tex").write_text("chapter 1")
    rc = main(["bench", "--synthetic", "tiny", "--out", str(tmp_path / "exists"), "--force"])
    assert rc == 4 and "is not bench results written by facellm-edge" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "exists").iterdir()] == ["thesis.tex"]
    assert (tmp_path / "exists" / "thesis.tex").read_text() == "chapter 1"
    assert not (tmp_path / "o").exists()


def test_live_frame_loop_on_a_real_video(tmp_path, t1_bgr, yunet_model):
    """--video path: a real mp4 written with OpenCV, read back through the runtime's VideoFile source."""
    import cv2

    from facellm_edge.bench.edge import make_detector
    from facellm_edge.bench.live import frame_loop, synthetic_clip, video_frames

    clip = synthetic_clip(t1_bgr, 12, 640, 480)
    assert all(f.shape == (480, 640, 3) for f in clip)
    assert not np.array_equal(clip[0], clip[6])  # the clip pans
    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (640, 480))
    for f in clip:
        writer.write(f)
    writer.release()
    frames = video_frames(str(path), 8)
    assert len(frames) == 8 and frames[0].shape == (480, 640, 3)
    stats = frame_loop(frames, make_detector(yunet_model, 1), 10)  # 10 > 8 frames: the loop cycles
    assert stats["frame_ms"]["n"] == 10 and stats["fps"] > 0
    assert stats["faces_per_frame"] >= 4  # t1.jpg's 6 faces, small after letterboxing into 640x480
    with pytest.raises(InputError):
        video_frames(str(tmp_path / "missing.mp4"), 5)
