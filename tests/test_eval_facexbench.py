"""FaceXBench's real layout (per-task files under benchmark/, images under benchmark/images/<task>/): prompts
byte-identical to FaceXBench's evaluate.py, tools_use context, num_images, a "Cannot determine" option."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from facellm_edge.eval.mcq import load_bench

POSTPEND = "Please answer the question and provide only the correct option letter, e.g., A, B, C, D."


def _task(category: str, sub: str, dataset: str, num_images: str, questions: dict, **extra) -> dict:
    return {"category": category, "sub-category": sub, "dataset": dataset, "question_type": "MCQ",
            "num_images": num_images, "prepend_text": f"This is the {sub} task.", **extra,
            "postpend_text": POSTPEND, "questions": questions}


@pytest.fixture()
def facexbench_dir(tmp_path, astronaut_bgr, t1_bgr) -> Path:
    """A small folder laid out exactly like FaceXBench's repository: single-image, multi-image and tools tasks."""
    root = tmp_path / "facexbench" / "benchmark"

    def image(task: str, name: str, img: np.ndarray) -> str:
        rel = f"images/{task}/{name}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / rel), img)
        return rel

    h, w = t1_bgr.shape[:2]
    side = min(h, w)
    t1 = t1_bgr[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2]
    tasks = {
        "fairface_single_mcq_age_test": _task("bias_fairness", "age", "fairface", "single", {
            "1": {"image_paths": [image("fairface_single_mcq_age_test", "question_1.png", astronaut_bgr)],
                  "question_text": "What is the age range of the person in the image?",
                  "options": ["0-2", "20-29", "30-39", "more than 70"],
                  "correct_answer_option": "C", "answer": "30-39"},
            "2": {"image_paths": [image("fairface_single_mcq_age_test", "question_2.png", t1)],
                  "question_text": "Is the person in the image older than 30?",
                  "options": ["Yes", "No", "Cannot determine", "Both"],
                  "correct_answer_option": "C", "answer": "Cannot determine"}}),
        "agedb30_multiple_mcq": _task("face_recognition", "hr_fr", "agedb30", "multiple", {
            "1": {"image_paths": [image("agedb30_multiple_mcq", "question_1_1.png", astronaut_bgr),
                                  image("agedb30_multiple_mcq", "question_1_2.png", t1),
                                  image("agedb30_multiple_mcq", "question_1_3.png", astronaut_bgr[:, ::-1])],
                  "question_text": "Which two images show the same person?",
                  "options": ["Images 1 and 2", "Images 1 and 3", "Images 2 and 3", "None of them"],
                  "correct_answer_option": "B", "answer": "Images 1 and 3"}}),
        "tools_retrieval": _task("tools_use", "tools_retrieval", "gpt4o", "zero", {
            "1": {"image_paths": [image("tools_retrieval", "question_1.png", np.zeros((448, 448, 3), np.uint8))],
                  "question_text": "Which sequence of API calls estimates age and checks for spoofing?",
                  "options": ["api_1-predict_age, api_4-detect_spoofing", "api_4-detect_spoofing",
                              "api_2-classify_gender", "api_1-predict_age"],
                  "correct_answer_option": "A", "answer": "api_1-predict_age, api_4-detect_spoofing"}},
            context="Ignore the black image provided.\n1. Age Estimation:\n    api_name: api_1"),
    }
    for name, task in tasks.items():
        (root / f"{name}.json").write_text(json.dumps(task, indent=4))
    return root


