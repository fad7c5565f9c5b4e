"""Compare two result files of the same bench: answer agreement and accuracy deltas (quantisation drift)."""

from __future__ import annotations

from facellm_edge.errors import InputError
from facellm_edge.eval.scoring import ItemResult


def _acc(rs: list[ItemResult]) -> float:
    return sum(r.correct for r in rs) / len(rs) if rs else float("nan")


def compare_results(a: list[ItemResult], b: list[ItemResult], *, name_a: str = "a", name_b: str = "b") -> dict:
    """Agreement of predicted letters on the questions both runs answered, and accuracy of B minus A on them,
    overall and per category."""
    ia, ib = {r.id: r for r in a}, {r.id: r for r in b}
    common = [i for i in ia if i in ib]
    if not common:
        raise InputError(f"results {name_a} and {name_b} share no question id: they are not runs of the same bench")
    for i in common:
        if ia[i].answer != ib[i].answer:
            raise InputError(f"question {i} has answer {ia[i].answer} in {name_a} but {ib[i].answer} in {name_b}: "
                             "not the same bench")

    def block(ids: list[str]) -> dict:
        ra, rb = [ia[i] for i in ids], [ib[i] for i in ids]
        agree = sum(x.predicted == y.predicted for x, y in zip(ra, rb))
        acc_a, acc_b = _acc(ra), _acc(rb)
        return {"n": len(ids), "agree": agree, "agreement": agree / len(ids), "accuracy_a": acc_a,
                "accuracy_b": acc_b, "delta": acc_b - acc_a,
                "flips_to_correct": sum((not x.correct) and y.correct for x, y in zip(ra, rb)),
                "flips_to_wrong": sum(x.correct and not y.correct for x, y in zip(ra, rb))}

    cats: dict[str, list[str]] = {}
    for i in common:
        cats.setdefault(ia[i].category, []).append(i)
    return {
        "a": name_a, "b": name_b,
        "only_in_a": sorted(set(ia) - set(ib)), "only_in_b": sorted(set(ib) - set(ia)),
        "overall": block(common),
        "by_category": {c: block(ids) for c, ids in sorted(cats.items())},
        "disagreements": [{"id": i, "a": ia[i].predicted, "b": ib[i].predicted, "answer": ia[i].answer}
                          for i in common if ia[i].predicted != ib[i].predicted],
    }
