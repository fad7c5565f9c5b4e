"""Benchmark results: one JSON schema, a Markdown report and a stacked per-stage bar chart, written atomically.

``results.json`` (``schema`` = :data:`SCHEMA`)::

    schema, created, settings{...}, machine{...}, versions{...}, export{...} | null,
    configs: [ {name, kind: "naive" | "edge" | "peer", code_path, stages: {KEY: {median, p90, p99, min, max, n,
                samples}}, memory: {peak_rss_mb, rss_loaded_mb, ...}, load_ms, ...} ],
    ratios: [ {edge, baseline, ttft_cold, ttft_warm, decode, end_to_end, peak_rss} ]   (edge / naive, medians),
    profiles: [ {setting, metric, better: "lower" | "higher", options: {VALUE: {median, p90, ...}}, winner} ],
    live: {code_path, detect_every, detect_every_busy, source, width, height, frames, decode_tokens, runs: [ {name, llama_threads, vlm_busy, clip,
           fps, frames, frame_ms{median, p90, p99, ...}, faces_per_frame, tracks, answers, answers_in_loop,
           dropped_jobs, decode_tok_s, since_seen_ms{first_token{...}, answer{...}} | null, ...} ],
           winner, winner_rule, kiosk: {camera_fps, empty_s, clip, runs: [ {name, llama_threads, encoder_threads,
           detect_every, detect_size, answered, visits, fps, frames, dropped_frames, frame_ms{...}, since_seen_ms{first_token,
           answer} (medians), since_seen_samples, alone_first_token_ms (median), alone_samples, timings_ms{...},
           n_tokens, decode_tok_s} ], best,
           default} | null (bench/kiosk.py)} | null,
    roofline: {ceilings{mem_read_gb_s, fp32_gflop_s, int8_gop_s, ...}, vision{PREC: work}, llm{QUANT: work},
               image_tokens, question_tokens} | null   (edge configs then carry bounds{encode_ms, image_prefill_ms,
               question_prefill_ms, ttft_cold_ms, decode_tok_s}: the best this machine allows; bench/roofline.py)
    targets: [ {key, label, op, threshold, value, config, met, bound, reachable} ]

Stage keys (milliseconds unless the name ends in ``tok_s``): ``<stage>_ms`` for the stages of
:data:`facellm_edge.timings.STAGES` a path has (detect, align, preprocess, encode, image_prefill, question_prefill,
ttft, decode), then ttft_cold_ms (:func:`facellm_edge.timings.cold_ttft`), ttft_warm_ms (a follow-up question's
ttft), decode_tok_s (tokens after the first / decode) and end_to_end_ms (detect + align + ttft_cold + decode).
Schema 2 (these names) replaced schema 1 (vision_ms, prefill_ms: the names before ``facellm_edge.timings``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from facellm_edge.bench.config import TARGETS
from facellm_edge.bench.faces import faces_lines
from facellm_edge.bench.kiosk import kiosk_lines
from facellm_edge.io import OutputKind, atomic_directory, known_file_set

log = logging.getLogger(__name__)

SCHEMA = "facellm-edge-bench/2"
# --force replaces only bench results: ours carry the marker; older ones (written before the marker, all of
# schema 1) are recognised by their exact file set
BENCH = OutputKind("bench results", known_file_set({"results.json", "results.md", "stages.png"}, "results.json",
                                                   "facellm-edge-bench/1"))
TOP_KEYS = ("schema", "created", "settings", "machine", "versions", "export", "configs", "ratios", "profiles",
            "live", "faces", "roofline", "targets")
# Targets whose best possible value on this machine the roofline gives: target key -> (bound key, best is min?).
TARGET_BOUNDS = {"ttft_cold_ms": ("ttft_cold_ms", True), "decode_tok_s": ("decode_tok_s", False)}
NAIVE_PREFILL = "prefill + first token (transformers: inside generate)"
QUESTION_TTFT = "ttft (question prefill + first token)"
# Stacked bar segments (per-answer wall time), in pipeline order; see bar_segments.
BAR_LABELS = ("detect", "align", "preprocess", "encode", "image prefill", QUESTION_TTFT, NAIVE_PREFILL, "decode")
TABLE_COLUMNS = (("detect_ms", "detect"), ("align_ms", "align"), ("preprocess_ms", "preprocess"),
                 ("encode_ms", "encode"), ("image_prefill_ms", "image prefill"),
                 ("question_prefill_ms", "question prefill"), ("ttft_cold_ms", "TTFT cold"),
                 ("ttft_warm_ms", "TTFT warm"), ("decode_tok_s", "decode tok/s"), ("end_to_end_ms", "end-to-end"))


def median(cfg: dict[str, Any], stage: str) -> float | None:
    s = cfg.get("stages", {}).get(stage)
    return None if s is None else float(s["median"])


def bar_segments(cfg: dict[str, Any]) -> dict[str, float]:
    """Per-answer wall time split into stages (medians, pipeline order). A path without the runtime's image prefill
    and ttft (transformers: one ``generate`` call) gets cold TTFT - preprocess - encode as one segment."""
    out = {label: median(cfg, f"{stage}_ms") or 0.0 for stage, label in
           (("detect", "detect"), ("align", "align"), ("preprocess", "preprocess"), ("encode", "encode"))}
    if median(cfg, "image_prefill_ms") is not None:
        out["image prefill"] = median(cfg, "image_prefill_ms")
        out[QUESTION_TTFT] = median(cfg, "ttft_ms") or 0.0
    else:
        out[NAIVE_PREFILL] = max((median(cfg, "ttft_cold_ms") or 0.0) - out["preprocess"] - out["encode"], 0.0)
    out["decode"] = median(cfg, "decode_ms") or 0.0
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 3)


def compute_ratios(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """edge / naive for every (edge, naive) pair: < 1 is better for times and memory, > 1 for decode."""
    out = []
    for e in (c for c in configs if c["kind"] == "edge"):
        for n in (c for c in configs if c["kind"] == "naive"):
            out.append({
                "edge": e["name"], "baseline": n["name"],
                "ttft_cold": _ratio(median(e, "ttft_cold_ms"), median(n, "ttft_cold_ms")),
                "ttft_warm": _ratio(median(e, "ttft_warm_ms"), median(n, "ttft_warm_ms")),
                "decode": _ratio(median(e, "decode_tok_s"), median(n, "decode_tok_s")),
                "end_to_end": _ratio(median(e, "end_to_end_ms"), median(n, "end_to_end_ms")),
                "peak_rss": _ratio(e["memory"].get("peak_rss_mb"), n["memory"].get("peak_rss_mb")),
            })
    return out


def _met(op: str, value: float, threshold: float) -> bool:
    return {"<=": value <= threshold, "<": value < threshold, ">=": value >= threshold}[op]


def evaluate_targets(configs: list[dict[str, Any]], live: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each target against the best edge configuration (or the best busy live policy)."""
    edge = [c for c in configs if c["kind"] == "edge"]
    values: dict[str, list[tuple[float, str]]] = {k: [] for k in TARGETS}
    for c in edge:
        for key in ("ttft_cold_ms", "ttft_warm_ms", "decode_tok_s"):
            v = median(c, key)
            if v is not None:
                values[key].append((v, c["name"]))
        if c["memory"].get("peak_rss_mb") is not None:
            values["peak_rss_mb"].append((float(c["memory"]["peak_rss_mb"]), c["name"]))
    for run in (live or {}).get("runs", []):
        if run.get("vlm_busy"):
            values["live_fps_busy"].append((float(run["fps"]), run["name"]))
            values["live_p99_busy_ms"].append((float(run["frame_ms"]["p99"]), run["name"]))
    out = []
    for key, (op, threshold, label) in TARGETS.items():
        cands = values[key]
        if not cands:
            out.append({"key": key, "label": label, "op": op, "threshold": threshold, "value": None,
                        "config": None, "met": None})
            continue
        best = max(cands) if op == ">=" else min(cands)
        out.append({"key": key, "label": label, "op": op, "threshold": threshold, "value": round(best[0], 2),
                    "config": best[1], "met": _met(op, best[0], threshold), **_bound(key, op, threshold, edge)})
    return out


