"""The dataset layouts people really have (FairFaceGPT's, LLaMA-Factory's mllm demo / OpenAI messages, images as a
list or a string, system prompts as a first turn or a column, JSONL), read the same way by `data import-fairfacegpt`
and by train's loader: accepted -> the same records, or refused in one line naming the record."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import pytest

from facellm_edge.cli import main
from facellm_edge.data.fairfacegpt import import_fairfacegpt
from facellm_edge.errors import InputError
from facellm_edge.train.data import load_samples

SYSTEM = "You are an AI assistant specialised in analysing face images."
TURNS = [("human", "<image>\nWhat is the apparent age of this person?"), ("gpt", "About 30 years old."),
         ("human", "Is the person smiling?"), ("gpt", "Yes, slightly.")]


def _conversations(tags=("from", "value"), roles=("human", "gpt")) -> list[dict]:
    role, content = tags
    return [{role: roles[0] if r == "human" else roles[1], content: t} for r, t in TURNS]


# the FaceLLM authors' layout (LLaMA-Factory sharegpt, their data/dataset_info.json) ...
AUTHORS = {"image": "faces/a.jpg", "conversations": _conversations()}
# ... and the same record in the other layouts LLaMA-Factory documents and people use
SAME = {
    "images as a list of one": {"images": ["faces/a.jpg"], "conversations": _conversations()},
    "images as a string": {"images": "faces/a.jpg", "conversations": _conversations()},
    "from human/assistant (FaceLLM's dataset_info tags)": {
        "image": "faces/a.jpg", "conversations": _conversations(roles=("human", "assistant"))},
    "messages with role/content (mllm demo)": {
        "messages": _conversations(tags=("role", "content"), roles=("user", "assistant")), "images": ["faces/a.jpg"]},
    "image and images agreeing": {"image": "faces/a.jpg", "images": ["faces/a.jpg"],
                                  "conversations": _conversations()},
}
WITH_SYSTEM = {
    "a first turn from: system": {"image": "faces/a.jpg",
                                  "conversations": [{"from": "system", "value": SYSTEM}, *_conversations()]},
    "a first message role: system (OpenAI layout)": {
        "images": ["faces/a.jpg"], "messages": [{"role": "system", "content": SYSTEM},
                                                *_conversations(tags=("role", "content"), roles=("user", "assistant"))]},
    "a system column": {"image": "faces/a.jpg", "system": SYSTEM, "conversations": _conversations()},
    "a system turn and the same system column": {
        "image": "faces/a.jpg", "system": SYSTEM,
        "conversations": [{"from": "system", "value": SYSTEM}, *_conversations()]},
}
REFUSED = {
    "two images": ({"images": ["faces/a.jpg", "faces/a.jpg"], "conversations": _conversations()},
                   "'images' lists 2 images; a record holds one image"),
    "image keys that disagree": ({"image": "faces/a.jpg", "images": ["faces/b.jpg"], "conversations": _conversations()},
                                 "image keys disagree"),
    "a system turn and a different system column": (
        {"image": "faces/a.jpg", "system": "Be brief.",
         "conversations": [{"from": "system", "value": SYSTEM}, *_conversations()]},
        "has a system turn and a different 'system' column; keep one"),
    "a system turn that is not first": (
        {"image": "faces/a.jpg", "conversations": [*_conversations()[:2], {"from": "system", "value": SYSTEM},
                                                   *_conversations()[2:]]},
        "system turn 2: only the first turn may be a system prompt"),
    "a system column that is not a string": ({**AUTHORS, "system": ["a"]}, "'system' must be a string"),
    "an empty conversation": ({"image": "faces/a.jpg", "messages": []},
                              "no 'messages' list of turns (it is empty or not a list)"),
    "both conversations and messages": ({**AUTHORS, "messages": _conversations(("role", "content"))},
                                        "has both 'conversations' and 'messages'"),
    "a list content (OpenAI parts)": (
        {"image": "faces/a.jpg", "messages": [{"role": "user", "content": [{"type": "text", "text": "Q"}]},
                                               {"role": "assistant", "content": "A"}]},
        "turn 0 is not {'from': str, 'value': str} or {'role': str, 'content': str}"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory, astronaut_bgr) -> Path:
    root = tmp_path_factory.mktemp("layout_images")
    (root / "faces").mkdir()
    assert cv2.imwrite(str(root / "faces" / "a.jpg"), astronaut_bgr[100:300, 150:350])
    return root


def _import(tmp_path: Path, images: Path, entries: list, *, jsonl: bool = False) -> list[dict]:
    src = tmp_path / ("in.jsonl" if jsonl else "in.json")
    src.write_text("".join(json.dumps(e) + "\n" for e in entries) if jsonl else json.dumps(entries))
    out = tmp_path / "out.jsonl"
    out.unlink(missing_ok=True)
    assert import_fairfacegpt(src, images, out) == len(entries)
    return [json.loads(line) for line in out.read_text().splitlines()]


def _train(tmp_path: Path, images: Path, records: list) -> list:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_samples(data, images, skip_bad=False)


def _strip_where(samples):
    return [(s.image, s.turns, s.image_before_text, s.system) for s in samples]


@pytest.mark.parametrize("layout", sorted(SAME))
def test_layouts_read_as_the_authors_layout(tmp_path, images, layout):
    entry = SAME[layout]
    assert _import(tmp_path, images, [entry]) == _import(tmp_path, images, [AUTHORS])
    assert _strip_where(_train(tmp_path, images, [entry])) == _strip_where(_train(tmp_path, images, [AUTHORS]))


def test_mllm_demo_image_tag_without_newline(tmp_path, images):
    """LLaMA-Factory's mllm_demo.json writes "<image>Who are they?": the same user text for training."""
    demo = {"messages": [{"role": "user", "content": "<image>What is the apparent age of this person?"},
                         *_conversations(tags=("role", "content"), roles=("user", "assistant"))[1:]],
            "images": ["faces/a.jpg"]}
    assert _strip_where(_train(tmp_path, images, [demo])) == _strip_where(_train(tmp_path, images, [AUTHORS]))
    (rec,) = _import(tmp_path, images, [demo])
    assert rec["conversations"][0] == {"from": "human", "value": "<image>What is the apparent age of this person?"}