def test_facexbench_folder_loads_with_exact_prompts(facexbench_dir):
    items = {it.id: it for it in load_bench(facexbench_dir)}
    assert sorted(items) == ["agedb30_multiple_mcq/1", "fairface_single_mcq_age_test/1",
                             "fairface_single_mcq_age_test/2", "tools_retrieval/1"]
    tools = items["tools_retrieval/1"]
    # FaceXBench: context (tools_use only) + question + postpend + "(A) option" lines, each ending in a newline
    assert tools.prompt() == (
        "Ignore the black image provided.\n1. Age Estimation:\n    api_name: api_1\n"
        "Which sequence of API calls estimates age and checks for spoofing?\n"
        f"{POSTPEND}\n"
        "(A) api_1-predict_age, api_4-detect_spoofing\n(B) api_4-detect_spoofing\n"
        "(C) api_2-classify_gender\n(D) api_1-predict_age\n")
    assert tools.prompt(prepend_text=True).startswith(
        "Ignore the black image provided.\n1. Age Estimation:\n    api_name: api_1\nThis is the tools_retrieval task.\n"
        "Which sequence")
    multi = items["agedb30_multiple_mcq/1"]
    assert len(multi.images) == 3 and multi.images[0].name == "question_1_1.png"
    assert multi.prompt() == (f"Which two images show the same person?\n{POSTPEND}\n(A) Images 1 and 2\n"
                              "(B) Images 1 and 3\n(C) Images 2 and 3\n(D) None of them\n")
    # context is FaceXBench's for tools_use only: other categories never carry it
    assert all(not it.context for k, it in items.items() if k != "tools_retrieval/1")
    assert {k: it.num_images for k, it in items.items()} == {
        "agedb30_multiple_mcq/1": "multiple", "fairface_single_mcq_age_test/1": "single",
        "fairface_single_mcq_age_test/2": "single", "tools_retrieval/1": "zero"}
    assert (items["fairface_single_mcq_age_test/2"].option_map["C"], items["tools_retrieval/1"].category) == (
        "Cannot determine", "tools_use")


# -- the whole eval on FaceXBench's layout: predictions.jsonl, accuracy by num_images, eval score -----------------