def _bound(key: str, op: str, threshold: float, edge: list[dict[str, Any]]) -> dict[str, Any]:
    """The best value any edge configuration could reach on this machine (roofline), and whether that meets it."""
    if key not in TARGET_BOUNDS:
        return {"bound": None, "reachable": None}
    name, lowest = TARGET_BOUNDS[key]
    vals = [c["bounds"][name] for c in edge if c.get("bounds")]
    if not vals:
        return {"bound": None, "reachable": None}
    b = min(vals) if lowest else max(vals)
    return {"bound": round(b, 1), "reachable": _met(op, b, threshold)}


# -- Markdown ------------------------------------------------------------------------------------------------

def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _cell(cfg: dict[str, Any], stage: str) -> str:
    s = cfg.get("stages", {}).get(stage)
    if s is None:
        return "–"
    return f"{_fmt(s['median'])} ({_fmt(s['p90'])})"


def _quality(c: dict[str, Any]) -> str:
    """Export verification against transformers: vision cosine (worst), LLM top-1 agreement and max rel. diff."""
    q = c.get("quality") or {}
    parts = []
    if q.get("vision_cosine") is not None:
        parts.append(f"vision cos {q['vision_cosine']:.4f}")
    if q.get("llm_top1") is not None:
        parts.append(f"top-1 {100 * q['llm_top1']:.1f} %, rel {q['llm_max_rel_diff']:.1e}")
    return ", ".join(parts) or "–"


