"""Scoring (bootstrap CIs, groups) and `eval compare` on result files with known agreement."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from facellm_edge.cli import main
from facellm_edge.eval.report import RESULTS_SCHEMA
from facellm_edge.eval.runner import results_document
from facellm_edge.eval.scoring import ItemResult, ScoreConfig, accuracy, score
from facellm_edge.io import MARKER


def _r(i, cat, answer, pred, group=None):
    return ItemResult(id=f"q{i}", category=cat, task=f"{cat}_task", groups=group or {}, answer=answer,
                      predicted=pred, raw=pred or "I'm sorry", seconds=0.1)


# 10 questions: age (q0-q3), emotion (q4-q9)
ANSWERS = ["A", "B", "C", "D", "A", "B", "A", "B", "A", "B"]
PRED_A = ["A", "B", "C", "A", "A", "B", "A", "A", None, "B"]   # age 3/4, emotion 4/6
PRED_B = ["A", "B", "D", "A", "A", "B", "A", "B", "A", None]   # age 2/4, emotion 5/6; differs from A on q2, q7, q8, q9


def _run(preds):
    return [_r(i, "age" if i < 4 else "emotion", ANSWERS[i], p, {"gender": "f" if i % 2 else "m"})
            for i, p in enumerate(preds)]


def _write(path: Path, results) -> Path:
    path.write_text(json.dumps(results_document(results, {"model": path.stem, "backend": "test"})))
    return path


def test_score_known_values_and_seeded_ci():
    s = score(_run(PRED_A), ScoreConfig(n_bootstrap=500, seed=3))
    assert s["overall"]["n"] == 10 and s["overall"]["correct"] == 7 and s["overall"]["unanswered"] == 1
    assert s["by_category"]["age"]["accuracy"] == 0.75 and s["by_category"]["emotion"]["accuracy"] == pytest.approx(4 / 6)
    assert s["by_group"]["gender"]["m"]["n"] == 5 and s["by_group"]["gender"]["m"]["correct"] == 4  # q0,q2,q4,q6 right; q8 unanswered
    o = s["overall"]
    assert o["ci_low"] < 0.7 < o["ci_high"]
    assert score(_run(PRED_A), ScoreConfig(n_bootstrap=500, seed=3)) == s  # seeded: reproducible
    # the bootstrap CI matches numpy's own percentile bootstrap
    correct = np.array([p == a for p, a in zip(PRED_A, ANSWERS)], dtype=float)
    boots = correct[np.random.default_rng(3).integers(0, 10, size=(500, 10))].mean(axis=1)
    assert (o["ci_low"], o["ci_high"]) == tuple(np.quantile(boots, [0.025, 0.975]))
    all_right = accuracy(np.ones(20), 0, ScoreConfig())
    assert (all_right.accuracy, all_right.ci_low, all_right.ci_high) == (1.0, 1.0, 1.0)


def test_eval_compare_known_agreement(tmp_path, capsys):
    a = _write(tmp_path / "fp32.json", _run(PRED_A))
    b = _write(tmp_path / "q4.json", _run(PRED_B))
    out = tmp_path / "cmp"
    assert main(["eval", "compare", str(a), str(b), "--out", str(out)]) == 0
    assert "agreement 0.600" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "compare.json", "compare.md", "compare.png"]
    doc = json.loads((out / "compare.json").read_text())
    o = doc["overall"]
    # predictions differ on q2, q7, q8, q9 -> 6/10 agree
    assert (o["n"], o["agree"], o["agreement"]) == (10, 6, 0.6)
    assert o["accuracy_a"] == 0.7 and o["accuracy_b"] == 0.7 and o["delta"] == 0.0
    assert (o["flips_to_correct"], o["flips_to_wrong"]) == (2, 2)  # q7,q8 / q2,q9
    age, emo = doc["by_category"]["age"], doc["by_category"]["emotion"]
    assert (age["agree"], age["accuracy_a"], age["accuracy_b"], age["delta"]) == (3, 0.75, 0.5, -0.25)
    assert (emo["agree"], emo["delta"]) == (3, pytest.approx(1 / 6))
    assert [d["id"] for d in doc["disagreements"]] == ["q2", "q7", "q8", "q9"]
    assert "| age | 4 | 75.0% | 75.0% | 50.0% | -25.0 pp |" in (out / "compare.md").read_text()
    assert cv2.imread(str(out / "compare.png")) is not None


def test_eval_compare_partial_overlap_and_errors(tmp_path, capsys):
    a = _write(tmp_path / "a.json", _run(PRED_A))
    b = _write(tmp_path / "b.json", _run(PRED_B)[:6])
    assert main(["eval", "compare", str(a), str(b), "--out", str(tmp_path / "c1")]) == 0
    doc = json.loads((tmp_path / "c1" / "compare.json").read_text())
    assert doc["overall"]["n"] == 6 and doc["only_in_a"] == ["q6", "q7", "q8", "q9"] and doc["only_in_b"] == []

    other = [ItemResult(**{**r.__dict__, "id": "z" + r.id}) for r in _run(PRED_B)]
    c = _write(tmp_path / "c.json", other)
    capsys.readouterr()
    assert main(["eval", "compare", str(a), str(c), "--out", str(tmp_path / "c2")]) == 3
    assert "share no question id" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something-else", "items": []}))
    assert main(["eval", "compare", str(a), str(bad), "--out", str(tmp_path / "c3")]) == 3
    assert RESULTS_SCHEMA in capsys.readouterr().err
    assert main(["eval", "compare", str(a), str(tmp_path / "nope.json"), "--out", str(tmp_path / "c4")]) == 3
    assert "does not exist" in capsys.readouterr().err
    twice = _write(tmp_path / "twice.json", [*_run(PRED_B), _run(PRED_A)[3]])  # q3 a second time
    assert main(["eval", "compare", str(a), str(twice), "--out", str(tmp_path / "c5")]) == 3
    assert "question 'q3' appears twice" in capsys.readouterr().err
    for d in ("c2", "c3", "c4", "c5"):
        assert not (tmp_path / d).exists()
