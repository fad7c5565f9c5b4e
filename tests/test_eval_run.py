"""`eval` through the transformers path on a tiny random InternVL with real photos; bench validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

from facellm_edge.cli import main
from facellm_edge.errors import InputError
from facellm_edge.eval.mcq import load_bench
from facellm_edge.io import MARKER


@pytest.fixture()
def bench(tmp_path, astronaut_bgr, t1_bgr) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "astronaut.jpg"), astronaut_bgr)
    h, w = t1_bgr.shape[:2]  # a square crop of the group photo: one 448 px tile, keeps the tiny model fast
    side = min(h, w)
    cv2.imwrite(str(images / "t1.jpg"), t1_bgr[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2])
    items = [
        {"id": "q1", "question": "What is the apparent age of the person?", "options": {"A": "0-2", "B": "20-29",
         "C": "30-39", "D": "more than 70"}, "answer": "C", "images": ["astronaut.jpg"], "category": "age",
         "task": "age_estimation", "group": {"gender": "female"}},
        {"id": "q2", "question": "How many faces are in the image?", "options": ["1", "3", "6", "9"], "answer": "C",
         "images": ["t1.jpg"], "category": "crowd", "task": "crowd_counting", "group": {"gender": "mixed"}},
        {"id": "q3", "question": "Which expression is shown?", "options": {"A": "Happy", "B": "Sad"}, "answer": "A",
         "images": ["astronaut.jpg"], "category": "expression", "task": "fer"},
        {"id": "q4", "question": "Do the two images show the same person?", "options": {"A": "Yes", "B": "No"},
         "answer": "B", "images": ["astronaut.jpg", "t1.jpg"], "category": "recognition", "task": "verification",
         "group": {"gender": "female"}},
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(items))
    return path, images


def test_eval_transformers_path(tiny_checkpoint, bench, tmp_path, capsys):
    path, images = bench
    out = tmp_path / "res"
    rc = main(["eval", "--bench", str(path), "--images", str(images), "--model", str(tiny_checkpoint), "--out",
               str(out), "--max-new-tokens", "4", "--bootstrap", "200"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "predictions.jsonl", "results.json", "results.md",
                                                     "results.png"]
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == "facellm-edge/eval-results/1" and doc["meta"]["backend"] == "transformers"
    items = doc["items"]
    assert [it["id"] for it in items] == ["q1", "q2", "q3", "q4"]
    for it in items:
        assert isinstance(it["raw"], str) and it["seconds"] > 0
        assert isinstance(it["truncated"], bool)  # transformers: the answer's length against the cap, and its end
        assert it["predicted"] is None or it["predicted"] in "ABCD"
        assert it["correct"] == (it["predicted"] == it["answer"])
    s = doc["summary"]
    assert s["overall"]["n"] == 4 and s["overall"]["correct"] == sum(it["correct"] for it in items)
    assert set(s["by_category"]) == {"age", "crowd", "expression", "recognition"}
    assert set(s["by_task"]) == {"age_estimation", "crowd_counting", "fer", "verification"}
    assert {k: v["n"] for k, v in s["by_group"]["gender"].items()} == {"female": 2, "mixed": 1}
    assert 0.0 <= s["overall"]["ci_low"] <= s["overall"]["accuracy"] <= s["overall"]["ci_high"] <= 1.0
    md = (out / "results.md").read_text()
    assert "| age |" in md and "| verification |" in md
    png = cv2.imread(str(out / "results.png"))
    assert png is not None and png.shape[0] > 100
    # the same out again without --force is refused before any work
    assert main(["eval", "--bench", str(path), "--images", str(images), "--model", str(tiny_checkpoint), "--out",
                 str(out)]) == 4


def test_transformers_backend_gives_each_image_its_own_block(tiny_checkpoint, bench):
    from transformers import AutoTokenizer

    from facellm_edge.eval.backends import TransformersBackend, TransformersConfig

    path, images = bench
    items = {it.id: it for it in load_bench(path, images)}
    backend = TransformersBackend(TransformersConfig(model=str(tiny_checkpoint)))
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ctx, start = tok.convert_tokens_to_ids("<IMG_CONTEXT>"), tok.convert_tokens_to_ids("<img>")
    per_image = backend._processor.image_seq_length
    for qid, n_images in (("q1", 1), ("q4", 2)):
        inputs = backend.encode(items[qid])
        ids = inputs["input_ids"][0].numpy()
        assert int((ids == start).sum()) == n_images  # one <img>...</img> block per image
        # each block holds that image's tiles (the processor may tile large images): 256 tokens per tile
        assert int((ids == ctx).sum()) == inputs["pixel_values"].shape[0] * per_image


def _write(tmp_path, items) -> Path:
    p = tmp_path / "b.json"
    p.write_text(items if isinstance(items, str) else json.dumps(items))
    return p


GOOD = {"id": "x", "question": "Q?", "options": {"A": "a", "B": "b"}, "answer": "A", "images": ["astronaut.jpg"],
        "category": "c", "task": "t"}


@pytest.mark.parametrize("items, expected", [
    ("[{not json", "is not valid JSON"),
    ([], "non-empty JSON list"),
    ([{**GOOD, "answer": "C"}], "answer 'C' is not one of the option letters A, B"),
    ([{**GOOD, "options": {"A": "a"}}], "needs at least 2 options"),
    ([{**GOOD, "options": {"A": "a", "C": "c"}}], "option keys must be A, B, C"),
    ([{k: v for k, v in GOOD.items() if k != "question"}], "field 'question' must be a non-empty string"),
    ([{k: v for k, v in GOOD.items() if k != "category"}], "field 'category'"),
    ([{**GOOD, "images": []}], "field 'images' must be a non-empty list"),
    ([{**GOOD, "images": ["missing.jpg"]}], "missing.jpg does not exist"),
    ([GOOD, GOOD], "item 1 (id x): duplicate id"),
    ([{**GOOD, "group": 3}], "field 'group'"),
])
def test_bench_file_malformed(bench, tmp_path, items, expected, capsys):
    _, images = bench
    p = _write(tmp_path, items)
    with pytest.raises(InputError) as ei:
        load_bench(p, images)
    assert expected in str(ei.value)
    # through the CLI: one line, exit code 3, nothing written
    rc = main(["eval", "--bench", str(p), "--images", str(images), "--model", "unused", "--out", str(tmp_path / "o")])
    assert rc == 3 and expected in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bench_options_list_and_prompt(bench):
    path, images = bench
    items = load_bench(path, images)
    q2 = items[1]
    assert q2.options == (("A", "1"), ("B", "3"), ("C", "6"), ("D", "9"))
    assert q2.prompt().splitlines()[-4:-2] == ["(A) 1", "(B) 3"]
    assert dict(items[0].groups) == {"gender": "female"} and items[2].groups == ()


def test_eval_usage_errors(bench, tmp_path, capsys):
    path, images = bench
    assert main(["eval", "--bench", str(path), "--images", str(images)]) == 2
    assert "exactly one of --model" in capsys.readouterr().err
    assert main(["eval", "--bench", str(path), "--images", str(images), "--model", "m", "--bundle", "b"]) == 2
    assert main(["eval", "--images", str(images)]) == 2
    capsys.readouterr()
    assert main(["eval", "--bench", str(path), "--images", str(images), "--model", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err  # the processor is loaded first (load_processor), so it names the failure
    assert err.startswith(f"error: cannot load the processor/tokenizer of {tmp_path / 'nope'}: ") and \
        err.count("\n") == 1
    # `eval run` is the same command, with the same checks
    assert main(["eval", "run", "--bench", str(path), "--images", str(images)]) == 2
    assert "exactly one of --model" in capsys.readouterr().err
    # an unknown rule set is refused before any work
    assert main(["eval", "run", "--bench", str(path), "--images", str(images), "--model", str(tmp_path / "nope"),
                 "--letter-rules", "lax", "--out", str(tmp_path / "o")]) == 2
    assert "unknown --letter-rules 'lax'; choose from facexbench, robust" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # tiny_bundle
def test_eval_bundle_path_and_compare(tiny_bundle, tiny_checkpoint, bench, tmp_path, capsys):
    path, images = bench  # q4 has two images: the bundle answers it like the transformers backend
    rc = main(["eval", "--bench", str(path), "--images", str(images), "--bundle", str(tiny_bundle), "--out",
               str(tmp_path / "edge"), "--max-new-tokens", "4", "--bootstrap", "100"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "edge" / "results.json").read_text())
    assert doc["meta"]["backend"] == "bundle" and [it["id"] for it in doc["items"]] == ["q1", "q2", "q3", "q4"]
    for it in doc["items"]:
        assert isinstance(it["raw"], str) and (it["predicted"] is None or it["predicted"] in "ABCD")
        assert isinstance(it["truncated"], bool)  # the runtime says why each answer stopped
    assert doc["summary"]["hit_max_new_tokens"] == {"count": sum(it["truncated"] for it in doc["items"]),
                                                    "unknown": 0}
    assert (tmp_path / "edge" / "results.png").stat().st_size > 0
    preds = [json.loads(line) for line in (tmp_path / "edge" / "predictions.jsonl").read_text().splitlines()]
    asked = {it.id: it for it in load_bench(path, images)}
    assert [(p["id"], p["prompt"], p["raw"]) for p in preds] == [(it["id"], asked[it["id"]].prompt(), it["raw"])
                                                                 for it in doc["items"]]
    # the quantisation-drift report between the edge run and itself: everything agrees, no delta
    assert main(["eval", "compare", str(tmp_path / "edge" / "results.json"), str(tmp_path / "edge" / "results.json"),
                 "--out", str(tmp_path / "cmp")]) == 0
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert cmp["overall"]["agreement"] == 1.0 and cmp["overall"]["delta"] == 0.0


def test_facexbench_native_task_files(tmp_path, astronaut_bgr):
    """FaceXBench's own layout: per-task files with prepend/postpend text and image paths relative to the file."""
    root = tmp_path / "benchmark"
    (root / "images" / "age").mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "age" / "question_1.png"), astronaut_bgr)
    task = {"category": "bias_fairness", "sub-category": "age", "dataset": "fairface", "question_type": "MCQ",
            "num_images": "single", "prepend_text": "Age groups: 0-2, 3-9, 10-19, 20-29, 30-39.",
            "postpend_text": "Please answer with only the option letter.",
            "questions": {"1": {"image_paths": ["images/age/question_1.png"],
                                "question_text": "Estimate the age group of the person in this image.",
                                "options": ["30-39", "20-29", "None of the above", "0-2"],
                                "correct_answer_option": "A", "answer": "30-39"}}}
    (root / "fairface_single_mcq_age_test.json").write_text(json.dumps(task))
    (item,) = load_bench(root / "fairface_single_mcq_age_test.json")
    assert item.id == "fairface_single_mcq_age_test/1" and item.answer == "A"
    assert (item.category, item.task) == ("bias_fairness", "age")
    assert item.images == (root / "images" / "age" / "question_1.png",)
    # byte-identical to FaceXBench's evaluate.py: prepend_text only on request, postpend before the options
    assert item.prompt() == ("Estimate the age group of the person in this image.\n"
                             "Please answer with only the option letter.\n"
                             "(A) 30-39\n(B) 20-29\n(C) None of the above\n(D) 0-2\n")
    assert item.prompt(prepend_text=True).startswith("Age groups: 0-2, 3-9, 10-19, 20-29, 30-39.\nEstimate")
    assert item.num_images == "single"
    task["sub-category"] = "gender"
    (root / "fairface_single_mcq_gender_test.json").write_text(json.dumps(task))
    items = load_bench(root)  # a folder of task files
    assert [it.id for it in items] == ["fairface_single_mcq_age_test/1", "fairface_single_mcq_gender_test/1"]
    task["questions"]["1"]["correct_answer_option"] = "E"
    (root / "fairface_single_mcq_gender_test.json").write_text(json.dumps(task))
    with pytest.raises(InputError, match=r"gender_test.json item 0 \(id fairface_single_mcq_gender_test/1\): answer"):
        load_bench(root)