def fidelity_note(random_weights: bool) -> str:
    """What the fidelity column is, and where quality is measured instead."""
    what = ("Fidelity: what the export's verification measured for these files against transformers (the vision "
            "encoder's worst token cosine; the GGUF's top-1 agreement and max relative logit difference on the real "
            "prompt). ")
    if random_weights:
        return what + ("**Numerical fidelity on random weights**: their logits are nearly flat, so top-1 agreement "
                       "falls fast with quantisation noise. It ranks the quants' noise; it is not answer quality. "
                       "For quality, run `facellm-edge eval compare` on a real checkpoint and its bundle.")
    return what + "For answer quality on a benchmark, run `facellm-edge eval compare`."


def _llama_build(m: dict[str, Any]) -> str:
    """llama.cpp's compiled-in CPU features, the SIMD ones only (results before they were recorded: "not recorded")."""
    built = m.get("llama_cpu_build")
    if built is None:
        return "not recorded"
    simd = [f for f in built if f.startswith(("AVX", "AMX", "F16C", "FMA", "NEON", "SVE", "DOTPROD", "MATMUL"))]
    return ", ".join(simd) or "no SIMD"


def to_markdown(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["settings"]
    flags = ", ".join(k for k, v in m.get("cpu_flags", {}).items() if v) or "none"
    gpus = ", ".join(f"{g['name']} ({g['memory']})" for g in m.get("gpus", [])) or "none"
    lines = [
        f"# facellm-edge bench — {s.get('model')}",
        "",
        f"{r['created']} · {m['cpu_model']} · {m['usable_cores']} cores · {m['ram_gb']} GB RAM · GPU: {gpus}",
        f"CPU features: {flags} · torch CPU kernels: {m.get('torch_cpu_capability')} · "
        f"llama.cpp CPU build: {_llama_build(m)} · "
        f"ORT providers: {', '.join(m.get('ort_providers', []))} · load at start: {m.get('load_avg_at_start')}",
        "",
        f"Medians (p90) over {s['runs']} runs after {s['warmup']} warm-up; {s['decode_tokens']} decoded tokens per "
        f"answer (end-of-sequence ignored); threads: {s['threads']}; question: \"{s['question']}\".",
        "",
        "Milliseconds unless tok/s. Stage names are the runtime's (`facellm_edge.timings`): TTFT cold = preprocess "
        "+ encode + image prefill + ttft (a new face), TTFT warm = a follow-up's ttft; end-to-end = detect + align + "
        "TTFT cold + decode.",
        "",
        "| config | " + " | ".join(h for _, h in TABLE_COLUMNS) + " | peak RSS MB | LLM bits/w | fidelity to transformers |",
        "|---|" + "---|" * (len(TABLE_COLUMNS) + 3),
    ]
    if r.get("partial"):  # stopped by Ctrl-C / SIGTERM: what the rounds done so far measured
        part = r["partial"]
        done = ", ".join(f"{name} {n}" for name, n in part["rounds"].items())
        lines[1:1] = ["", f"**Partial**: {part['stopped']}; rounds done of {part['of']}: {done}. The sections below "
                          "are what finished before the stop."]
    for c in r["configs"]:
        peak = c["memory"].get("peak_rss_mb")
        # GPU memory: NVML's count (every configuration on a GPU alike); older results: torch's allocated peak
        gpu = c["memory"].get("gpu_peak_mb", c["memory"].get("cuda_peak_allocated_mb"))
        mem = _fmt(peak, 0) + (f" (+{_fmt(gpu, 0)} GPU)" if gpu is not None else "")
        bpw = c.get("bits_per_weight")
        lines.append(f"| {c['name']} | " + " | ".join(_cell(c, k) for k, _ in TABLE_COLUMNS)
                     + f" | {mem} | {_fmt(bpw, 2) if bpw else '–'} | {_quality(c)} |")
    if r.get("failed"):
        lines += ["", "**Failed** (not measured; the rows above are complete without them):", ""]
        lines += [f"- {f['name']}: {f['error']}" for f in r["failed"]]
    if any(c.get("quality") for c in r["configs"]):
        lines += ["", fidelity_note(bool(s.get("random_weights")))]
    if r["ratios"]:
        lines += ["", "## Edge / naive (medians; < 1 is better except decode)", "",
                  "| edge | baseline | TTFT cold | TTFT warm | decode | end-to-end | peak RSS |",
                  "|---|---|---|---|---|---|---|"]
        for q in r["ratios"]:
            lines.append(f"| {q['edge']} | {q['baseline']} | {_fmt(q['ttft_cold'], 2)}× | {_fmt(q['ttft_warm'], 2)}× "
                         f"| {_fmt(q['decode'], 2)}× | {_fmt(q['end_to_end'], 2)}× | {_fmt(q['peak_rss'], 2)}× |")
    lines += ["", "## Targets", "",
              "| target | threshold | best | config | status | best possible here (roofline) |", "|---|---|---|---|---|---|"]
    for t in r["targets"]:
        status = "not measured" if t["met"] is None else ("**met**" if t["met"] else "**missed**")
        bound = t.get("bound")
        reach = "–" if bound is None else (f"{_fmt(bound)}: " + ("reachable" if t["reachable"] else
                                                                 "beyond this machine"))
        lines.append(f"| {t['label']} | {t['op']} {_fmt(t['threshold'], 0)} | {_fmt(t['value'])} | "
                     f"{t['config'] or '–'} | {status} | {reach} |")
    lines += _roofline_lines(r)
    if r.get("profiles"):
        lines += ["", "## Profiles", "", "| setting | metric | " + "options (median, p90) | winner |", "|---|---|---|---|"]
        for p in r["profiles"]:
            opts = "; ".join([f"{k}: {_fmt(v['median'])} ({_fmt(v['p90'])})" for k, v in p["options"].items()]
                             + [f"{k}: unsupported ({why})" for k, why in p.get("unsupported", {}).items()])
            lines.append(f"| {p['setting']} | {p['metric']} ({p['better']} is better) | {opts} | **{p['winner']}** |")
    lines += _live_lines(r.get("live"))
    lines += kiosk_lines((r.get("live") or {}).get("kiosk"), _cold_ttft(r["configs"], r.get("live")))
    lines += faces_lines(r.get("faces"))
    if r.get("export"):
        e = r["export"]
        lines += ["", f"Export of the synthetic model: {_fmt(e['seconds'])} s "
                  f"({', '.join(f'{k} {_fmt(v)} s' for k, v in e['steps'].items())}), "
                  f"peak RSS {_fmt(e.get('peak_rss_mb'), 0)} MB."]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), ""]
    return "\n".join(lines)


