"""Unit tests of the benchmark's building blocks: statistics, isolated runs and their memory, config, machine info,
the metrics derived from the runtime's stage timings, the live-loop clips and their source, the roofline bounds."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from facellm_edge.bench import report
from facellm_edge.bench.config import BenchConfig, LiveBenchConfig, parse_csv, resolve_naive
from facellm_edge.bench.stages import (RssSampler, StageTimer, merge_rounds, percentile, repeat, run_isolated,
                                       summarize)
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


def test_rounds_of_one_configuration_pool_their_samples_and_keep_the_worst_memory():
    def part(samples, peak, started):
        return {"name": "edge int8+q4_0", "kind": "edge", "stages": {"encode_ms": summarize(samples),
                                                                     "decode_tok_s": summarize([30.0])},
                "memory": {"peak_rss_mb": peak, "rss_loaded_mb": peak - 100}, "wall_s": 10.0, "load_ms": started,
                "started": started}

    m = merge_rounds([part([100.0], 900.0, 1.0), part([300.0], 950.0, 5.0), part([200.0], 920.0, 9.0)])
    assert m["stages"]["encode_ms"]["samples"] == [100.0, 300.0, 200.0] and m["stages"]["encode_ms"]["median"] == 200.0
    assert m["stages"]["decode_tok_s"]["n"] == 3
    assert m["memory"] == {"peak_rss_mb": 950.0, "rss_loaded_mb": 850.0}
    assert (m["wall_s"], m["load_ms"], m["rounds"], m["round_starts"]) == (30.0, 5.0, 3, [1.0, 5.0, 9.0])
    assert "started" not in m and m["name"] == "edge int8+q4_0"
    with pytest.raises(ValueError):
        merge_rounds([])


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
    assert r["wall_s"] >= 0
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
                    ({"threads": 0}, "--threads"), ({"naive": ("gpu-fp8",)}, "unknown naive")):
        with pytest.raises(UsageError, match=msg):
            BenchConfig(out=tmp_path, synthetic="tiny", **kw)
    for kw, msg in (({"frames": 3}, "live-frames"), ({"width": 100}, "too small"), ({"llama_threads": (0,)}, ">= 1")):
        with pytest.raises(UsageError, match=msg):
            LiveBenchConfig(**kw)
    with pytest.raises(UsageError):
        parse_csv(" , ", "quant")
    for devices in (("npu",), ("cpu", "gpu"), ()):
        with pytest.raises(UsageError, match="--device"):
            BenchConfig(out=tmp_path, synthetic="tiny", devices=devices)


def test_devices_reach_the_runtime_and_name_the_rows(tmp_path):
    from facellm_edge.bench.config import GPU_LAYERS
    from facellm_edge.bench.edge import config_name, edge_payload, runtime_config

    def payload(device):
        return edge_payload(tmp_path, "fp32", "q4_0", tmp_path / "a.jpg", "q?", "f?", 1, 0, 4, 2, None,
                            device=device)

    cpu, cuda, trt = (runtime_config(payload(d), threads=2) for d in ("cpu", "cuda", "tensorrt"))
    assert (cpu.encoder.device, cpu.engine.n_gpu_layers) == ("cpu", 0)
    assert (cuda.encoder.device, cuda.engine.n_gpu_layers) == ("cuda", GPU_LAYERS)
    assert (trt.encoder.device, trt.engine.n_gpu_layers) == ("tensorrt", GPU_LAYERS)
    # older payloads (no device) and the CPU rows keep the names of the results measured before --device
    assert runtime_config({k: v for k, v in payload("cpu").items() if k != "device"}, threads=2) == cpu
    assert config_name("edge", "int8", "q4_0", "cpu") == "edge int8+q4_0"
    assert config_name("edge", "fp32", "q4_0", "tensorrt") == "edge tensorrt fp32+q4_0"
    assert config_name("peer", "mmproj", "q4_0", "cpu") == "peer llama.cpp mtmd+q4_0"
    assert config_name("peer", "mmproj", "q4_0", "cuda") == "peer cuda llama.cpp mtmd+q4_0"


def test_gpu_devices_need_the_gpu_builds_before_any_work(tmp_path, capsys):
    """On a CPU-only install (CI's) a GPU --device fails in one line before the export, with nothing written."""
    import llama_cpp

    from facellm_edge.cli import main
    from facellm_edge.onnxrt import onnxruntime_module

    providers = onnxruntime_module().get_available_providers()
    for device, provider in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")):
        rc = main(["bench", "--synthetic", "tiny", "--device", f"cpu,{device}", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        if provider not in providers:
            assert rc != 0 and f"needs onnxruntime's {provider}" in err and len(err.strip().splitlines()) == 1
        elif not llama_cpp.llama_supports_gpu_offload():
            assert rc == UsageError.exit_code and "llama.cpp sees no GPU" in err
    rc = main(["bench", "--serve", "--synthetic", "tiny", "--device", "cuda", "--out", str(tmp_path / "o")])
    assert rc == UsageError.exit_code and "drop --device" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_gpu_rows_report_gpu_memory_and_get_no_cpu_bounds():
    from facellm_edge.bench import roofline
    from facellm_edge.bench.stages import gpu_peak

    readings = iter([1000.0, 1800.0, 1500.0] + [1500.0] * 1000)  # MB in use on the GPU, as NVML reads it
    with RssSampler(interval_s=0.001, gpu=lambda: next(readings)) as s:
        s._stop.wait(0.05)
    assert s.gpu_peak_mb == 1800.0 and gpu_peak(s, 1000.0) == {"gpu_peak_mb": 800.0}
    assert gpu_peak(RssSampler(), None) == {}
    roof = {"ceilings": {"fp32_gflop_s": 100.0, "int8_gop_s": 200.0, "mem_read_gb_s": 10.0},
            "vision": {"fp32": {"weight_gmac": 300.0, "attention_gmac": 50.0}},
            "llm": {"q4_0": {"image_prefill_gflop": 160.0, "question_prefill_gflop": 40.0,
                             "decode_mb_per_token": 100.0}}}
    cpu = {"kind": "edge", "device": "cpu", "vision": "fp32", "quant": "q4_0"}
    gpu = {**cpu, "device": "cuda"}
    roofline.attach_bounds(roof, [cpu, gpu])
    assert "bounds" in cpu and "bounds" not in gpu  # this CPU's ceilings do not bound a GPU's run


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
    # llama.cpp's own build, as its system info says: each feature recorded is one it reports as compiled in
    import llama_cpp

    system_info = llama_cpp.llama_print_system_info().decode()
    assert info["llama_cpu_build"] and all(f"{name} = 1" in system_info for name in info["llama_cpu_build"])
    assert report._llama_build({"llama_cpu_build": ["SSE3", "AVX2", "AVX512_VNNI", "OPENMP", "REPACK"]}) == \
        "AVX2, AVX512_VNNI"
    assert report._llama_build({}) == "not recorded"
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


def _answer(ttft: float, decode: float, n: int, question_prefill: float = 1.0):
    from facellm_edge.llm.generator import Answer

    return Answer(text="x" * n, token_ids=tuple(range(n)), n_prefilled=5, n_generated=n, stop_reason="length",
                  timings={"question_prefill": question_prefill, "ttft": ttft, "decode": decode},
                  tokens_per_s=(n - 1) / decode * 1000.0)


def test_edge_metrics_are_the_runtime_stages_and_sums_of_them():
    from facellm_edge.bench.edge import add_answer
    from facellm_edge.timings import cold_ttft

    face = {"detect": 10.0, "align": 2.0, "preprocess": 3.0, "encode": 40.0, "image_prefill": 25.0}
    ans, warm = _answer(ttft=6.0, decode=30.0, n=4, question_prefill=5.0), _answer(ttft=7.5, decode=1.0, n=2)
    timer = StageTimer()
    add_answer(timer, {**face, **ans.timings}, ans, warm)
    got = {k: v[0] for k, v in timer.samples.items()}
    assert got == {"detect_ms": 10.0, "align_ms": 2.0, "preprocess_ms": 3.0, "encode_ms": 40.0,
                   "image_prefill_ms": 25.0, "question_prefill_ms": 5.0, "ttft_ms": 6.0, "decode_ms": 30.0,
                   "ttft_cold_ms": 74.0, "ttft_warm_ms": 7.5, "decode_tok_s": 100.0, "end_to_end_ms": 116.0}
    assert got["ttft_cold_ms"] == cold_ttft({**face, **ans.timings})
    peer = StageTimer()  # libmtmd: no preprocess stage, its time is inside encode
    add_answer(peer, {k: v for k, v in {**face, **ans.timings}.items() if k != "preprocess"}, ans, warm)
    assert "preprocess_ms" not in peer.samples and peer.samples["ttft_cold_ms"] == [71.0]


def test_live_metrics_from_the_loops_records():
    from facellm_edge.bench.live import decode_rate, pick_winner, since_seen

    recs = [{"n_tokens": 5, "timings_ms": {"decode": 40.0}, "since_seen_ms": {"first_token": 100.0, "answer": 150.0}},
            {"n_tokens": 3, "timings_ms": {"decode": 10.0}, "since_seen_ms": {"first_token": 300.0, "answer": 320.0}},
            {"n_tokens": 2, "timings_ms": {"decode": 5.0}, "since_asked_ms": {"first_token": 1.0, "answer": 2.0}}]
    assert decode_rate(recs) == pytest.approx((4 + 2 + 1) / 55.0 * 1000.0, abs=0.01)  # tokens after the first
    assert decode_rate([{"n_tokens": 1, "timings_ms": {"decode": 0.0}}]) is None
    seen = since_seen(recs)  # first answers only: a follow-up's wait counts from its question, not the person
    assert seen["first_token"]["samples"] == [100.0, 300.0] and seen["answer"]["median"] == 235.0
    assert since_seen([]) is None

    def run(name: str, busy: bool, fps: float, p99: float, tok_s: float | None) -> dict:
        return {"name": name, "vlm_busy": busy, "fps": fps, "frame_ms": {"p99": p99}, "decode_tok_s": tok_s}

    idle = run("idle", False, 90.0, 10.0, None)
    assert pick_winner([idle, run("1", True, 30.0, 50.0, 20.0), run("2", True, 40.0, 60.0, 10.0)]) == "1"
    assert pick_winner([idle, run("1", True, 30.0, 90.0, 20.0), run("2", True, 26.0, 70.0, 10.0)]) == "2"
    assert pick_winner([idle, run("1", True, 12.0, 90.0, 20.0), run("2", True, 20.0, 95.0, 10.0)]) == "2"


def test_clip_source_holds_before_the_measured_frames_and_times_them():
    import threading

    from facellm_edge.bench.live import ClipSource, Records

    frames = [np.full((4, 4, 3), i, np.uint8) for i in range(5)]
    records = Records()
    seen: list[int] = []
    src = ClipSource(frames, "five", measure_from=2, hold=lambda: seen.append(len(records.items)))
    assert not src.live and src.measured == 3
    for frame in src:
        if frame.index == 1:
            threading.Timer(0.01, records, args=({"answer": "a"},)).start()
            assert records.wait_for(1, timeout_s=10.0)
    assert [f.index for f in src] == [0, 1, 2, 3, 4] and seen == [1, 1]  # hold ran once per pass, before frame 2
    assert 0 <= src.seconds and src.t_start <= src.t_end
    assert records.wait_for(2, timeout_s=0.01) is False
    with pytest.raises(ValueError):
        ClipSource(frames, "five", measure_from=5)


@pytest.mark.slow  # > 3 s: YuNet on every frame of two clips
def test_busy_clip_brings_new_people_for_the_runtimes_tracker(tmp_path, t1_bgr, yunet_model):
    """Each segment of the busy clip is a new track for the live loop's IouTracker (the previous one ends); the
    idle clip keeps one track. The --video path reads the clip back through the runtime's VideoFile."""
    import cv2

    from facellm_edge.bench.live import arrivals_clip, idle_clip, person_crops, person_side, video_frames
    from facellm_edge.runtime.detect import DetectorConfig, create_detector
    from facellm_edge.runtime.live.tracker import IouTracker, TrackerConfig

    detector = create_detector(DetectorConfig(model_path=yunet_model, n_threads=1))
    faces = sorted(detector.detect(t1_bgr), key=lambda f: -f.width * f.height)
    people = person_crops(t1_bgr, [f.box for f in faces], person_side(640, 480))
    assert len(people) == len(faces) >= 4 and all(p.shape == (288, 288, 3) for p in people)
    segment = TrackerConfig().max_missed + 5

    def tracks(frames: list[np.ndarray]) -> tuple[int, int]:
        tracker, ended = IouTracker(), 0
        for i, f in enumerate(frames):
            ended += len(tracker.update(detector.detect(f), i)[1])
        return tracker.started, ended

    busy = arrivals_clip(people, 2 * segment + 1, 640, 480, segment)  # the third person's first frame last
    assert all(f.shape == (480, 640, 3) for f in busy) and not np.array_equal(busy[0], busy[1])  # panned
    started, ended = tracks(busy)
    assert started >= 3 and ended >= 1  # three people arrived; the first one's track ended during the second's
    assert tracks(idle_clip(people[0], segment, 640, 480)) == (1, 0)
    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (640, 480))
    for f in busy[:8]:
        writer.write(f)
    writer.release()
    frames = video_frames(str(path), 12)  # 12 > 8 frames: repeated
    assert len(frames) == 12 and frames[0].shape == (480, 640, 3) and frames[8] is frames[0]
    with pytest.raises(InputError):
        video_frames(str(tmp_path / "missing.mp4"), 5)


@pytest.mark.slow
def test_live_bench_on_a_video_runs_the_real_loop(tmp_path, tiny_bundle, t1_bgr, yunet_model):
    """--video: the busy run is the video's frames, the idle run its first frame held; both through run_live."""
    import cv2
    import insightface

    from facellm_edge.bench.live import arrivals_clip, bench_live, live_payload, person_crops
    from facellm_edge.runtime.detect import DetectorConfig, create_detector

    faces = sorted(create_detector(DetectorConfig(model_path=yunet_model)).detect(t1_bgr),
                   key=lambda f: -f.width * f.height)
    clip = arrivals_clip(person_crops(t1_bgr, [f.box for f in faces[:2]], 200), 30, 480, 360, 20)
    path = tmp_path / "people.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (480, 360))
    for f in clip:
        writer.write(f)
    writer.release()
    photo = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    r = bench_live(live_payload(tiny_bundle, "fp32", "f32", photo, path, 30, 640, 480, (1,), 3, "Who is it?",
                                yunet_model, cores=2))
    assert (r["width"], r["height"], r["source"]) == (480, 360, "video people.mp4")
    idle, busy = r["runs"]
    assert idle["clip"] == "the video's first frame, held" and idle["settled"] and idle["answers_in_loop"] == 0
    # a file's clip: the loop waits for the worker at its end, so the person still in view is answered whatever the
    # speed; people who left before the worker was free may be dropped (the newest job wins)
    assert busy["vlm_busy"] and busy["tracks"] >= 2 and 1 <= busy["answers"] <= busy["tracks"]
    assert busy["frame_ms"]["n"] == idle["frame_ms"]["n"] == 30 and r["winner"] == busy["name"]
    assert r["kiosk"] is None  # a video has no single person arriving into an empty scene


def test_roofline_bounds_arithmetic():
    from facellm_edge.bench import roofline

    ceilings = {"fp32_gflop_s": 100.0, "int8_gop_s": 200.0, "mem_read_gb_s": 10.0}
    vision = {"weight_gmac": 300.0, "attention_gmac": 50.0}
    llm = {"image_prefill_gflop": 160.0, "question_prefill_gflop": 40.0, "decode_mb_per_token": 10e9 / 40 / 2**20}
    b = roofline.bounds(ceilings, vision, "int8", llm)
    assert b == {"encode_ms": 4000.0, "image_prefill_ms": 800.0, "question_prefill_ms": 200.0,
                 "ttft_cold_ms": 5000.0, "decode_tok_s": 40.0}
    assert roofline.bounds(ceilings, vision, "fp32", llm)["encode_ms"] == 7000.0
    # decode: the slower of reading the weights (40 tok/s) and llama.cpp's compute per token, when measured
    slow = {**llm, "llama": {"compute_ms_per_token": 50.0}}
    assert roofline.bounds(ceilings, vision, "int8", slow)["decode_tok_s"] == 20.0
    fast = {**llm, "llama": {"compute_ms_per_token": 10.0}}
    assert roofline.bounds(ceilings, vision, "int8", fast)["decode_tok_s"] == 40.0
    unmeasured = {**llm, "llama": {"compute_ms_per_token": 0.0}}  # no measurable difference: bandwidth only
    assert roofline.bounds(ceilings, vision, "int8", unmeasured)["decode_tok_s"] == 40.0


def test_bar_segments_split_each_path_by_its_own_stages():
    from facellm_edge.bench.report import NAIVE_PREFILL, QUESTION_TTFT, bar_segments

    def cfg(**medians: float) -> dict:
        return {"stages": {k: {"median": v} for k, v in medians.items()}}

    edge = bar_segments(cfg(detect_ms=1, align_ms=2, preprocess_ms=3, encode_ms=4, image_prefill_ms=5, ttft_ms=6,
                            ttft_cold_ms=18, decode_ms=7))
    assert edge == {"detect": 1, "align": 2, "preprocess": 3, "encode": 4, "image prefill": 5, QUESTION_TTFT: 6,
                    "decode": 7}
    naive = bar_segments(cfg(preprocess_ms=3, encode_ms=4, ttft_cold_ms=20, decode_ms=7))
    assert naive == {"detect": 0, "align": 0, "preprocess": 3, "encode": 4, NAIVE_PREFILL: 13, "decode": 7}


@pytest.mark.slow  # tiny_bundle
def test_kiosk_bench_times_one_visitor_through_the_real_loop(tiny_bundle, t1_bgr, yunet_model):
    """The kiosk run: run_live on a paced camera stand-in, an empty scene then one person; the answer's since-seen
    times come from the loop's own record, the frame loop's numbers from LiveStats."""
    import insightface

    from facellm_edge.bench.kiosk import bench_kiosk, kiosk_lines, policies

    assert policies((1, 2), 2) == [(k, e, d, 640) for k in (1, 2) for e in (1, 2) for d in (1, 3)] + [
        (2, 2, 0, 640), (2, 2, 3, 320)]  # 0: run's auto pace (every 3rd frame, every 6th while answering)
    assert policies((1,), 1) == [(1, 1, 1, 640), (1, 1, 3, 640), (1, 1, 0, 640), (1, 1, 3, 320)]
    assert policies((4,), 16) == [(4, e, d, 640) for e in (1, 16) for d in (1, 3)] + [(4, 16, 3, 320)]  # auto = 1
    photo = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    p = {"bundle": str(tiny_bundle), "vision": "fp32", "quant": "f32", "image": str(photo), "width": 320,
         "height": 240, "llama_threads": [1], "decode_tokens": 3, "question": "Who is it?",
         "detector_model": str(yunet_model)}
    k = bench_kiosk(p, t1_bgr, cores=1)
    run, strided, auto, small = k["runs"]
    assert [(r["llama_threads"], r["encoder_threads"], r["detect_every"], r["detect_size"]) for r in k["runs"]] == [
        (1, 1, 1, 640), (1, 1, 3, 640), (1, 1, 0, 640), (1, 1, 3, 320)]
    assert all(r["answered"] for r in k["runs"]) and k["best"] in {r["name"] for r in k["runs"]}
    assert "every 3 frames at 640 px" in strided["name"] and small["name"].endswith("at 320 px")
    assert "auto: every 3 frames, 6 while answering at 640 px" in auto["name"]
    assert k["default"] == auto["name"]  # 1 core: run's auto pace at 640 px
    seen = run["since_seen_ms"]
    assert run["visits"] == 1 and run["since_seen_samples"]["first_token"] == [pytest.approx(seen["first_token"],
                                                                                               abs=0.1)]
    assert 0 < seen["first_token"] <= seen["answer"]
    # the person arrives after the empty second: at least that many frames went through the loop before the answer
    assert run["frames"] >= 30 and run["frame_ms"]["n"] == run["frames"] and run["dropped_frames"] >= 0
    assert run["n_tokens"] == 3 and {"encode", "image_prefill", "ttft"} <= set(run["timings_ms"])
    # before the visit, the same frame answered with nothing else running: the visit's baseline, same process
    assert run["alone_samples"] == [run["alone_first_token_ms"]] and run["alone_first_token_ms"] > 0
    best = next(r for r in k["runs"] if r["name"] == k["best"])
    first = best["since_seen_ms"]["first_token"]
    best["alone_first_token_ms"] = first - 200  # 200 ms over the goal's 100
    late = "\n".join(kiosk_lines(k, cold_ttft_ms=1234.0))
    assert best["name"] in late and "+ 200 ms" in late and "goal ≤ the same frame answered alone + 100 ms: missed" in late
    assert "the stage bench's cold TTFT (another process): 1,234 ms" in late
    best["alone_first_token_ms"] = first
    assert "goal ≤ the same frame answered alone + 100 ms: met" in "\n".join(kiosk_lines(k, cold_ttft_ms=None))
    for r in k["runs"]:  # results written before the baseline existed: the goal against the stage bench's cold TTFT
        del r["alone_first_token_ms"], r["alone_samples"]
    late = "\n".join(kiosk_lines(k, cold_ttft_ms=first - 200))
    assert "+ 200 ms" in late and "goal ≤ cold TTFT + 100 ms: missed" in late
    assert "goal ≤ cold TTFT + 100 ms: met" in "\n".join(kiosk_lines(k, cold_ttft_ms=first))


@pytest.mark.slow
def test_a_failing_configuration_costs_only_its_own_rows(tmp_path, tiny_bundle, yunet_model, capsys):
    """A configuration failing in its own process (here the naive baseline, given a folder it cannot load as a
    checkpoint) costs its rows only: the edge rows are measured and written, the failure is named in the results and
    on stderr, and the run exits non-zero. On issue 15's GPU lease one crashing configuration lost every row."""
    import json

    from facellm_edge.cli import main

    broken = tmp_path / "not-a-checkpoint"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    out = tmp_path / "results"
    rc = main(["bench", "--bundle", str(tiny_bundle), "--checkpoint", str(broken), "--naive", "cpu-fp32",
               "--quant", "q8_0", "--vision", "int8", "--runs", "2", "--warmup", "0", "--decode-tokens", "2",
               "--threads", "1", "--detector-model", str(yunet_model), "--no-profiles", "--no-live", "--no-faces",
               "--no-roofline", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and "1 of 2 configurations failed" in err[-1] and "naive cpu-fp32" in err[-1]
    assert str(out) in err[-1]
    r = json.loads((out / "results.json").read_text())
    assert [c["name"] for c in r["configs"]] == ["edge int8+q8_0"] and r["configs"][0]["rounds"] == 2
    assert [f["name"] for f in r["failed"]] == ["naive cpu-fp32"] and r["ratios"] == []
    assert "**Failed**" in (out / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("stop_at, rounds", [("(round 2 of 2)", 1), ("many faces at once", 2)])
def test_a_stopped_bench_keeps_what_it_measured(tmp_path, tiny_bundle, yunet_model, stop_at, rounds):
    """SIGTERM in round 2 of 2, or after the rounds (in the many-faces stage): the run exits 143, and results.json
    holds every configuration's finished rounds, marked partial (a 28-minute run stopped at minute 25 lost
    everything); no temporary folder is left."""
    import json
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "results"
    code = ("import sys; from facellm_edge.cli import main; sys.exit(main(sys.argv[1:]))")
    args = ["bench", "--bundle", str(tiny_bundle), "--naive", "none", "--quant", "q8_0", "--vision", "int8",
            "--runs", "2", "--warmup", "0", "--decode-tokens", "2", "--threads", "1", "--detector-model",
            str(yunet_model), "--no-profiles", "--no-live", "--faces", "--no-roofline", "--out", str(out)]
    env = {**os.environ, "COLUMNS": "200", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if stop_at in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=300)[1]
    assert proc.returncode == 143, "".join(seen) + rest
    r = json.loads((out / "results.json").read_text())
    assert r["partial"] == {"rounds": {"edge int8+q8_0": rounds}, "of": 2,
                            "stopped": "interrupted (Ctrl-C or SIGTERM)"}
    assert [c["name"] for c in r["configs"]] == ["edge int8+q8_0"] and r["configs"][0]["rounds"] == rounds
    assert r["faces"] is None
    assert "**Partial**" in (out / "results.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no temporary folder left
