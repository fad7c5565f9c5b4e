"""Run a bench through a backend and build the results document."""

from __future__ import annotations

import logging
import time
from typing import Callable

from facellm_edge.eval.backends import MCQBackend
from facellm_edge.eval.letters import DEFAULT_RULES, get_rules
from facellm_edge.eval.mcq import MCQAnswer, MCQItem
from facellm_edge.eval.report import RESULTS_SCHEMA
from facellm_edge.eval.scoring import ItemResult, ScoreConfig, score

log = logging.getLogger(__name__)


def _unpack(answer: "str | MCQAnswer") -> tuple[str, bool | None]:
    """A backend answers a plain string (cap not reported) or an :class:`MCQAnswer`."""
    if isinstance(answer, str):
        return answer, None
    return answer.text, answer.truncated


def run_eval(items: list[MCQItem], backend: MCQBackend, on_item: Callable[[ItemResult], None] | None = None,
              *, letter_rules: str = DEFAULT_RULES) -> list[ItemResult]:
    extract = get_rules(letter_rules)
    results = []
    for item in items:
        t0 = time.perf_counter()
        raw, truncated = _unpack(backend.answer(item))
        res = ItemResult(id=item.id, category=item.category, task=item.task, groups=dict(item.groups),
                         answer=item.answer, predicted=extract(raw, item.option_map), raw=raw,
                         seconds=time.perf_counter() - t0, num_images=item.num_images, truncated=truncated)
        log.debug("%s: %r -> %s (answer %s)", item.id, raw, res.predicted, item.answer)
        results.append(res)
        if on_item is not None:
            on_item(res)
    return results


def results_document(results: list[ItemResult], meta: dict, config: ScoreConfig = ScoreConfig()) -> dict:
    return {"schema": RESULTS_SCHEMA, "meta": meta, "summary": score(results, config),
            "items": [r.to_json() for r in results]}