def _roofline_lines(r: dict[str, Any]) -> list[str]:
    roof = r.get("roofline")
    if not roof:
        return []
    c = roof["ceilings"]
    lines = ["", "## Roofline: measured vs the best this machine allows", "",
             f"Ceilings measured here with {c['threads']} threads: memory read {_fmt(c['mem_read_gb_s'])} GB/s, "
             f"ONNX Runtime fp32 MatMul {_fmt(c['fp32_gflop_s'])} GFLOP/s, int8 DynamicQuantizeMatMul "
             f"{_fmt(c['int8_gop_s'])} GOP/s ({' x '.join(map(str, c['gemm_shape']))}). "
             f"Prompt: {roof['image_tokens']} image-prefix + {roof['question_tokens']} question tokens.", ""]
    for prec, v in roof["vision"].items():
        lines.append(f"- encode {prec}: {_fmt(2 * v['weight_gmac'])} GOP in weight products + "
                     f"{_fmt(2 * v['attention_gmac'])} GFLOP attention ({v['tokens']} tokens)")
    for q, w in roof["llm"].items():
        lines.append(f"- LLM {q}: image prefill {_fmt(w['image_prefill_gflop'])} GFLOP, question prefill "
                     f"{_fmt(w['question_prefill_gflop'])} GFLOP; decode reads {_fmt(w['decode_mb_per_token'])} MB "
                     f"per token (output head {_fmt(w['head_mb'])} MB)")
        ll = w.get("llama")
        if ll:
            per_tok = ll["compute_ms_per_token"]
            lines.append(f"  - llama.cpp's own kernels on this file: prefill {_fmt(ll['prefill_gflop_s'])} GFLOP/s "
                         f"({ll['prefill_tokens']} positions in one call); a decoding step {_fmt(ll['step1_ms'])} ms "
                         f"for 1 sequence, {_fmt(ll['step8_ms'])} ms for 8 → compute {_fmt(per_tok)} ms per token"
                         + (f" (compute bound {_fmt(1000 / per_tok)} tok/s)" if per_tok > 0 else ""))
    cols = {"encode_ms": "encode ms", "image_prefill_ms": "image prefill ms",
            "question_prefill_ms": "question prefill ms", "ttft_cold_ms": "TTFT cold ms",
            "decode_tok_s": "decode tok/s"}
    keys = tuple(cols)
    lines += ["", "| config | " + " | ".join(f"{h} (bound)" for h in cols.values()) + " |",
              "|---|" + "---|" * len(keys)]
    for cfg in r["configs"]:
        b = cfg.get("bounds")
        if b:
            lines.append(f"| {cfg['name']} | " + " | ".join(f"{_fmt(median(cfg, k))} ({_fmt(b[k])})" for k in keys)
                         + " |")
    return lines


