"""Accuracy overall / per category / per task / per demographic group, with seeded bootstrap 95% CIs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ItemResult:
    id: str
    category: str
    task: str
    groups: dict[str, str]
    answer: str
    predicted: str | None  # None: refusal / no letter found
    raw: str
    seconds: float
    num_images: str = ""  # FaceXBench's single / multiple / zero
    truncated: bool | None = None  # generation stopped at --max-new-tokens (None: the backend did not say)

    @property
    def correct(self) -> bool:
        return self.predicted == self.answer

    def to_json(self) -> dict:
        return {**asdict(self), "correct": self.correct}

    @classmethod
    def from_json(cls, d: dict) -> "ItemResult":
        return cls(id=str(d["id"]), category=str(d["category"]), task=str(d["task"]), groups=dict(d.get("groups") or {}),
                   answer=str(d["answer"]), predicted=d.get("predicted"), raw=str(d.get("raw", "")),
                   seconds=float(d.get("seconds", 0.0)), num_images=str(d.get("num_images") or ""),
                   truncated=_opt_bool(d.get("truncated")))


def _opt_bool(value: object) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(f"'truncated' must be true, false or null, got {value!r}")


@dataclass(frozen=True)
class Accuracy:
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    unanswered: int

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ScoreConfig:
    n_bootstrap: int = 1000
    seed: int = 0
    confidence: float = 0.95


def accuracy(correct: np.ndarray, unanswered: int, config: ScoreConfig) -> Accuracy:
    """Accuracy with a percentile bootstrap CI (resampling items with replacement, seeded)."""
    n = int(correct.size)
    if n == 0:
        return Accuracy(0, 0, float("nan"), float("nan"), float("nan"), 0)
    acc = float(correct.mean())
    rng = np.random.default_rng(config.seed)
    idx = rng.integers(0, n, size=(config.n_bootstrap, n))
    boots = correct[idx].mean(axis=1)
    alpha = (1.0 - config.confidence) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return Accuracy(n, int(correct.sum()), acc, float(lo), float(hi), unanswered)


def _acc_of(results: list[ItemResult], config: ScoreConfig) -> Accuracy:
    correct = np.array([r.correct for r in results], dtype=np.float64)
    return accuracy(correct, sum(r.predicted is None for r in results), config)


def _by(results: list[ItemResult], key, config: ScoreConfig) -> dict[str, dict]:
    buckets: dict[str, list[ItemResult]] = {}
    for r in results:
        buckets.setdefault(key(r), []).append(r)
    return {k: _acc_of(v, config).to_json() for k, v in sorted(buckets.items())}


def score(results: list[ItemResult], config: ScoreConfig = ScoreConfig()) -> dict:
    """The summary block of a results file."""
    groups: dict[str, dict[str, dict]] = {}
    for attr in sorted({a for r in results for a in r.groups}):
        with_attr = [r for r in results if attr in r.groups]
        groups[attr] = _by(with_attr, lambda r, a=attr: r.groups[a], config)
    return {
        "overall": _acc_of(results, config).to_json(),
        "by_category": _by(results, lambda r: r.category, config),
        "by_task": _by(results, lambda r: r.task, config),
        "by_group": groups,
        "by_num_images": _by([r for r in results if r.num_images], lambda r: r.num_images, config),
        "hit_max_new_tokens": {"count": sum(r.truncated is True for r in results),
                               "unknown": sum(r.truncated is None for r in results)},
        "bootstrap": {"n": config.n_bootstrap, "seed": config.seed, "confidence": config.confidence},
    }