@pytest.mark.slow  # tiny_bundle
def test_a_stopped_run_keeps_its_answers_and_resumes(tiny_bundle, bench, tmp_path, capsys, monkeypatch):
    """An image that cannot be decoded at question 3 stops the run (exit 3) but keeps the two answers before it;
    `--resume` answers only the two missing ones and writes the whole run; a Ctrl-C keeps its answers the same way."""
    import os
    import signal

    from facellm_edge.eval.backends import BundleBackend

    path, images = bench
    items = json.loads(path.read_text())
    items[2]["images"] = ["broken.jpg"]
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    path.write_text(json.dumps(items))
    out = tmp_path / "run"
    args = ["eval", "run", "--bench", str(path), "--images", str(images), "--bundle", str(tiny_bundle), "--out",
            str(out), "--max-new-tokens", "3", "--bootstrap", "50"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "broken.jpg" in err.splitlines()[-1] and "kept 2 of 4 answers" in err
    doc = json.loads((out / "results.json").read_text())
    assert [it["id"] for it in doc["items"]] == ["q1", "q2"]
    assert doc["meta"]["partial"]["answered"] == 2 and doc["meta"]["partial"]["questions"] == 4
    assert "broken.jpg" in doc["meta"]["partial"]["stopped"] and "partial run" in (out / "results.md").read_text()
    before = (out / "predictions.jsonl").read_text().splitlines()

    # the same out without --resume is refused; --resume with other settings or with --force too
    assert main(args) == 4
    assert main([*args, "--resume", "--max-new-tokens", "5"]) == 2
    assert "max_new_tokens 3, this one 5" in capsys.readouterr().err
    assert main([*args, "--resume", "--force"]) == 2
    assert main([*args[:-2], "--resume", "--bundle", str(tiny_bundle), "--llm-quant", "f32"]) == 2
    assert "was made with model" in capsys.readouterr().err

    cv2.imwrite(str(images / "broken.jpg"), cv2.imread(str(images / "astronaut.jpg")))
    asked = []
    real = BundleBackend.answer
    monkeypatch.setattr(BundleBackend, "answer", lambda self, item: asked.append(item.id) or real(self, item))
    assert main([*args, "--resume"]) == 0, capsys.readouterr().err
    assert asked == ["q3", "q4"]
    doc = json.loads((out / "results.json").read_text())
    assert [it["id"] for it in doc["items"]] == ["q1", "q2", "q3", "q4"]
    assert "partial" not in doc["meta"] and doc["meta"]["resumed"] == 2 and doc["summary"]["overall"]["n"] == 4
    assert (out / "predictions.jsonl").read_text().splitlines()[:2] == before  # the kept answers, as they were
    assert main([*args, "--resume"]) == 2  # complete: nothing to resume
    assert "is complete" in capsys.readouterr().err

    # Ctrl-C at the second question (a real SIGINT through the CLI's handler): exit 130, the first answer kept
    def interrupt(self, item):
        if item.id == "q2":
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, item)

    monkeypatch.setattr(BundleBackend, "answer", interrupt)
    out2 = tmp_path / "run2"
    assert main([str(out2) if a == str(out) else a for a in args]) == 130
    doc = json.loads((out2 / "results.json").read_text())
    assert [it["id"] for it in doc["items"]] == ["q1"] and "Ctrl-C" in doc["meta"]["partial"]["stopped"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]  # no temporary folder left
