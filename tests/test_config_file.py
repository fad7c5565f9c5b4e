"""`--config facellm.toml`: option values from a file, flags win, unknown keys refused in one line, every key
documented."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import pytest

from facellm_edge.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


@pytest.fixture()
def photo(tmp_path, astronaut_bgr) -> Path:
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), astronaut_bgr)
    return path


def _toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.slow  # tiny_bundle
def test_values_come_from_the_file_and_flags_win(tiny_bundle, yunet_model, photo, tmp_path, capsys):
    cfg = _toml(tmp_path / "f.toml", f'bundle = "{tiny_bundle}"\ndetector_model = "{yunet_model}"\nmax_tokens = 3\n'
                                     '[ask]\njson = true\n[run]\nquestion = "unused by ask"\n')
    assert main(["ask", str(photo), "Age?", "--config", str(cfg)]) == 0
    (face,) = json.loads(capsys.readouterr().out)["faces"]
    assert 1 <= face["n_tokens"] <= 3
    assert main(["ask", str(photo), "Age?", "--config", str(cfg), "--max-tokens", "1"]) == 0
    (face,) = json.loads(capsys.readouterr().out)["faces"]
    assert face["n_tokens"] == 1  # the flag wins over the file


@pytest.mark.slow  # tiny_bundle
def test_run_takes_its_required_question_and_source_from_the_file(tiny_bundle, yunet_model, photo, tmp_path, capsys):
    jsonl = tmp_path / "a.jsonl"
    cfg = _toml(tmp_path / "f.toml", f'bundle = "{tiny_bundle}"\ndetector_model = "{yunet_model}"\nmax_tokens = 2\n'
                                     f'[run]\nsource = "{photo}"\nquestion = "Age?"\nno_display = true\n'
                                     f'jsonl = "{jsonl}"\n')
    assert main(["run", "--config", str(cfg)]) == 0
    (line,) = jsonl.read_text().splitlines()
    assert json.loads(line)["question"] == "Age?"


@pytest.mark.parametrize("text, message", [
    ("colour = 1\n", "unknown key 'colour'"),
    ("json = true\n", "unknown key 'json' (put it under [ask])"),
    ("[paint]\nx = 1\n", "[paint] is not a command"),
    ("[ask]\nimage = 'a.png'\n", "[ask] has unknown key 'image'"),
    ("max_tokens = 'many'\n", "invalid value for '--max-tokens'"),
    ("max_tokens = \n", "is not valid TOML"),
])
def test_bad_files_are_one_line(photo, tmp_path, capsys, text, message):
    cfg = _toml(tmp_path / "f.toml", text)
    rc = main(["ask", str(photo), "Age?", "--config", str(cfg)])
    err = capsys.readouterr().err.strip()
    assert rc in (2, 3) and err.startswith("error: ") and message in err and "\n" not in err, err
    rc = main(["ask", str(photo), "Age?", "--config", str(tmp_path / "missing.toml")])
    assert rc == 3 and "no such file" in capsys.readouterr().err


def test_every_key_is_documented():
    from facellm_edge.cli import cli
    from facellm_edge.commands.config_file import SECTIONS, option_keys

    documented = set(re.findall(r"^\| `([a-z_]+)` \|", DOCS.read_text(encoding="utf-8"), re.M))
    assert set(SECTIONS) <= set(cli.commands)
    for name in SECTIONS:
        missing = set(option_keys(cli.commands[name].load())) - documented
        assert not missing, (name, sorted(missing))
