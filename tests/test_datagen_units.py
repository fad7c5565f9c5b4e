"""Prompt families, response validation, the rate limiter and the FairFaceGPT importer."""

from __future__ import annotations

import json
import threading

import cv2
import pytest

from facellm_edge.cli import main
from facellm_edge.data.backends import _retry_after
from facellm_edge.data.build import RateLimiter
from facellm_edge.data.fairfacegpt import import_fairfacegpt
from facellm_edge.data.labels import FaceLabels
from facellm_edge.data.prompts import FAMILIES, InvalidResponse, build_prompt, get_family, parse_response
from facellm_edge.errors import InputError

LAB = FaceLabels("val/1.jpg", (("age", "20-29"), ("gender", "Male"), ("race", "East Asian"), ("eyewear", "glasses"),
                               ("hat", "none")))


def test_families_cover_the_paper():
    assert [f.name for f in FAMILIES] == ["demographics", "facial_structure", "skin_texture", "expression",
                                          "lighting_quality", "pose", "forensic", "description"]
    p = build_prompt(LAB, get_family("pose"))
    assert "age: 20-29; gender: Male; race: East Asian; eyewear: glasses" in p
    assert "must NOT mention" in p and "JSON" in p


@pytest.mark.parametrize("reply, family, error", [
    ('{"question": "How is the head turned?", "answer": "Slightly to the left."}', "pose", None),
    ('```json\n{"question": "How is the head turned?", "answer": "Slightly left."}\n```', "pose", None),
    ('{"question": "What age range fits?", "answer": "Likely 20-29, from the smooth skin."}', "demographics", None),
    ('{"question": "Is this East Asian man smiling?", "answer": "Yes."}', "expression", "question leaks the known label 'East Asian'"),
    ('{"question": "How old?", "answer": "About 20-29."}', "pose", "answer quotes the known label '20-29'"),
    ('{"question": "What is the gender?", "answer": "The person is a female."}', "pose", None),  # 'male' is not 'female'
    ('{"question": "Any glasses?", "answer": "None visible."}', "pose", "question leaks the known label 'glasses'"),
    ('{"question": "Is there a hat?", "answer": "None: the hair is uncovered."}', "pose", None),  # generic value
    ('{"question": "Describe the face.", "answer": "I\'m sorry, I cannot help."}', "description", "refusal"),
    ('{"question": "", "answer": "x"}', "pose", "no non-empty 'question'"),
    ('{"question": "q?"}', "pose", "no non-empty 'answer'"),
    ('["q", "a"]', "pose", "not a JSON object"),
    ("Sure! Here is a question: ...", "pose", "not JSON"),
    # half a surrogate pair is no text: a bad reply (asked again), not a dataset that fails when it is written
    ('{"question": "How is the head turned?", "answer": "Left \\ud800."}', "pose", "not JSON .*surrogate"),
])
def test_parse_response(reply, family, error):
    if error is None:
        q, a = parse_response(reply, LAB, get_family(family))
        assert q and a
    else:
        with pytest.raises(InvalidResponse, match=error):
            parse_response(reply, LAB, get_family(family))


def test_rate_limiter_spaces_requests_and_stops():
    """On a fake clock (no wall-clock asserts): one token per interval, an early request waits for its turn, and
    a waiting request returns False once stopped."""
    now = [0.0]
    stop = threading.Event()
    lim = RateLimiter(rpm=960, clock=lambda: now[0])  # one per 1/16 s: exact in binary floating point
    for i in range(6):  # one request per interval: each is granted at once
        now[0] = i / 16
        assert lim.acquire(stop)
    now[0] = 6 / 16 - 1 / 64  # the seventh comes early: it waits until the clock reaches its turn
    got = []
    th = threading.Thread(target=lambda: got.append(lim.acquire(stop)))
    th.start()
    th.join(timeout=0.3)
    assert th.is_alive() and got == []
    now[0] = 6 / 16
    lim.wake()
    th.join(timeout=5)
    assert got == [True]
    slow = RateLimiter(rpm=1, clock=lambda: now[0])  # the next token only 60 s later
    assert slow.acquire(stop)
    got = []
    th = threading.Thread(target=lambda: got.append(slow.acquire(stop)))
    th.start()
    stop.set()
    slow.wake()
    th.join(timeout=5)
    assert got == [False] and not th.is_alive()


