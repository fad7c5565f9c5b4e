"""``predictions.jsonl``: every question's exact prompt, images, raw answer and letters, one JSON object a line,
written beside ``results.json``; and re-scoring such a file against its bench without a model (``eval score``).

A line: ``{"id", "task", "category", "num_images", "prompt", "images": [paths], "raw", "predicted", "answer",
"truncated", "seconds"}``. Re-scoring needs only ``id`` and ``raw`` per line; ``answer`` and ``prompt``, when present,
must match the bench (a file of another bench, or of another version of it, is refused).
"""

from __future__ import annotations

import json
from pathlib import Path

from facellm_edge.errors import InputError
from facellm_edge.eval.letters import DEFAULT_RULES, get_rules
from facellm_edge.eval.mcq import MCQItem
from facellm_edge.eval.scoring import ItemResult
from facellm_edge.io import loads_json

PREDICTIONS = "predictions.jsonl"


def prediction_record(item: MCQItem, result: ItemResult) -> dict:
    return {"id": item.id, "task": item.task, "category": item.category, "num_images": item.num_images,
            "prompt": item.prompt(), "images": [str(p) for p in item.images], "raw": result.raw,
            "predicted": result.predicted, "answer": item.answer, "truncated": result.truncated,
            "seconds": result.seconds}


def predictions_jsonl(items: list[MCQItem], results: list[ItemResult]) -> str:
    """The file's text for ``results`` (a run of ``items``, matched by id)."""
    by_id = {it.id: it for it in items}
    return "".join(json.dumps(prediction_record(by_id[r.id], r), ensure_ascii=False) + "\n" for r in results)


def read_predictions(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; one-line :class:`InputError` naming the line otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(f"predictions file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise InputError(f"predictions {path} is a folder; pass its {PREDICTIONS}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read predictions {path}: {exc}") from exc
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = loads_json(line)
        except ValueError as exc:
            raise InputError(f"predictions {path} line {n} is not valid JSON ({exc})") from exc
        if not (isinstance(rec, dict) and isinstance(rec.get("id"), str) and isinstance(rec.get("raw"), str)):
            raise InputError(f"predictions {path} line {n}: needs string fields 'id' and 'raw' (a line of the "
                             f"{PREDICTIONS} that `eval` writes)")
        out.append((n, rec))
    if not out:
        raise InputError(f"predictions {path} holds no predictions")
    return out


def rescore(items: list[MCQItem], predictions: list[tuple[int, dict]], *, source: Path | str = "predictions",
            letter_rules: str = DEFAULT_RULES) -> list[ItemResult]:
    """Read the saved raw answers again with ``letter_rules``; every prediction must be a question of ``items``
    (at most once), with the bench's correct letter and prompt where it records them."""
    extract = get_rules(letter_rules)
    by_id = {it.id: it for it in items}
    seen: set[str] = set()
    results = []
    for n, rec in predictions:
        where = f"predictions {source} line {n}"
        qid = rec["id"]
        item = by_id.get(qid)
        if item is None:
            raise InputError(f"{where}: question {qid!r} is not in the bench (another bench, or --bench should be "
                             "the folder or file the predictions were made on)")
        if qid in seen:
            raise InputError(f"{where}: question {qid!r} appears a second time")
        seen.add(qid)
        if "answer" in rec and rec["answer"] != item.answer:
            raise InputError(f"{where}: question {qid!r} has correct letter {rec['answer']!r} here but "
                             f"{item.answer!r} in the bench: not the same bench")
        if "prompt" in rec and rec["prompt"] not in (item.prompt(False), item.prompt(True)):
            raise InputError(f"{where}: question {qid!r} was asked with another prompt than the bench's "
                             "(another version of the bench?)")
        truncated = rec.get("truncated")
        seconds = rec.get("seconds", 0.0)
        if truncated is not None and not isinstance(truncated, bool):
            raise InputError(f"{where}: 'truncated' must be true, false or null")
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
            raise InputError(f"{where}: 'seconds' must be a number")
        results.append(ItemResult(
            id=qid, category=item.category, task=item.task, groups=dict(item.groups), answer=item.answer,
            predicted=extract(rec["raw"], item.option_map), raw=rec["raw"], seconds=float(seconds),
            num_images=item.num_images, truncated=truncated))
    return results


def rescored_jsonl(predictions: list[tuple[int, dict]], results: list[ItemResult]) -> str:
    """The saved lines as they were (prompt, images, raw answer, ...), with the letters read again."""
    return "".join(json.dumps({**rec, "predicted": r.predicted, "answer": r.answer}, ensure_ascii=False) + "\n"
                   for (_, rec), r in zip(predictions, results, strict=True))