def _since(run: dict[str, Any], key: str) -> str:
    s = (run.get("since_seen_ms") or {}).get(key)
    return "–" if s is None else f"{_fmt(s['median'], 0)} / {_fmt(s['p90'], 0)}"


def _cold_ttft(configs: list[dict[str, Any]], live: dict[str, Any] | None) -> float | None:
    """Cold TTFT of the edge configuration the live loop ran (same vision and quant), measured alone."""
    for c in configs:
        if live and c["kind"] == "edge" and (c.get("vision"), c.get("quant")) == (live["vision"], live["quant"]):
            return median(c, "ttft_cold_ms")
    return None


def _live_lines(live: dict[str, Any] | None) -> list[str]:
    if not live:
        return []
    lines = ["", f"## Live loop ({live['source']}, {live['width']}x{live['height']}, {live['frames']} measured "
             f"frames per run" + (f"; {live['config']}" if live.get("config") else "") + ")", "",
             f"Every run is `{live['code_path']}`"
             + (f", the detector on every {live['detect_every']} frames"
                + (f" and every {live['detect_every_busy']} while the worker answers"
                   if live.get("detect_every_busy", live["detect_every"]) != live["detect_every"] else "")
                + " (run's default here)" if live.get("detect_every", 1) > 1 else "")
             + f". Answers: {live['decode_tokens']} tokens each; in loop = complete "
             "before the clip ended. Since seen: ms from a person's first frame to the answer's first token / to the "
             "whole answer (p50 / p90).", "",
             "| run | clip | FPS | frame p50 / p90 / p99 ms | tracks | answers (in loop) | decode tok/s | "
             "first token since seen | answer since seen |", "|---|---|---|---|---|---|---|---|---|"]
    for run in live["runs"]:
        f = run["frame_ms"]
        lines.append(f"| {run['name']} | {run['clip']} | {_fmt(run['fps'])} | {_fmt(f['median'])} / {_fmt(f['p90'])} "
                     f"/ {_fmt(f['p99'])} | {run['tracks']} | {run['answers']} ({run['answers_in_loop']}) | "
                     f"{_fmt(run.get('decode_tok_s'))} | {_since(run, 'first_token')} | {_since(run, 'answer')} |")
    idle = next((run for run in live["runs"] if not run["vlm_busy"]), None)
    if idle is not None:
        lines.append(f"\nIdle: the {idle['answered_before']} face(s) of the clip's first frame were answered before "
                     "the measured frames began (the worker then waits)"
                     + ("." if idle["settled"] else "; **they were not all answered in time**."))
    lines.append(f"\nThread policy that won while the VLM is busy: **{live['winner']}** ({live['winner_rule']})")
    return lines


