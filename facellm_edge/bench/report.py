"""Benchmark results: one JSON schema, a Markdown report and a stacked per-stage bar chart, written atomically.

``results.json`` (``schema`` = :data:`SCHEMA`)::

    schema, created, settings{...}, machine{...}, versions{...}, export{...} | null,
    configs: [ {name, kind: "naive" | "edge", stages: {STAGE: {median, p90, p99, min, max, n, samples}},
                memory: {peak_rss_mb, rss_loaded_mb, ...}, load_ms, ...} ],
    ratios: [ {edge, baseline, ttft_cold, ttft_warm, decode, end_to_end, peak_rss} ]   (edge / naive, medians),
    profiles: [ {setting, metric, better: "lower" | "higher", options: {VALUE: {median, p90, ...}}, winner} ],
    live: {source, width, height, frames, runs: [...], winner} | null,
    roofline: {ceilings{mem_read_gb_s, fp32_gflop_s, int8_gop_s, ...}, vision{PREC: work}, llm{QUANT: work},
               prompt_tokens} | null      (edge configs then carry bounds{vision_ms, prefill_ms, ttft_cold_ms,
                                            decode_tok_s}: the best this machine allows; see bench/roofline.py)
    targets: [ {key, label, op, threshold, value, config, met, bound, reachable} ]

Stage keys (milliseconds unless the name ends in ``tok_s``): detect_ms, align_ms, preprocess_ms, vision_ms,
image_prefill_ms, prefill_ms, ttft_cold_ms, ttft_warm_ms, decode_tok_s, decode_ms, end_to_end_ms.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from facellm_edge.bench.config import TARGETS
from facellm_edge.io import OutputKind, atomic_directory, known_file_set

log = logging.getLogger(__name__)

SCHEMA = "facellm-edge-bench/1"
# --force replaces only bench results: ours carry the marker; older ones are recognised by their exact file set
BENCH = OutputKind("bench results", known_file_set({"results.json", "results.md", "stages.png"}, "results.json", SCHEMA))
TOP_KEYS = ("schema", "created", "settings", "machine", "versions", "export", "configs", "ratios", "profiles",
            "live", "roofline", "targets")
# Targets whose best possible value on this machine the roofline gives: target key -> (bound key, best is min?).
TARGET_BOUNDS = {"cold_ttft_ms": ("ttft_cold_ms", True), "decode_tok_s": ("decode_tok_s", False)}
# Stacked bar segments (per-answer wall time), in pipeline order.
BAR_STAGES = (("detect_ms", "detect"), ("align_ms", "align"), ("preprocess_ms", "preprocess"),
              ("vision_ms", "vision encode"), ("prefill_ms", "LLM prefill (image + question)"),
              ("decode_ms", "decode"))
TABLE_COLUMNS = (("detect_ms", "detect ms"), ("align_ms", "align ms"), ("vision_ms", "vision ms"),
                 ("prefill_ms", "prefill ms"), ("ttft_cold_ms", "TTFT cold ms"), ("ttft_warm_ms", "TTFT warm ms"),
                 ("decode_tok_s", "decode tok/s"), ("end_to_end_ms", "end-to-end ms"))


def median(cfg: dict[str, Any], stage: str) -> float | None:
    s = cfg.get("stages", {}).get(stage)
    return None if s is None else float(s["median"])


def decode_ms(cfg: dict[str, Any]) -> float | None:
    """Decode wall time per answer: measured (edge) or end-to-end minus TTFT (naive)."""
    d = median(cfg, "decode_ms")
    if d is not None:
        return d
    e2e, ttft = median(cfg, "end_to_end_ms"), median(cfg, "ttft_cold_ms")
    return None if e2e is None or ttft is None else max(e2e - ttft, 0.0)


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
    """Each issue target against the best edge configuration (or the best busy live policy)."""
    edge = [c for c in configs if c["kind"] == "edge"]
    values: dict[str, list[tuple[float, str]]] = {k: [] for k in TARGETS}
    for c in edge:
        for key, stage in (("cold_ttft_ms", "ttft_cold_ms"), ("warm_ttft_ms", "ttft_warm_ms"),
                           ("decode_tok_s", "decode_tok_s")):
            v = median(c, stage)
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


def to_markdown(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["settings"]
    flags = ", ".join(k for k, v in m.get("cpu_flags", {}).items() if v) or "none"
    gpus = ", ".join(f"{g['name']} ({g['memory']})" for g in m.get("gpus", [])) or "none"
    lines = [
        f"# facellm-edge bench — {s.get('model')}",
        "",
        f"{r['created']} · {m['cpu_model']} · {m['usable_cores']} cores · {m['ram_gb']} GB RAM · GPU: {gpus}",
        f"CPU features: {flags} · torch CPU kernels: {m.get('torch_cpu_capability')} · "
        f"ORT providers: {', '.join(m.get('ort_providers', []))} · load at start: {m.get('load_avg_at_start')}",
        "",
        f"Medians (p90) over {s['runs']} runs after {s['warmup']} warm-up; {s['decode_tokens']} decoded tokens per "
        f"answer (end-of-sequence ignored); threads: {s['threads']}; question: \"{s['question']}\".",
        "",
        "| config | " + " | ".join(h for _, h in TABLE_COLUMNS) + " | peak RSS MB | LLM bits/w | quality |",
        "|---|" + "---|" * (len(TABLE_COLUMNS) + 3),
    ]
    for c in r["configs"]:
        peak = c["memory"].get("peak_rss_mb")
        cuda = c["memory"].get("cuda_peak_allocated_mb")
        mem = _fmt(peak, 0) + (f" (+{_fmt(cuda, 0)} GPU)" if cuda is not None else "")
        bpw = c.get("bits_per_weight")
        lines.append(f"| {c['name']} | " + " | ".join(_cell(c, k) for k, _ in TABLE_COLUMNS)
                     + f" | {mem} | {_fmt(bpw, 2) if bpw else '–'} | {_quality(c)} |")
    if r["ratios"]:
        lines += ["", "## Edge / naive (medians; < 1 is better except decode)", "",
                  "| edge | baseline | TTFT cold | TTFT warm | decode | end-to-end | peak RSS |",
                  "|---|---|---|---|---|---|---|"]
        for q in r["ratios"]:
            lines.append(f"| {q['edge']} | {q['baseline']} | {_fmt(q['ttft_cold'], 2)}× | {_fmt(q['ttft_warm'], 2)}× "
                         f"| {_fmt(q['decode'], 2)}× | {_fmt(q['end_to_end'], 2)}× | {_fmt(q['peak_rss'], 2)}× |")
    lines += ["", "## Targets (issue 4)", "",
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
    live = r.get("live")
    if live:
        lines += ["", f"## Live loop ({live['source']}, {live['width']}x{live['height']}, {live['frames']} frames; "
                  "detect + track + overlay)", "",
                  "| run | FPS | frame p50 ms | frame p99 ms | VLM decode tok/s |", "|---|---|---|---|---|"]
        for run in live["runs"]:
            lines.append(f"| {run['name']} | {_fmt(run['fps'])} | {_fmt(run['frame_ms']['median'])} | "
                         f"{_fmt(run['frame_ms']['p99'])} | {_fmt(run.get('vlm_tok_s'))} |")
        lines.append(f"\nThread policy that won while the VLM is busy: **{live['winner']}**")
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
             f"Prompt: {roof['prompt_tokens']} tokens.", ""]
    for prec, v in roof["vision"].items():
        lines.append(f"- vision {prec}: {_fmt(2 * v['weight_gmac'])} GOP in weight products + "
                     f"{_fmt(2 * v['attention_gmac'])} GFLOP attention ({v['tokens']} tokens)")
    for q, w in roof["llm"].items():
        lines.append(f"- LLM {q}: prefill {_fmt(w['prefill_gflop'])} GFLOP; decode reads "
                     f"{_fmt(w['decode_mb_per_token'])} MB per token (output head {_fmt(w['head_mb'])} MB)")
    lines += ["", "| config | vision ms (bound) | prefill ms (bound) | TTFT cold ms (bound) | decode tok/s (bound) |",
              "|---|---|---|---|---|"]
    for cfg in r["configs"]:
        b = cfg.get("bounds")
        if not b:
            continue
        lines.append(f"| {cfg['name']} | {_fmt(median(cfg, 'vision_ms'))} ({_fmt(b['vision_ms'])}) | "
                     f"{_fmt(median(cfg, 'prefill_ms'))} ({_fmt(b['prefill_ms'])}) | "
                     f"{_fmt(median(cfg, 'ttft_cold_ms'))} ({_fmt(b['ttft_cold_ms'])}) | "
                     f"{_fmt(median(cfg, 'decode_tok_s'))} ({_fmt(b['decode_tok_s'])}) |")
    return lines


# -- plot ----------------------------------------------------------------------------------------------------

def plot_stages(r: dict[str, Any], path: Path) -> None:
    """Horizontal stacked bars: per-answer wall time of each stage (medians), one bar per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = r["configs"]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.55 * max(len(configs), 1)))
    names = [c["name"] for c in configs]
    left = [0.0] * len(configs)
    for key, label in BAR_STAGES:
        widths = [(decode_ms(c) if key == "decode_ms" else median(c, key)) or 0.0 for c in configs]
        if not any(widths):
            continue
        ax.barh(names, widths, left=left, label=label)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel(f"ms per face answer ({r['settings']['decode_tokens']} tokens), medians")
    ax.set_title(f"facellm-edge bench — {r['settings'].get('model')} — {r['machine']['cpu_model']}")
    ax.legend(loc="lower right", fontsize=8)
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
