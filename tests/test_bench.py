"""`facellm-edge bench` end to end on a tiny random-weight model built with --synthetic tiny (real architectures,
real photo, real exporter, real runtime: FaceLLM and run_live). Runs once per module; no test asserts a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facellm_edge.bench import report, roofline
from facellm_edge.io import MARKER
from facellm_edge.timings import STAGES

pytestmark = pytest.mark.slow

DERIVED = {"ttft_cold_ms", "ttft_warm_ms", "decode_tok_s", "end_to_end_ms"}
STAGES_EDGE = {f"{s}_ms" for s in STAGES} | DERIVED  # every runtime stage, under its facellm_edge.timings name
STAGES_PEER = STAGES_EDGE - {"preprocess_ms"}  # libmtmd preprocesses inside its encode
STAGES_NAIVE = {"preprocess_ms", "encode_ms", "decode_ms"} | DERIVED  # transformers: prefill inside generate
DECODE_TOKENS = 4
LIVE_FRAMES = 45  # > 2 segments of the busy clip: at least 3 people arrive


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, qwen_tokenizer_dir, yunet_model):
    from facellm_edge.cli import main

    out = tmp_path_factory.mktemp("bench") / "results"
    rc = main(["bench", "--synthetic", "tiny", "--tokenizer", str(qwen_tokenizer_dir), "--quant", "f32",
               "--vision", "fp32,mmproj", "--naive", "cpu-fp32", "--runs", "2", "--warmup", "0",
               "--decode-tokens", str(DECODE_TOKENS), "--threads", "1", "--detector-model", str(yunet_model),
               "--live-frames", str(LIVE_FRAMES), "--out", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def results(bench_run) -> dict:
    return json.loads((bench_run / "results.json").read_text())


def test_writes_exactly_the_three_outputs(bench_run):
    assert sorted(p.name for p in bench_run.iterdir()) == [MARKER, "results.json", "results.md", "stages.png"]
    assert not list(bench_run.parent.glob(".results.tmp-*"))  # atomic: no temporary left behind


def test_json_schema(results):
    assert results["schema"] == report.SCHEMA
    assert set(report.TOP_KEYS) <= set(results)
    s = results["settings"]
    assert (s["runs"], s["warmup"], s["decode_tokens"], s["threads"]) == (2, 0, DECODE_TOKENS, 1)
    assert s["quants"] == ["f32"] and s["vision"] == ["fp32", "mmproj"] and s["naive"] == ["cpu-fp32"]
    assert results["machine"]["usable_cores"] >= 1 and "onnxruntime" in results["versions"]
    assert "build checkpoint" in results["export"]["steps"] and results["export"]["peak_rss_mb"] > 0
    by_kind = {c["kind"]: c for c in results["configs"]}
    assert set(by_kind) == {"naive", "edge", "peer"}
    assert set(by_kind["edge"]["stages"]) == STAGES_EDGE
    assert set(by_kind["peer"]["stages"]) == STAGES_PEER
    assert set(by_kind["naive"]["stages"]) == STAGES_NAIVE
    for c in results["configs"]:
        for stat in c["stages"].values():
            assert stat["n"] == 2 and stat["min"] <= stat["median"] <= stat["p90"] <= stat["max"]
        assert c["memory"]["peak_rss_mb"] >= c["memory"]["rss_loaded_mb"] > 0


def test_configurations_run_round_robin(results):
    """Each configuration's rounds are fresh processes interleaved with the others' (naive, edge, peer, naive, ...):
    a machine that drifts during the run shifts them all alike."""
    configs = results["configs"]
    assert [c["rounds"] for c in configs] == [2] * len(configs)
    starts = sorted((t, r, c["name"]) for c in configs for r, t in enumerate(c["round_starts"]))
    assert [r for _, r, _ in starts] == [0] * len(configs) + [1] * len(configs)
    assert [n for _, _, n in starts[:len(configs)]] == [n for _, _, n in starts[len(configs):]]


def test_edge_answer_is_the_real_pipeline(results):
    edge = next(c for c in results["configs"] if c["kind"] == "edge")
    # prefix = template tokens + <img> + 256 image embeddings + </img> + ...: more than the image tokens alone
    assert edge["image_prefix_tokens"] > 256
    assert edge["question_tokens"] > 1 and edge["followup_tokens"] > 1
    assert edge["providers"] == ["CPUExecutionProvider"]
    assert edge["imports_torch"] is False  # its peak RSS is the runtime's alone
    assert edge["code_path"].startswith("FaceLLM.detect")
    for c in results["configs"]:
        if c["kind"] != "naive":  # derived metrics are sums of the runtime's own stages, run by run
            st = {k: v["samples"] for k, v in c["stages"].items()}
            for i in range(2):
                cold = sum(st[k][i] for k in ("preprocess_ms", "encode_ms", "image_prefill_ms", "ttft_ms") if k in st)
                assert st["ttft_cold_ms"][i] == pytest.approx(cold, abs=0.01)
                assert st["end_to_end_ms"][i] == pytest.approx(
                    st["detect_ms"][i] + st["align_ms"][i] + cold + st["decode_ms"][i], abs=0.01)
                # one measurement, not two speeds compared: both start at the question on one clock, and ttft ends
                # at the first sample, which comes after the prefill (llm/generator.py)
                assert st["ttft_ms"][i] >= st["question_prefill_ms"][i]
    naive = next(c for c in results["configs"] if c["kind"] == "naive")
    assert naive["prompt_tokens"] > 256  # one 448 px tile of the aligned face


def test_quality_comes_from_the_verified_synthetic_export(results, bench_run):
    by_kind = {c["kind"]: c for c in results["configs"]}
    edge, peer = by_kind["edge"], by_kind["peer"]
    assert "verify" in results["export"]["steps"]
    assert edge["quality"]["llm_top1"] >= 0.99 and edge["quality"]["vision_cosine"] > 0.9999  # f32 GGUF, fp32 ONNX
    assert peer["quality"]["vision_cosine"] > 0.999 and peer["quality"]["llm_top1"] == edge["quality"]["llm_top1"]
    md = (bench_run / "results.md").read_text()
    assert f"top-1 {100 * edge['quality']['llm_top1']:.1f} %" in md and results["settings"]["random_weights"]
    # random weights: the column says what it measures, and where answer quality is measured instead
    assert "| fidelity to transformers |" in md and "Numerical fidelity on random weights" in md
    assert "eval compare" in md


def test_peer_is_llama_cpp_own_chat_path_on_the_same_files(results):
    edge = next(c for c in results["configs"] if c["kind"] == "edge")
    peer = next(c for c in results["configs"] if c["kind"] == "peer")
    assert peer["vision"] == "mmproj" and peer["quant"] == edge["quant"]
    assert peer["providers"] == ["llama.cpp libmtmd (CPU)"] and peer["imports_torch"] is False
    assert "MtmdChat" in peer["code_path"]  # llama.cpp's own chat path, not the runtime's Generator
    # the same first turn (libmtmd splits it at the image: its question chunk starts with </img>)
    assert peer["image_prefix_tokens"] + peer["question_tokens"] == edge["image_prefix_tokens"] + edge["question_tokens"]
    assert peer["followup_tokens"] == edge["followup_tokens"]
    assert peer["stages"]["encode_ms"]["median"] > 0 and peer["files_mb"]["vision"] > 0
    assert "bounds" not in peer  # not an edge configuration: no targets, ratios or roofline rows
    assert all(r["edge"] != peer["name"] for r in results["ratios"])


def test_ratios_are_edge_over_naive(results):
    edge = next(c for c in results["configs"] if c["kind"] == "edge")
    naive = next(c for c in results["configs"] if c["kind"] == "naive")
    (r,) = results["ratios"]
    assert (r["edge"], r["baseline"]) == (edge["name"], naive["name"])
    assert r["ttft_cold"] == pytest.approx(edge["stages"]["ttft_cold_ms"]["median"]
                                           / naive["stages"]["ttft_cold_ms"]["median"], abs=1e-3)
    assert r["peak_rss"] == pytest.approx(edge["memory"]["peak_rss_mb"] / naive["memory"]["peak_rss_mb"], abs=1e-3)


def test_targets_profiles_and_live(results):
    keys = {t["key"] for t in results["targets"]}
    assert keys == {"ttft_cold_ms", "ttft_warm_ms", "decode_tok_s", "peak_rss_mb", "live_fps_busy",
                    "live_p99_busy_ms"}
    for t in results["targets"]:
        assert t["met"] is not None and t["met"] == report._met(t["op"], t["value"], t["threshold"])
    settings = {p["setting"].split(" (")[0]: p for p in results["profiles"]}
    assert {"llama.cpp threads", "ORT threads", "ORT graph optimisation", "faces per encoder call",
            "GGUF KV-cache type"} <= set(settings)
    for p in results["profiles"]:
        assert p["winner"] in p["options"]
    assert set(settings["ORT graph optimisation"]["options"]) == {"basic", "extended", "all"}
    assert len(settings["faces per encoder call"]["options"]) == 2  # t1.jpg: all faces batched vs one by one


def test_live_runs_the_real_loop_idle_and_busy(results):
    live = results["live"]
    assert live["code_path"].startswith("facellm_edge.runtime.live.loop.run_live")
    assert [(r["vlm_busy"], r["llama_threads"]) for r in live["runs"]] == [(False, 1), (True, 1), (True, 2)]
    assert live["winner"] in {r["name"] for r in live["runs"] if r["vlm_busy"]}
    for r in live["runs"]:
        assert r["frames"] == LIVE_FRAMES and r["frame_ms"]["n"] == LIVE_FRAMES and r["fps"] > 0
        assert r["faces_per_frame"] > 0 and r["answers_in_loop"] <= r["answers"]
    idle, *busy = live["runs"]
    # idle: the staying person was answered before the measured frames; nobody new came
    assert idle["settled"] and idle["answered_before"] == idle["answers"] == idle["tracks"] >= 1
    assert idle["answers_in_loop"] == 0 and idle["since_seen_ms"] is None
    for r in busy:
        assert r["tracks"] >= 3  # a new person every segment: new tracks for the real worker
        assert 1 <= r["answers"] <= r["tracks"] and r["decode_tok_s"] > 0
        seen = r["since_seen_ms"]
        assert seen["first_token"]["n"] == seen["answer"]["n"] == r["answers"]
        assert all(f <= a for f, a in zip(seen["first_token"]["samples"], seen["answer"]["samples"]))
    kiosk = live["kiosk"]  # --runs visitors per thread policy (--threads 1: one encoder thread), same real loop
    assert all(r["visits"] == 2 and len(r["since_seen_samples"]["first_token"]) == 2 for r in kiosk["runs"])
    assert all(len(r["alone_samples"]) == 2 and r["alone_first_token_ms"] > 0 for r in kiosk["runs"])  # a baseline
    # per visit
    assert [(r["llama_threads"], r["encoder_threads"], r["detect_every"], r["detect_size"]) for r in kiosk["runs"]] == [
        (1, 1, 1, 640), (1, 1, 3, 640), (2, 1, 1, 640), (2, 1, 3, 640), (2, 1, 0, 640), (2, 1, 3, 320)]
    assert all(r["answered"] and r["since_seen_ms"]["first_token"] <= r["since_seen_ms"]["answer"]
               for r in kiosk["runs"])
    assert kiosk["best"] in {r["name"] for r in kiosk["runs"]} and kiosk["clip"] == "the largest face of t1.jpg arriving"


def test_markdown_and_png(bench_run, results):
    md = (bench_run / "results.md").read_text()
    for c in results["configs"]:
        assert f"| {c['name']} |" in md
    assert "## Targets" in md and "## Profiles" in md and "## Live loop" in md and "## Kiosk" in md and "Edge / naive" in md
    assert "issue" not in md.lower()  # no tracker words in shipped results
    assert "run_live" in md and "facellm_edge.timings" in md
    live = results["live"]  # run's auto detection pace on this machine, as the live runs used it
    if live["detect_every_busy"] != live["detect_every"]:
        assert f"every {live['detect_every_busy']} while the worker answers" in md
    assert md.count("**met**") + md.count("**missed**") == len(results["targets"])
    import matplotlib.image

    png = matplotlib.image.imread(str(bench_run / "stages.png"))
    assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 400
    assert png[..., :3].std() > 0.05  # bars were drawn, not a blank canvas


def test_results_hold_no_pixels_or_paths_to_faces(results, bench_run):
    text = (bench_run / "results.json").read_text()
    assert "face.png" not in text and "/tmp" not in json.dumps(results["settings"])
    assert Path(results["settings"]["image"]).name == results["settings"]["image"]


def test_targets_without_live_or_edge_are_not_measured(results):
    live_less = report.evaluate_targets(results["configs"], None)
    status = {t["key"]: t["met"] for t in live_less}
    assert status["live_fps_busy"] is None and status["live_p99_busy_ms"] is None
    assert status["ttft_cold_ms"] is not None
    naive_only = [c for c in results["configs"] if c["kind"] == "naive"]
    assert all(t["met"] is None for t in report.evaluate_targets(naive_only, None))
    assert report.compute_ratios(naive_only) == []
    md = report.to_markdown({**results, "targets": live_less, "live": None, "profiles": []})
    assert md.count("not measured") == 2 and "## Live loop" not in md


def test_roofline_bounds_every_edge_configuration(results, bench_run):
    roof = results["roofline"]
    c = roof["ceilings"]
    assert c["threads"] == 1 and c["mem_read_gb_s"] > 0 and c["fp32_gflop_s"] > 0 and c["int8_gop_s"] > 0
    edge = next(x for x in results["configs"] if x["kind"] == "edge")
    assert (roof["image_tokens"], roof["question_tokens"]) == (edge["image_prefix_tokens"], edge["question_tokens"])
    assert edge["bounds"] == roofline.bounds(c, roof["vision"]["fp32"], "fp32", roof["llm"]["f32"])
    ll = roof["llm"]["f32"]["llama"]  # llama.cpp's own kernels on the bundle's GGUF
    assert ll["prefill_tokens"] == roof["image_tokens"] and ll["prefill_s"] > 0 and ll["prefill_gflop_s"] > 0
    assert ll["step8_ms"] > 0 and ll["step1_ms"] > 0 and ll["compute_ms_per_token"] >= 0
    by_key = {t["key"]: t for t in results["targets"]}
    assert by_key["decode_tok_s"]["bound"] == edge["bounds"]["decode_tok_s"]
    assert by_key["ttft_cold_ms"]["bound"] == edge["bounds"]["ttft_cold_ms"]
    assert by_key["peak_rss_mb"]["bound"] is None
    md = (bench_run / "results.md").read_text()
    assert "## Roofline" in md and f"| {edge['name']} |" in md.split("## Roofline")[1]
    assert "llama.cpp's own kernels on this file: prefill" in md


def test_roofline_work_counts_the_tiny_model_by_hand(tiny_bundle):
    """Vision MACs and decode bytes from the files equal a count from the tiny model's dimensions."""
    from facellm_edge.bundle import load_bundle
    from facellm_edge.export.quantize import read_tensor_infos
    from facellm_edge.export.synthetic import SyntheticSpec

    b = load_bundle(tiny_bundle)
    s, a = SyntheticSpec(), b.manifest.arch
    tokens = (s.image_size // s.patch_size) ** 2 + 1
    hv, inter, ht = s.vision_hidden, s.vision_intermediate, s.text_hidden
    # vision_hidden == text_hidden (64) in the tiny model: every matrix counts on all tokens, projector included
    per_token = s.vision_layers * (4 * hv * hv + 2 * hv * inter) + (4 * hv) * ht + ht * ht
    patch = hv * 3 * s.patch_size ** 2 * (tokens - 1)
    v = roofline.vision_work(b.vision_file("fp32")[1], image_size=s.image_size, patch_size=s.patch_size,
                             vision_hidden=hv, vision_layers=s.vision_layers, llm_hidden=ht,
                             num_image_tokens=b.manifest.tokens.num_image_tokens)
    assert v["tokens"] == tokens
    assert v["weight_gmac"] * 1e9 == pytest.approx(tokens * per_token + patch, rel=1e-9)
    assert v["attention_gmac"] * 1e9 == pytest.approx(2 * tokens * tokens * hv * s.vision_layers)
    gguf = b.llm_file("q8_0")[1]
    w = roofline.llm_work(gguf, image_tokens=280, question_tokens=20,
                          kv_dim=a.llm_hidden // a.llm_heads * a.llm_kv_heads, n_layers=a.llm_layers)
    mats = [t for t in read_tensor_infos(gguf) if len(t.shape) >= 2]
    kv = 2 * a.llm_layers * 300 * (ht // s.text_heads * s.text_kv_heads) * 2
    assert w["decode_mb_per_token"] * 2**20 == pytest.approx(sum(t.n_bytes for t in mats) + kv)
    assert "output.weight" not in {t.name for t in mats}  # tied: the embedding is read once, as the head
    body = s.text_layers * (ht * ht * 2 + 2 * ht * (ht // s.text_heads * s.text_kv_heads) + 3 * ht * s.text_intermediate)
    assert w["image_prefill_gflop"] * 1e9 == pytest.approx(2 * 280 * body, rel=1e-6)
    assert w["question_prefill_gflop"] * 1e9 == pytest.approx(2 * 20 * body + 2 * a.vocab_size * ht, rel=1e-6)


def test_many_faces_one_after_another_and_together(results, bench_run):
    """t1.jpg's faces answered one after another vs together (facellm_edge.bench.faces), with the runtime's calls."""
    faces = results["faces"]
    assert faces["faces_in_photo"] == 6 and [r["faces"] for r in faces["counts"]] == [1, 2, 4, 6]
    for r in faces["counts"]:
        t, s = r["together"], r["one_after_another"]
        assert t["tokens"] == r["faces"] * DECODE_TOKENS  # every face answered in full (stop_at_eos off)
        assert r["ratio_total"] == pytest.approx(t["total_ms"] / s["total_ms"])
        assert r["ratio_llm"] == pytest.approx(t["llm_ms"] / s["llm_ms"])
        assert t["decode_tok_s"] > 0 and t["all_first_token_ms"] > t["vision_ms"] > 0
    assert "## Many faces at once (6 faces in the photo" in (bench_run / "results.md").read_text()


def test_gpu_rows_render_their_gpu_memory(results):
    """A GPU row (bench --device cuda) shows NVML's GPU memory beside its RSS; CPU rows show none."""
    import copy

    edge = next(c for c in results["configs"] if c["kind"] == "edge")
    gpu = copy.deepcopy(edge)
    gpu.update(name="edge cuda fp32+f32", device="cuda")
    gpu["memory"]["gpu_peak_mb"] = 812.4
    md = report.to_markdown({**results, "configs": [edge, gpu]})
    row = next(line for line in md.splitlines() if line.startswith("| edge cuda fp32+f32 |"))
    assert "(+812 GPU)" in row
    cpu_row = next(line for line in md.splitlines() if line.startswith(f"| {edge['name']} |"))
    assert "GPU)" not in cpu_row
