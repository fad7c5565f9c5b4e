"""``facellm-edge bench --serve``: the serve benchmark on the tiny bundle with tiny counts (the structure of its
results, not the speed), its camera stand-in, and what it refuses before any work."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from facellm_edge.bench.live import PacedClip
from facellm_edge.bench.serve import SCHEMA, ServeBenchConfig, run_serve_bench
from facellm_edge.errors import UsageError
from facellm_edge.io import MARKER


def test_paced_clip_numbers_frames_by_the_clock_and_skips_what_a_slow_loop_missed():
    drawn: list[int] = []

    def draw(i: int) -> np.ndarray:
        drawn.append(i)
        return np.full((4, 4, 3), i % 256, np.uint8)

    clip = PacedClip(draw, fps=10.0, description="test camera")
    assert clip.live and clip.fps == 10.0
    frames = iter(clip)
    first = [next(frames).index for _ in range(3)]
    assert first == [0, 1, 2]  # a loop that keeps up gets every frame, in order
    time.sleep(0.5)  # a slow frame: about 5 frames go by meanwhile
    late = next(frames)
    assert late.index >= first[-1] + 3 and late.image[0, 0, 0] == late.index  # the newest one, drawn for it
    assert drawn == [0, 1, 2, late.index]  # the missed frames are never drawn
    assert clip.handed == 4 and clip.dropped == late.index - 3  # frames 3 .. late.index - 1 never reached the loop
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.extend(f.index for f in frames))
    reader.start()
    time.sleep(0.35)
    clip.close()  # ends the iteration of a waiting reader
    reader.join(5)
    assert not reader.is_alive() and got and got == sorted(set(got)) and got[0] > late.index


def test_config_refuses_what_it_cannot_measure(tmp_path):
    with pytest.raises(UsageError, match="exactly one of"):
        ServeBenchConfig(out=tmp_path)
    with pytest.raises(UsageError, match="one quant"):
        ServeBenchConfig(bundle=tmp_path, quant="q4_0,q8_0")
    with pytest.raises(UsageError, match="concurrency"):
        ServeBenchConfig(bundle=tmp_path, concurrency=(1, 0))
    with pytest.raises(UsageError, match=">= 1"):
        ServeBenchConfig(bundle=tmp_path, requests_per_client=0)


def test_cli_refuses_before_any_work(tmp_path, capsys):
    from facellm_edge.cli import main

    rc = main(["bench", "--serve", "--synthetic", "tiny", "--quant", "f16,q8_0", "--out", str(tmp_path / "o")])
    assert rc == UsageError.exit_code and "--serve measures one quant" in capsys.readouterr().err
    rc = main(["bench", "--serve", "--synthetic", "facellm-99b", "--out", str(tmp_path / "o")])
    assert rc == UsageError.exit_code and "facellm-99b" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    rc = main(["bench", "--serve", "--synthetic", "tiny", "--out", str(tmp_path / "mine"), "--force"])
    assert rc == 4 and "is not serve bench results written by facellm-edge" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"] and not (tmp_path / "o").exists()


@pytest.mark.slow  # tiny_bundle, a server, the live loop
def test_serve_bench_on_the_tiny_bundle(tiny_bundle, yunet_model, photos, tmp_path):
    out = tmp_path / "serve"
    cfg = ServeBenchConfig(bundle=tiny_bundle, out=out, quant="f32", image=photos["astronaut"],
                           detector_model=yunet_model, runs=2, warmup=1, decode_tokens=3, concurrency=(1, 3),
                           requests_per_client=2, live_clients=2, live_window_s=1.0)
    assert run_serve_bench(cfg) == out
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "results.json", "results.md"])
    r = json.loads((out / "results.json").read_text())
    assert r["schema"] == SCHEMA and {"machine", "versions", "created", "memory", "wall_s"} <= set(r)
    s = r["settings"]
    assert (s["quant"], s["concurrency"], s["max_queue"], s["decode_tokens"]) == ("f32", [1, 3], 3, 3)
    assert r["loaded"]["quant"] == "f32" and r["loaded"]["vision"] in ("fp32", "int8")

    o = r["overhead"]
    for path in ("in_process", "server"):
        ttft, e2e = o[path]["ttft_ms"], o[path]["end_to_end_ms"]
        assert ttft["n"] == e2e["n"] == 2  # the warm-up pair is not measured
        assert all(0 < a <= b for a, b in zip(ttft["samples"], e2e["samples"]))  # first piece before the last
    for key, stage in (("ttft", "ttft_ms"), ("end_to_end", "end_to_end_ms")):
        assert o["ratio"][key] == pytest.approx(o["server"][stage]["median"] / o["in_process"][stage]["median"],
                                                rel=1e-3)
        assert o["met"][key] == (o["ratio"][key] <= o["goal"] == 1.05)

    assert [x["clients"] for x in r["load"]] == [1, 3]
    for x in r["load"]:  # a queue as deep as the most clients: every request is served
        assert x["requests"] == x["served"] == 2 * x["clients"] and x["statuses"] == {"200": x["requests"]}
        assert x["latency_ms"]["n"] == x["served"] and x["requests_per_s"] > 0
        assert x["ttft_ms"]["median"] <= x["latency_ms"]["median"]

    live = r["live"]
    assert live["camera_fps"] == 30.0 and "astronaut" in live["source"]
    assert live["alone"]["frames"] > 0 and live["alone"]["seconds"] >= 1.0
    assert live["serving"]["frames"] > 0 and live["serving"]["load"]["served"] == 4  # the loop ran while serving
    assert r["memory"]["peak_rss_mb"] >= r["loaded"]["rss_loaded_mb"] > 0

    md = (out / "results.md").read_text()
    for heading in ("## Serve overhead", "## Concurrent clients", "## Frame loop"):
        assert heading in md
    assert "| 3 | 6 / 6 | 200: 6 |" in md