# -- plot ----------------------------------------------------------------------------------------------------

def plot_stages(r: dict[str, Any], path: Path) -> None:
    """Horizontal stacked bars: per-answer wall time of each stage (medians), one bar per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = r["configs"]
    fig, ax = plt.subplots(figsize=(13, 1.6 + 0.55 * max(len(configs), 1)))
    names = [c["name"] for c in configs]
    segments = [bar_segments(c) for c in configs]
    left = [0.0] * len(configs)
    for label in BAR_LABELS:
        widths = [seg.get(label, 0.0) for seg in segments]
        if not any(widths):
            continue
        ax.barh(names, widths, left=left, label=label)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel(f"ms per face answer ({r['settings']['decode_tokens']} tokens), medians")
    ax.set_title(f"facellm-edge bench — {r['settings'].get('model')} — {r['machine']['cpu_model']}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the bars, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(r: dict[str, Any], out: Path, *, force: bool) -> Path:
    """Write results.json, results.md and stages.png into ``out`` atomically (all or nothing)."""
    missing = [k for k in TOP_KEYS if k not in r]
    if missing:
        raise ValueError(f"results lack keys {missing}")
    with atomic_directory(Path(out), force=force, kind=BENCH) as tmp:
        (tmp / "results.json").write_text(json.dumps(r, indent=2) + "\n", encoding="utf-8")
        (tmp / "results.md").write_text(to_markdown(r), encoding="utf-8")
        plot_stages(r, tmp / "stages.png")
    log.info("wrote %s/results.{json,md} and stages.png", out)
    return Path(out)
