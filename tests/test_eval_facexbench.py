"""FaceXBench's real layout (per-task files under benchmark/, images under benchmark/images/<task>/): prompts
byte-identical to FaceXBench's evaluate.py, tools_use context, num_images, a "Cannot determine" option."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from facellm_edge.evaluate.mcq import load_bench

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
