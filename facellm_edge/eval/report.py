"""Eval outputs: ``results.json`` + ``results.md`` + ``results.png`` + ``predictions.jsonl`` (and ``compare.*``),
written as one atomic directory (nothing appears unless everything was written)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from facellm_edge.io import OutputKind, atomic_directory, check_replaceable, known_file_set
from facellm_edge.errors import InputError, require
from facellm_edge.eval.predictions import PREDICTIONS
from facellm_edge.eval.scoring import ItemResult
from facellm_edge.io import loads_json

RESULTS_SCHEMA = "facellm-edge/eval-results/1"
COMPARE_SCHEMA = "facellm-edge/eval-compare/1"
# Output kinds for the --force ownership rule (facellm_edge.io): folders of versions without the marker file are
# recognised by their exact file set and the schema inside their JSON.
RESULTS = OutputKind("eval results", known_file_set({"results.json", "results.md", "results.png"}, "results.json",
                                                    RESULTS_SCHEMA))
COMPARE = OutputKind("an eval comparison", known_file_set({"compare.json", "compare.md", "compare.png"},
                                                          "compare.json", COMPARE_SCHEMA))


def check_out(out: Path, force: bool, kind: OutputKind = RESULTS) -> None:
    """Fail before a long run if the output folder exists and --force was not given, or if --force would replace
    something that is not this ``eval`` output of this tool."""
    check_replaceable(Path(out), force=force, kind=kind)


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _acc_rows(title: str, table: dict[str, dict]) -> list[str]:
    lines = [f"| {title} | n | accuracy | 95% CI | unanswered |", "|---|---:|---:|---|---:|"]
    for name, a in table.items():
        lines.append(f"| {name} | {a['n']} | {_pct(a['accuracy'])} | {_pct(a['ci_low'])} – {_pct(a['ci_high'])} "
                     f"| {a['unanswered']} |")
    return lines + [""]


def _settings_lines(m: dict, s: dict) -> list[str]:
    """What the meta knows of how the questions were asked and read (a re-scored file may not know all of it)."""
    parts = []
    if "prepend_text" in m:
        parts.append(f"FaceXBench's prompt, prepend_text {'on' if m['prepend_text'] else 'off'}")
    if "system" in m:
        parts.append(f"system message {m['system']}")
    if "letter_rules" in m:
        parts.append(f"letters read by the `{m['letter_rules']}` rules")
    if "max_new_tokens" in m:
        parts.append(f"answers capped at {m['max_new_tokens']} new tokens")
    lines = [f"- {'; '.join(parts)}"] if parts else []
    part = m.get("partial")
    if isinstance(part, dict):
        lines.append(f"- **partial run**: {part.get('answered')} of {part.get('questions')} questions answered, then "
                     f"stopped: {part.get('stopped')} (`eval run --resume` with the same options answers the rest)")
    if m.get("resumed"):
        lines.append(f"- resumed: {m['resumed']} answers kept from the sitting(s) before")
    if m.get("rescored_from"):
        lines.append(f"- re-scored from `{m['rescored_from']}` (no model run)")
    cap = s.get("hit_max_new_tokens")
    if cap is not None:
        unknown = f" ({cap['unknown']} answers without a stop reason)" if cap["unknown"] else ""
        lines.append(f"- answers that hit the token cap: {cap['count']}{unknown}")
    return lines


def results_markdown(doc: dict) -> str:
    s, m = doc["summary"], doc["meta"]
    model = f"- model: `{m['model']}` ({m.get('backend', '')})" if m.get("model") else \
        "- model: not recorded (no results.json beside the predictions)"
    lines = [f"# Evaluation: {m.get('bench', '')}", "", model,
             f"- questions: {s['overall']['n']}, wall time {m.get('wall_s', 0):.1f} s", *_settings_lines(m, s), ""]
    lines += _acc_rows("overall", {"all": s["overall"]})
    lines += _acc_rows("category", s["by_category"])
    lines += _acc_rows("task", s["by_task"])
    if s.get("by_num_images"):
        lines += _acc_rows("images", s["by_num_images"])
    for attr, table in s["by_group"].items():
        lines += _acc_rows(f"{attr}", table)
    return "\n".join(lines)


def _bar_png(path: Path, labels: list[str], series: dict[str, list[float]], errs: dict[str, list[tuple[float, float]]],
             title: str, ylabel: str) -> None:
    import numpy as np

    Figure = require("matplotlib.figure", "bench").Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(max(6.0, 0.8 * len(labels) * len(series) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        vals = np.nan_to_num(np.asarray(values, dtype=float))
        yerr = None
        if name in errs:
            lo = [v - e[0] for v, e in zip(vals, errs[name])]
            hi = [e[1] - v for v, e in zip(vals, errs[name])]
            yerr = np.nan_to_num(np.clip(np.array([lo, hi]), 0, None))
        ax.bar(x + (k - (len(series) - 1) / 2) * width, vals, width, yerr=yerr, capsize=3, label=name)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    fig.savefig(path, format="png", dpi=100)


def write_results(out: Path, doc: dict, *, force: bool = False, predictions: str | None = None) -> Path:
    """The results folder; ``predictions``: the text of its ``predictions.jsonl`` (see evaluate.predictions)."""
    s = doc["summary"]
    with atomic_directory(Path(out), force=force, kind=RESULTS) as tmp:
        (tmp / "results.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if predictions is not None:
            (tmp / PREDICTIONS).write_text(predictions, encoding="utf-8")
        (tmp / "results.md").write_text(results_markdown(doc), encoding="utf-8")
        cats = {"overall": s["overall"], **s["by_category"]}
        _bar_png(tmp / "results.png", list(cats), {"accuracy": [c["accuracy"] for c in cats.values()]},
                 {"accuracy": [(c["ci_low"], c["ci_high"]) for c in cats.values()]},
                 f"Accuracy by category ({doc['meta'].get('model', '')})", "accuracy (95% bootstrap CI)")
    return Path(out)


def load_results(path: Path) -> tuple[dict, list[ItemResult]]:
    path = Path(path)
    try:
        doc = loads_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"results file {path} does not exist") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"results file {path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("schema") != RESULTS_SCHEMA or not isinstance(doc.get("items"), list):
        raise InputError(f"{path} is not a results.json written by `facellm-edge eval` (schema {RESULTS_SCHEMA})")
    try:
        items = [ItemResult.from_json(d) for d in doc["items"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: an item is malformed ({exc})") from exc
    seen: set[str] = set()
    for r in items:  # a question twice would be counted (compare: silently one of the two) as if asked once
        if r.id in seen:
            raise InputError(f"{path}: question {r.id!r} appears twice; not a results.json as eval writes it")
        seen.add(r.id)
    return doc.get("meta", {}), items


# What ``eval score`` carries over from the run that made the predictions, and the type each must have there (the
# file beside the predictions is untrusted: a value of another type is dropped, not formatted).
RUN_META = {"model": str, "backend": str, "system": str, "prepend_text": bool, "max_new_tokens": int,
            "wall_s": (int, float), "partial": dict, "resumed": int}


def run_meta(folder: Path) -> dict:
    """The meta of the ``results.json`` in ``folder`` (the run a ``predictions.jsonl`` beside it came from: model,
    backend, prompt settings: the :data:`RUN_META` keys of the right type), or {} when there is none of ours."""
    try:
        meta, _ = load_results(Path(folder) / "results.json")
    except InputError:
        return {}
    if not isinstance(meta, dict):
        return {}
    return {k: v for k, v in meta.items() if k in RUN_META and isinstance(v, RUN_META[k])
            and not (isinstance(v, bool) and RUN_META[k] is not bool)}


def compare_markdown(cmp: dict) -> str:
    lines = [f"# Comparison: A = {cmp['a']}, B = {cmp['b']}", "",
             "| category | n | agreement | acc A | acc B | Δ (B−A) | →correct | →wrong |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, blk in {"overall": cmp["overall"], **cmp["by_category"]}.items():
        lines.append(f"| {name} | {blk['n']} | {_pct(blk['agreement'])} | {_pct(blk['accuracy_a'])} | "
                     f"{_pct(blk['accuracy_b'])} | {100 * blk['delta']:+.1f} pp | {blk['flips_to_correct']} | "
                     f"{blk['flips_to_wrong']} |")
    lines += ["", f"Only in A: {len(cmp['only_in_a'])}, only in B: {len(cmp['only_in_b'])}, "
              f"disagreements: {len(cmp['disagreements'])}", ""]
    return "\n".join(lines)


def write_compare(out: Path, cmp: dict, *, force: bool = False) -> Path:
    doc = {"schema": COMPARE_SCHEMA, **cmp}
    blocks = {"overall": cmp["overall"], **cmp["by_category"]}
    with atomic_directory(Path(out), force=force, kind=COMPARE) as tmp:
        (tmp / "compare.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "compare.md").write_text(compare_markdown(cmp), encoding="utf-8")
        _bar_png(tmp / "compare.png", list(blocks),
                 {"A": [b["accuracy_a"] for b in blocks.values()], "B": [b["accuracy_b"] for b in blocks.values()],
                  "agreement": [b["agreement"] for b in blocks.values()]}, {},
                 f"A = {cmp['a']} vs B = {cmp['b']}", "fraction")
    return Path(out)