def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow  # about 6 s: the whole folder through transformers
def test_eval_run_on_facexbench_folder_writes_predictions(facexbench_dir, tiny_checkpoint, tmp_path, capsys):
    from facellm_edge.cli import main
    from facellm_edge.eval.letters import extract_letter_facexbench
    from facellm_edge.io import MARKER

    out = tmp_path / "res"
    rc = main(["eval", "run", "--bench", str(facexbench_dir), "--model", str(tiny_checkpoint), "--out", str(out),
               "--max-new-tokens", "3", "--bootstrap", "50"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "predictions.jsonl", "results.json", "results.md",
                                                     "results.png"]
    items = {it.id: it for it in load_bench(facexbench_dir)}
    preds = _lines(out / "predictions.jsonl")
    assert [p["id"] for p in preds] == sorted(items)  # files in name order, questions in file order
    for p in preds:
        it = items[p["id"]]
        # the exact text the model was asked (FaceXBench's prompt, no prepend_text by default) and its images
        assert p["prompt"] == it.prompt(prepend_text=False) and "This is the" not in p["prompt"]
        assert p["images"] == [str(x) for x in it.images]
        assert (p["answer"], p["task"], p["category"], p["num_images"]) == (it.answer, it.task, it.category,
                                                                          it.num_images)
        assert p["predicted"] == extract_letter_facexbench(p["raw"], it.option_map)  # the default rules
        assert p["truncated"] in (True, False, None)
    assert preds[-1]["prompt"].startswith("Ignore the black image provided.\n")  # tools_use context kept
    doc = json.loads((out / "results.json").read_text())
    assert {k: doc["meta"][k] for k in ("prepend_text", "letter_rules", "max_new_tokens")} == {
        "prepend_text": False, "letter_rules": "facexbench", "max_new_tokens": 3}
    s = doc["summary"]
    assert {k: v["n"] for k, v in s["by_num_images"].items()} == {"multiple": 1, "single": 2, "zero": 1}
    cap = s["hit_max_new_tokens"]
    assert cap["count"] + cap["unknown"] <= 4 and cap["count"] == sum(p["truncated"] is True for p in preds)
    md = (out / "results.md").read_text()
    assert "| images | n |" in md and "| multiple | 1 |" in md and "prepend_text off" in md and "`facexbench`" in md
    # the folder is ours by its marker (predictions.jsonl included): --force replaces it
    rc = main(["eval", "--bench", str(facexbench_dir), "--model", str(tiny_checkpoint), "--out", str(out),
               "--max-new-tokens", "3", "--bootstrap", "50", "--force", "--prepend-text", "--limit", "2"])
    assert rc == 0, capsys.readouterr().err
    again = _lines(out / "predictions.jsonl")
    assert [p["id"] for p in again] == sorted(items)[:2]
    assert all(p["prompt"] == items[p["id"]].prompt(prepend_text=True) and "This is the" in p["prompt"]
               for p in again)
    assert json.loads((out / "results.json").read_text())["meta"]["prepend_text"] is True


def test_transformers_backend_asks_the_prepend_text_only_when_loaded_with_it(facexbench_dir, tiny_checkpoint):
    from facellm_edge.eval.backends import TransformersBackend, TransformersConfig

    backend = TransformersBackend(TransformersConfig(model=str(tiny_checkpoint)))
    tok = backend._processor.tokenizer
    for prepend in (False, True):
        (item,) = [it for it in load_bench(facexbench_dir, prepend_text=prepend) if it.id == "tools_retrieval/1"]
        text = tok.decode(backend.encode(item)["input_ids"][0])
        assert item.prompt() in text
        assert ("This is the tools_retrieval task.\n" in text) is prepend


# Saved answers for the fixture's four questions, and what each rule set reads from them.
SAVED = {
    "fairface_single_mcq_age_test/1": ("C", False, "C", "C"),
    "fairface_single_mcq_age_test/2": ("Cannot determine", None, "C", "C"),  # an option, not a refusal
    "agedb30_multiple_mcq/1": ("I think it is (B) Images 1 and 3, not A", True, "B", None),  # robust: ambiguous
    "tools_retrieval/1": ("answer: a", None, None, "A"),  # facexbench: lowercase is never a label
}


def _saved_predictions(path: Path, bench: Path, **change) -> Path:
    items = {it.id: it for it in load_bench(bench)}
    lines = []
    for qid, (raw, truncated, _, _) in SAVED.items():
        rec = {"id": qid, "prompt": items[qid].prompt(), "images": [str(p) for p in items[qid].images], "raw": raw,
               "predicted": "Z", "answer": items[qid].answer, "truncated": truncated, "seconds": 0.5}
        lines.append(json.dumps({**rec, **change.get(qid, {})}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("rules, column", [("facexbench", 2), ("robust", 3)])
def test_eval_score_rescores_saved_answers_without_a_model(facexbench_dir, tmp_path, capsys, rules, column):
    import shutil

    from facellm_edge.cli import main

    preds = _saved_predictions(tmp_path / "predictions.jsonl", facexbench_dir)
    shutil.rmtree(facexbench_dir / "images")  # re-scoring needs the questions only
    out = tmp_path / "scored"
    rc = main(["eval", "score", "--bench", str(facexbench_dir), "--predictions", str(preds), "--letter-rules", rules,
               "--out", str(out), "--bootstrap", "50"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((out / "results.json").read_text())
    got = {it["id"]: it["predicted"] for it in doc["items"]}
    assert got == {qid: row[column] for qid, row in SAVED.items()}
    assert doc["summary"]["overall"]["correct"] == 3 and doc["summary"]["overall"]["unanswered"] == 1
    assert doc["summary"]["hit_max_new_tokens"] == {"count": 1, "unknown": 2}
    assert doc["meta"]["letter_rules"] == rules and doc["meta"]["rescored_from"] == str(preds)
    assert {k: v["n"] for k, v in doc["summary"]["by_num_images"].items()} == {"multiple": 1, "single": 2, "zero": 1}
    rescored = _lines(out / "predictions.jsonl")
    assert [(p["id"], p["raw"], p["predicted"]) for p in rescored] == [(q, r[0], r[column]) for q, r in SAVED.items()]
    md = (out / "results.md").read_text()
    assert "re-scored from" in md and f"`{rules}` rules" in md
    # no results.json beside the predictions: what the run was is not claimed
    assert "model: not recorded" in md and "prepend_text" not in md and "capped at" not in md


def test_eval_score_takes_the_run_settings_from_the_results_beside(facexbench_dir, tmp_path, capsys):
    from facellm_edge.cli import main
    from facellm_edge.eval.report import write_results
    from facellm_edge.eval.runner import results_document

    run = tmp_path / "run"
    write_results(run, results_document([], {"bench": "b", "model": "Idiap/FaceLLM-1B", "backend": "transformers",
                                             "prepend_text": False, "letter_rules": "facexbench",
                                             "max_new_tokens": 2048}),
                  predictions=_saved_predictions(tmp_path / "p.jsonl", facexbench_dir).read_text())
    assert main(["eval", "score", "--bench", str(facexbench_dir), "--predictions", str(run / "predictions.jsonl"),
                 "--letter-rules", "robust", "--out", str(tmp_path / "s"), "--bootstrap", "50"]) == 0
    meta = json.loads((tmp_path / "s" / "results.json").read_text())["meta"]
    assert (meta["model"], meta["backend"], meta["max_new_tokens"], meta["letter_rules"]) == (
        "Idiap/FaceLLM-1B", "transformers", 2048, "robust")
    md = (tmp_path / "s" / "results.md").read_text()
    assert "`Idiap/FaceLLM-1B` (transformers)" in md and "prepend_text off" in md and "capped at 2048" in md
    # the results beside are untrusted: a value of the wrong type is left behind, not formatted (wall_s "soon"
    # crashed the report), and keys eval does not write are not carried
    doc = json.loads((run / "results.json").read_text())
    doc["meta"].update(wall_s="soon", max_new_tokens=True, model=["x"], note="hello")
    (run / "results.json").write_text(json.dumps(doc))
    assert main(["eval", "score", "--bench", str(facexbench_dir), "--predictions", str(run / "predictions.jsonl"),
                 "--out", str(tmp_path / "s2"), "--bootstrap", "50"]) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "s2" / "results.json").read_text())["meta"]
    assert not {"wall_s", "max_new_tokens", "model", "note"} & set(meta) and meta["backend"] == "transformers"


@pytest.mark.parametrize("edit, expected", [
    ({"agedb30_multiple_mcq/1": {"id": "agedb30_multiple_mcq/9"}},
     "line 3: question 'agedb30_multiple_mcq/9' is not in the bench"),
    ({"agedb30_multiple_mcq/1": {"id": "fairface_single_mcq_age_test/1"}},
     "line 3: question 'fairface_single_mcq_age_test/1' appears a second time"),
    ({"tools_retrieval/1": {"answer": "B"}}, "line 4: question 'tools_retrieval/1' has correct letter 'B' here but "
                                              "'A' in the bench: not the same bench"),
    ({"fairface_single_mcq_age_test/2": {"prompt": "Is the person older than 30?\n"}},
     "line 2: question 'fairface_single_mcq_age_test/2' was asked with another prompt"),
    ({"fairface_single_mcq_age_test/1": {"raw": 3}}, "line 1: needs string fields 'id' and 'raw'"),
    ({"fairface_single_mcq_age_test/1": {"truncated": "yes"}}, "line 1: 'truncated' must be true, false or null"),
])
def test_eval_score_refuses_predictions_of_another_bench(facexbench_dir, tmp_path, capsys, edit, expected):
    from facellm_edge.cli import main

    preds = _saved_predictions(tmp_path / "p.jsonl", facexbench_dir, **edit)
    capsys.readouterr()
    rc = main(["eval", "score", "--bench", str(facexbench_dir), "--predictions", str(preds), "--out",
               str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 3 and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_eval_score_file_errors_and_usage(facexbench_dir, tmp_path, capsys):
    from facellm_edge.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "raw": "A"}\n{torn')
    for preds, code, expected in [(bad, 3, "line 2 is not valid JSON"), (tmp_path / "none.jsonl", 3, "does not exist"),
                                  (tmp_path, 3, "is a folder; pass its predictions.jsonl")]:
        rc = main(["eval", "score", "--bench", str(facexbench_dir), "--predictions", str(preds), "--out",
                   str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == code and expected in err and err.count("\n") == 1, err
    good = _saved_predictions(tmp_path / "p.jsonl", facexbench_dir)
    assert main(["eval", "score", "--bench", str(facexbench_dir), "--predictions", str(good), "--letter-rules", "lax",
                 "--out", str(tmp_path / "o")]) == 2
    assert "unknown --letter-rules 'lax'" in capsys.readouterr().err
    assert main(["eval", "--bench", str(facexbench_dir), "score", "--predictions", str(good)]) == 2
    assert "go after its subcommand" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("rules, column", [("facexbench", 2), ("robust", 3)])
def test_run_bench_reads_letters_by_the_chosen_rules_and_keeps_the_cap_report(facexbench_dir, rules, column):
    """run_eval with a backend that replays saved answers (the MCQBackend protocol), as plain strings (no stop
    reason) or as MCQAnswer (stop reason known)."""
    from facellm_edge.eval.mcq import MCQAnswer
    from facellm_edge.eval.runner import run_eval

    class Replay:
        name, model, max_images = "replay", "saved answers", None

        def answer(self, item):
            raw, truncated = SAVED[item.id][:2]
            return raw if truncated is None else MCQAnswer(raw, truncated)

        def close(self):
            pass

    results = run_eval(load_bench(facexbench_dir), Replay(), letter_rules=rules)
    assert {r.id: (r.raw, r.truncated, r.predicted) for r in results} == {
        q: (row[0], row[1], row[column]) for q, row in SAVED.items()}
    assert {r.id: r.num_images for r in results}["agedb30_multiple_mcq/1"] == "multiple"


@pytest.mark.slow  # tiny_bundle
def test_facexbench_folder_through_both_backends(facexbench_dir, tiny_bundle, tiny_checkpoint_varied, tmp_path,
                                                 capsys):
    """FaceXBench's layout (single, multi-image, tools with context, "Cannot determine") end to end through the
    transformers reference and the edge bundle made from it, then the drift report between them."""
    from facellm_edge.cli import main

    runs = {"hf": ["--model", str(tiny_checkpoint_varied)], "edge": ["--bundle", str(tiny_bundle)]}
    for name, backend in runs.items():
        rc = main(["eval", "run", "--bench", str(facexbench_dir), *backend, "--out", str(tmp_path / name),
                   "--max-new-tokens", "3", "--bootstrap", "50"])
        assert rc == 0, capsys.readouterr().err
    docs = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in runs}
    preds = {name: _lines(tmp_path / name / "predictions.jsonl") for name in runs}
    items = {it.id: it for it in load_bench(facexbench_dir)}
    for name in runs:
        assert [p["id"] for p in preds[name]] == sorted(items)
        assert [p["prompt"] for p in preds[name]] == [items[q].prompt() for q in sorted(items)]  # the same questions
        assert preds[name][0]["images"] == [str(p) for p in items["agedb30_multiple_mcq/1"].images]  # all 3 images
        s = docs[name]["summary"]
        assert {k: v["n"] for k, v in s["by_num_images"].items()} == {"multiple": 1, "single": 2, "zero": 1}
        assert s["hit_max_new_tokens"]["unknown"] == 0  # both backends say why each answer stopped
        assert docs[name]["meta"]["system"] == "none"  # FaceLLM's authors' setting by default
    assert main(["eval", "compare", str(tmp_path / "hf" / "results.json"), str(tmp_path / "edge" / "results.json"),
                 "--out", str(tmp_path / "drift")]) == 0
    cmp = json.loads((tmp_path / "drift" / "compare.json").read_text())
    assert cmp["overall"]["n"] == 4 and cmp["only_in_a"] == cmp["only_in_b"] == []
    assert cmp["overall"]["agree"] == sum(a["predicted"] == b["predicted"]
                                          for a, b in zip(docs["hf"]["items"], docs["edge"]["items"]))


def test_eval_system_option(facexbench_dir, tiny_checkpoint, tmp_path, capsys):
    from facellm_edge.cli import main

    rc = main(["eval", "run", "--bench", str(facexbench_dir), "--model", str(tiny_checkpoint), "--out",
               str(tmp_path / "s"), "--system", "intern_vl", "--limit", "1", "--max-new-tokens", "2", "--bootstrap",
               "20"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "s" / "results.json").read_text())["meta"]["system"] == "intern_vl"
    assert "system message intern_vl" in (tmp_path / "s" / "results.md").read_text()
    capsys.readouterr()
    assert main(["eval", "run", "--bench", str(facexbench_dir), "--model", str(tiny_checkpoint), "--out",
                 str(tmp_path / "e"), "--system", " "]) == 2
    assert "--system needs none, intern_vl or the text" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
