"""An eval run that stops keeps its answers, and ``eval run --resume`` goes on from them.

A FaceXBench run is 5,000 questions: hours on a CPU. When it stops (Ctrl-C, SIGTERM, an image that cannot be read
at question 3,127) the questions answered so far are written to ``--out`` as a normal results folder whose meta
carries ``partial`` (how many of how many, and why it stopped). ``--resume`` reads that folder's
``predictions.jsonl`` back (every line checked against the bench, as ``eval score`` does), refuses a run made with
other settings or another model, answers only the questions still missing, and replaces the folder with the whole
run once it is done (or with a larger partial one if it stops again).
"""

from __future__ import annotations

import logging
from pathlib import Path

from facellm_edge.errors import FaceLLMEdgeError, UsageError
from facellm_edge.eval.mcq import MCQItem
from facellm_edge.eval.predictions import PREDICTIONS, read_predictions, rescore
from facellm_edge.eval.report import RESULTS, check_out, load_results
from facellm_edge.eval.scoring import ItemResult

log = logging.getLogger(__name__)

# What must be the same for answers of two sittings to make one run: how the questions were asked and read
# (before the model loads), and the model and system message that answered them (once it has loaded).
SETTINGS_KEYS = ("prepend_text", "letter_rules", "max_new_tokens")
MODEL_KEYS = ("backend", "model", "system")


def stop_reason(exc: BaseException) -> str:
    """One line for the meta's ``partial.stopped``: why the run ended early."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C or SIGTERM)"
    text = " ".join(str(exc).split())
    return text if isinstance(exc, FaceLLMEdgeError) else f"{type(exc).__name__}: {text}"


def partial_meta(answered: int, questions: int, exc: BaseException) -> dict:
    return {"partial": {"answered": answered, "questions": questions, "stopped": stop_reason(exc)}}


def previous_run(out: Path, settings: dict) -> dict:
    """The meta of the partial run in ``out`` that ``--resume`` goes on from; one-line errors where there is none,
    where it is finished, not ours, or asked its questions another way than ``settings``."""
    out = Path(out)
    if not (out / "results.json").is_file():
        raise UsageError(f"--resume: {out} holds no results of an earlier `eval run` (run without --resume)")
    check_out(out, True, RESULTS)  # ours, holding nothing else: it is replaced at the end
    meta, _ = load_results(out / "results.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("partial"), dict):
        raise UsageError(f"--resume: the run in {out} is complete; nothing to resume (--force runs it again)")
    check_same(out, meta, settings, SETTINGS_KEYS)
    return meta


def check_same(out: Path, meta: dict, now: dict, keys: tuple[str, ...]) -> None:
    """Refuse to resume when a ``keys`` value of the earlier run differs from this one's."""
    for key in keys:
        if meta.get(key) != now.get(key):
            raise UsageError(f"--resume: the run in {out} was made with {key} {meta.get(key)!r}, this one "
                             f"{now.get(key)!r}; use the same options (or another --out)")


def answered_before(out: Path, items: list[MCQItem], letter_rules: str) -> list[ItemResult]:
    """The partial run's answers, each checked against the bench (id, correct letter, prompt) and read with
    ``letter_rules``."""
    path = Path(out) / PREDICTIONS
    return rescore(items, read_predictions(path), source=path, letter_rules=letter_rules)


def in_bench_order(items: list[MCQItem], results: list[ItemResult]) -> list[ItemResult]:
    by_id = {r.id: r for r in results}
    return [by_id[it.id] for it in items if it.id in by_id]
