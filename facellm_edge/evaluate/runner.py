"""Run a bench through a backend and build the results document."""

from __future__ import annotations

import logging
import time
from typing import Callable

from facellm_edge.evaluate.backends import MCQBackend
from facellm_edge.evaluate.letters import extract_letter
from facellm_edge.evaluate.mcq import MCQItem
from facellm_edge.evaluate.report import RESULTS_SCHEMA
from facellm_edge.evaluate.scoring import ItemResult, ScoreConfig, score

log = logging.getLogger(__name__)


def run_bench(items: list[MCQItem], backend: MCQBackend,
              on_item: Callable[[ItemResult], None] | None = None) -> list[ItemResult]:
    results = []
    for item in items:
        t0 = time.perf_counter()
        raw = backend.answer(item)
        res = ItemResult(id=item.id, category=item.category, task=item.task, groups=dict(item.groups),
                         answer=item.answer, predicted=extract_letter(raw, item.option_map), raw=raw,
                         seconds=time.perf_counter() - t0)
        log.debug("%s: %r -> %s (answer %s)", item.id, raw, res.predicted, item.answer)
        results.append(res)
        if on_item is not None:
            on_item(res)
    return results


def results_document(results: list[ItemResult], meta: dict, config: ScoreConfig = ScoreConfig()) -> dict:
    return {"schema": RESULTS_SCHEMA, "meta": meta, "summary": score(results, config),
            "items": [r.to_json() for r in results]}