@pytest.mark.parametrize("layout", sorted(WITH_SYSTEM))
def test_a_system_prompt_is_carried_never_dropped(tmp_path, images, layout):
    entry = WITH_SYSTEM[layout]
    (rec,) = _import(tmp_path, images, [entry])
    (plain,) = _import(tmp_path, images, [AUTHORS])
    assert rec == {**plain, "system": SYSTEM}  # the record keeps it, its turns are the authors' layout's
    (sample,) = _train(tmp_path, images, [entry])
    assert sample.system == SYSTEM
    assert sample.messages()[0] == {"role": "system", "content": [{"type": "text", "text": SYSTEM}]}
    assert sample.messages()[1:] == _train(tmp_path, images, [AUTHORS])[0].messages()
    # the imported record trains with the same system prompt
    assert _strip_where(_train(tmp_path, images, [rec])) == _strip_where([sample])


@pytest.mark.parametrize("layout", sorted(REFUSED))
def test_layouts_refused_in_one_line_naming_the_record(tmp_path, images, layout, capsys):
    entry, reason = REFUSED[layout]
    src = tmp_path / "in.json"
    src.write_text(json.dumps([AUTHORS, entry]))
    rc = main(["data", "import-fairfacegpt", str(src), "--images", str(images), "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert rc == 3 and f"{src} entry 1: {reason}" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.jsonl").exists()
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(AUTHORS) + "\n" + json.dumps(entry) + "\n")
    with pytest.raises(InputError) as e:
        load_samples(data, images, skip_bad=False)
    assert f"1 bad record(s) of 2 in {data}: line 2: {reason}" in str(e.value) and "\n" not in str(e.value)


def test_importer_reads_jsonl(tmp_path, images):
    entries = [AUTHORS, {**SAME["messages with role/content (mllm demo)"], "id": "m"}, WITH_SYSTEM["a system column"]]
    assert _import(tmp_path, images, entries, jsonl=True) == _import(tmp_path, images, entries)
    one = _import(tmp_path, images, [AUTHORS], jsonl=True)  # a JSONL of one line is one record, too
    assert one == _import(tmp_path, images, [AUTHORS])
    src = tmp_path / "torn.jsonl"
    src.write_text(json.dumps(AUTHORS) + "\n" + json.dumps(AUTHORS)[:-5] + "\n")
    with pytest.raises(InputError, match=r"torn.jsonl line 2 is not valid JSON .*one record a line"):
        import_fairfacegpt(src, images, tmp_path / "o.jsonl")


def test_importer_image_tag_rules(tmp_path, images):
    later = {"image": "faces/a.jpg", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"},
                                                       {"from": "human", "value": "<image>\nQ2"},
                                                       {"from": "gpt", "value": "A2"}]}
    for entry, reason in [(later, "entry 0: <image> is in a later turn; it must be in the first user turn"),
                          ({**later, "conversations": [{"from": "human", "value": "<image><image>Q"},
                                                       {"from": "gpt", "value": "A"}]},
                           "entry 0: more than one <image> tag (one image per record)")]:
        src = tmp_path / "in.json"
        src.write_text(json.dumps([entry]))
        with pytest.raises(InputError, match=re.escape(reason)):
            import_fairfacegpt(src, images, tmp_path / "o.jsonl")


def test_a_system_prompt_reaches_the_chat_template_and_is_not_learned(tmp_path, images, tiny_checkpoint):
    from transformers import AutoProcessor

    from facellm_edge.train.collate import IGNORE_INDEX, Encoder

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    tok = processor.tokenizer
    (sample,) = _train(tmp_path, images, [WITH_SYSTEM["a system column"]])
    enc = Encoder(processor, max_length=2048)(sample)
    text = tok.decode(enc.input_ids)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
    learned = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    answers = [t for r, t in TURNS if r == "gpt"]
    assert learned == [t for a in answers for t in tok.encode(a, add_special_tokens=False) + [eot]]