def test_retry_after_header():
    assert _retry_after("0") == 0.0 and _retry_after("2.5") == 2.5 and _retry_after(None) is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: retry now
    assert _retry_after("soon") is None


def test_import_fairfacegpt(tmp_path, astronaut_bgr, capsys):
    images = tmp_path / "imgs"
    (images / "train").mkdir(parents=True)
    cv2.imwrite(str(images / "train" / "1.jpg"), astronaut_bgr)
    data = [
        {"image": "train/1.jpg", "conversations": [{"from": "human", "value": "What is the pose?"},
                                                   {"from": "gpt", "value": "Frontal."}]},
        {"id": "k2", "image": "train/1.jpg", "conversations": [{"role": "user", "content": "<image>\nLighting?"},
                                                               {"role": "assistant", "content": "Soft."}],
         "category": "lighting"},
        {"image_path": "train/1.jpg", "question": "Expression?", "answer": "Smiling.", "labels": {"age": "30-39"}},
    ]
    src = tmp_path / "dataset.json"
    src.write_text(json.dumps(data))
    out = tmp_path / "qa.jsonl"
    assert main(["data", "import-fairfacegpt", str(src), "--images", str(images), "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["train/1.jpg#0", "k2", "train/1.jpg#2"]
    assert recs[0]["conversations"][0] == {"from": "human", "value": "<image>\nWhat is the pose?"}
    assert recs[1]["conversations"] == [{"from": "human", "value": "<image>\nLighting?"},
                                        {"from": "gpt", "value": "Soft."}]
    assert recs[1]["family"] == "lighting" and recs[2]["labels"] == {"age": "30-39"}
    # refuses to overwrite; bad entries are named
    assert main(["data", "import-fairfacegpt", str(src), "--out", str(out)]) == 4
    for entry, msg in [({"image": "train/1.jpg"}, "entry 0: needs 'conversations'"),
                       ({"image": "train/2.jpg", "question": "q", "answer": "a"}, "are not under"),
                       ({"conversations": []}, "entry 0: no image path"),
                       ({"image": "a.jpg", "conversations": [{"from": "gpt", "value": "x"}]}, "alternate")]:
        src.write_text(json.dumps([entry]))
        with pytest.raises(InputError, match=msg):
            import_fairfacegpt(src, images, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


def test_import_ids_are_strings_or_integers_and_generated_ones_never_clash(tmp_path, astronaut_bgr):
    images = tmp_path / "imgs"
    images.mkdir()
    cv2.imwrite(str(images / "1.jpg"), astronaut_bgr)
    turn = {"question": "Pose?", "answer": "Frontal."}
    src, out = tmp_path / "d.json", tmp_path / "o.jsonl"
    # a record named "1.jpg#1" and an unnamed second record (whose default id that is): both kept, ids unique
    src.write_text(json.dumps([{"id": "1.jpg#1", "image": "1.jpg", **turn}, {"image": "1.jpg", **turn},
                               {"id": 7, "image": "1.jpg", **turn}]))
    assert import_fairfacegpt(src, images, out) == 3
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["1.jpg#1", "1.jpg#1+", "7"]
    for bad in (None, True, {"a": 1}, [1], " "):  # no id: refused, not written as "None" or "{'a': 1}"
        src.write_text(json.dumps([{"id": bad, "image": "1.jpg", **turn}]))
        with pytest.raises(InputError, match="entry 0: 'id' must be a non-empty string or an integer"):
            import_fairfacegpt(src, images, tmp_path / "o2.jsonl")
    src.write_text(json.dumps([{"id": "k", "image": "1.jpg", **turn}, {"id": "k", "image": "1.jpg", **turn}]))
    with pytest.raises(InputError, match="entry 1: duplicate id 'k'"):
        import_fairfacegpt(src, images, tmp_path / "o2.jsonl")
