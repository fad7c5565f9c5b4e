"""Every bad input is one line on stderr and a specific exit code: usage errors (typer's own click), arguments
whose bytes are not UTF-8, files the user may not read, and a sweep over every command's typical mistakes."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from facellm_edge.cli import main

REPO = Path(__file__).resolve().parents[1]


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, f"expected one line on stderr, got: {err!r}"
    return err.strip()


# -- usage errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, names",
    [
        (["ask", "p.png", "Age?", "--max-tokens", "0"], ["'--max-tokens'", "greater than or equal to 1",
                                                         "usage: facellm-edge ask [OPTIONS]"]),
        (["ask", "p.png", "Age?", "--max-tokens", "lots"], ["'--max-tokens'", "valid integer"]),
        (["export"], ["missing argument 'model'", "usage: facellm-edge export [OPTIONS]"]),
        (["export", "ckpt"], ["missing option '--out'"]),
        (["export", "ckpt", "--out", "b", "--shiny"], ["no such option: --shiny", "usage: facellm-edge export"]),
        (["run", "--camera", "-1", "--question", "Age?"], ["'--camera'", "greater than or equal to 0"]),
        (["data", "build", "--labels"], ["'--labels'", "requires an argument", "usage: facellm-edge data build"]),
        (["eval", "--limit", "0"], ["'--limit'"]),
        (["bench", "--runs", "many"], ["'--runs'", "usage: facellm-edge bench"]),
        (["frobnicate"], ["no such command 'frobnicate'", "usage: facellm-edge [OPTIONS] COMMAND"]),
    ],
)
def test_usage_errors_name_the_option_and_exit_2(argv, names, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(argv)
    line = _err_line(capsys)
    assert rc == 2, line
    assert line.startswith("error: ") and "unexpected" not in line
    for name in names:
        assert name in line, line
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("argv, message", [
    (["export", "ckpt", "--out", "b", "--quant", "q9_9"], "unknown quant 'q9_9'; choose from"),
    pytest.param(["ask", "{photo}", "Age?", "--bundle", "{bundle}", "--device", "tpu"],
                 "unknown device 'tpu'; choose one of", marks=pytest.mark.slow),  # tiny_bundle
    (["ask", "{photo}", "Age?", "--detector", "haar"], "unknown detector 'haar'; choose one of"),
    (["train", "--base", "b", "--data", "d.json", "--images", ".", "--out", "o", "--lr-scheduler", "zigzag"],
     "--lr-scheduler must be one of"),
    # an empty --bundle is no bundle (Path("") is the current folder, which was checked as one)
    (["ask", "{photo}", "Age?", "--bundle", ""], "--bundle is empty"),
    # --whole-image cuts no face out: --save-crops would silently write nothing
    (["ask", "{photo}", "Age?", "--whole-image", "--save-crops", "crops"], "with --whole-image there are none"),
])
def test_bad_choices_are_usage_errors(argv, message, photos, tmp_path, capsys, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.json").write_text("[]")
    bundle = request.getfixturevalue("tiny_bundle") if "{bundle}" in argv else None  # exported only when used
    rc = main([a.replace("{photo}", str(photos["astronaut"])).replace("{bundle}", str(bundle)) for a in argv])
    line = _err_line(capsys)
    assert rc == 2 and message in line, line
    assert [p.name for p in tmp_path.iterdir()] == ["d.json"]


def test_bare_command_prints_help_not_an_error(capsys):
    rc = main([])
    cap = capsys.readouterr()
    assert rc == 2 and "Usage: facellm-edge" in cap.out and cap.err == ""


# -- arguments whose bytes are not UTF-8 --------------------------------------------------------------
NOT_UTF8 = os.fsdecode(b"caf\xe9?")  # what Python makes of Latin-1 bytes in argv: a lone surrogate


@pytest.mark.slow  # tiny_bundle
def test_question_that_is_not_utf8_names_the_argument(photos, bundle_args, capsys):
    photo = photos["astronaut"]
    rc = main(["ask", str(photo), NOT_UTF8, *bundle_args])
    line = _err_line(capsys)
    assert rc == 2, line
    assert line == "error: QUESTION is not valid UTF-8 text (b'caf\\xe9?'); pass it in UTF-8"
    rc = main(["run", "--source", str(photo), "--no-display", f"--question={NOT_UTF8}", *bundle_args])
    line = _err_line(capsys)
    assert rc == 2 and line.startswith("error: --question is not valid UTF-8 text"), line


@pytest.mark.slow  # tiny_bundle
def test_file_name_that_is_not_utf8_still_works(photos, bundle_args, tmp_path, capsys):
    """Linux file names are bytes: a Latin-1 name is a valid path, not an error."""
    latin1 = tmp_path / os.fsdecode(b"astr\xe9.png")
    shutil.copy(photos["astronaut"], latin1)
    rc = main(["ask", str(latin1), "Age?", "--json", *bundle_args])
    assert rc == 0, capsys.readouterr().err
    assert '"no_face": false' in capsys.readouterr().out


# -- files the user may not read (tests run as root, which ignores permission bits: drop that power) ---------
def _unprivileged() -> list[str]:
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot take away root's right to read every file")
    # root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH is held to permission bits like any other user
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def _lock(path: Path, mode: int) -> None:
    """Make ``path`` another user's with ``mode`` (not root: our own file with no permission at all)."""
    if os.geteuid() == 0:
        for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
            os.chown(p, 65534, 65534)
        os.chmod(path, mode)
    else:
        os.chmod(path, 0)


def _cli(argv: list[str], cwd: Path, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (real stderr: log lines and tracebacks count), offline, with its own cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(cwd / ".." / "cache")}
    return subprocess.run([*prefix, sys.executable, "-m", "facellm_edge.cli", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.mark.slow  # tiny_bundle
@pytest.mark.parametrize("locked, mode", [(".", 0o700), ("manifest.json", 0o600), ("llm/q8_0.gguf", 0o600),
                                          ("vision/int8.onnx", 0o600)])
def test_unreadable_bundle_is_one_line_permission_denied(locked, mode, photos, tiny_bundle, yunet_model, tmp_path):
    prefix = _unprivileged()
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    _lock(bundle / locked, mode)
    r = _cli(["ask", str(photos["astronaut"]), "Age?", "--bundle", str(bundle), "--detector-model", str(yunet_model),
              "--quant", "q8_0", "--precision", "int8", "--max-tokens", "2"], tmp_path, prefix)
    assert r.returncode == 3, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert "permission denied" in r.stderr and "unexpected" not in r.stderr
    assert str(bundle) in r.stderr  # names what it could not read
    assert "re-export" not in r.stderr  # the bundle is fine: re-exporting would not help
    assert r.stdout == ""


@pytest.mark.slow  # imports torch and transformers in a fresh process
def test_unreadable_checkpoint_weights_say_permission_denied(tiny_checkpoint, tmp_path):
    prefix = _unprivileged()
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    _lock(ckpt / "model.safetensors", 0o600)
    r = _cli(["export", str(ckpt), "--out", str(tmp_path / "b"), "--quant", "q8_0", "--no-verify"], tmp_path, prefix)
    assert r.returncode == 3 and r.stderr.count("\n") == 1, r.stderr
    assert "permission denied" in r.stderr.lower() and "No such file" not in r.stderr
    assert not (tmp_path / "b").exists()


# -- sweep: every command's typical mistakes -------------------------------------------------------------
def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in root.rglob("*")}


SWEEP = [
    # (argv, exit code, what the line must name)
    (["export", "{missing}", "--out", "{tmp}/b"], 3, "{missing}"),
    (["export", "{missing}", "--out", "{tmp}/b", "--quant", "q9_9"], 2, "q9_9"),
    (["export", "{missing}", "--out", "{tmp}/b", "--vision", "png"], 2, "png"),
    (["export", "{missing}"], 2, "--out"),
    (["inspect", "{missing}"], 3, "{missing}"),
    (["inspect", "{notes}"], 3, "{notes}"),
    (["ask", "{missing}.png", "Age?"], 3, "{missing}.png"),
    (["ask", "{notes}", "Age?"], 3, "{notes}"),
    (["ask", "{photo}", "Age?", "--max-tokens", "0"], 2, "--max-tokens"),
    (["ask", "{photo}", "Age?", "--ctx", "5"], 2, "--ctx"),
    (["ask", "{photo}", "Age?", "--threads", "0"], 2, "--threads"),
    (["ask", "{photo}", "Age?", "--temperature", "-1"], 2, "--temperature"),
    (["ask", "{photo}", "Age?", "--bundle", "{missing}"], 3, "{missing}"),
    (["ask", "{photo}", "Age?", "--schema", "{missing}.json"], 3, "{missing}.json"),
    (["ask", "{photo}", "Age?", "--bundle", "{bundle}", "--detector-model", "{missing}.onnx"], 3, "{missing}.onnx"),
    (["ask", "{photo}", "Age?", "--bundle", "{bundle}", "--quant", "q2_k"], 3, "q2_k"),
    (["run", "--question", "Age?"], 2, "--source"),
    (["run", "--camera", "-1", "--question", "Age?"], 2, "--camera"),
    (["run", "--source", "{missing}.mp4", "--question", "Age?", "--no-display"], 3, "{missing}.mp4"),
    (["run", "--source", "{photo}", "--question", "Age?", "--max-frames", "-1"], 2, "--max-frames"),
    (["bench", "--bundle", "{missing}"], 3, "{missing}"),
    (["bench", "--runs", "x"], 2, "--runs"),
    (["bench", "--live-llama-threads", "a,b"], 2, "--live-llama-threads"),
    (["bench", "--synthetic", "nope", "--out", "{tmp}/bench"], 2, "nope"),
    (["train", "--base", "b", "--data", "{missing}.json", "--images", "{tmp}", "--out", "{tmp}/t"], 3,
     "{missing}.json"),
    (["train", "--base", "b", "--data", "{notes}", "--images", "{missing}", "--out", "{tmp}/t"], 3, "{missing}"),
    (["train", "--base", "b", "--data", "{notes}", "--images", "{tmp}", "--out", "{tmp}/t", "--lora-rank", "0"],
     2, "--lora-rank"),
    (["train", "--base", "b", "--data", "{notes}", "--images", "{tmp}", "--out", "{tmp}/t", "--lr", "fast"], 2,
     "--lr"),
    (["data", "build", "--labels", "{missing}.csv", "--images", "{tmp}", "--out", "{tmp}/qa.jsonl"], 3,
     "{missing}.csv"),
    (["data", "import-fairfacegpt", "{missing}.json", "--out", "{tmp}/f.jsonl"], 3, "{missing}.json"),
    (["eval", "--bench", "{missing}.json", "--bundle", "{missing}"], 3, "{missing}.json"),
    (["eval", "--bench", "{notes}"], 2, "--model"),
    (["eval", "compare", "{missing}1", "{missing}2"], 3, "{missing}1"),
    (["frobnicate"], 2, "frobnicate"),
    (["--bogus"], 2, "--bogus"),
]


def _sweep_params():
    """The fast lane runs each command's first mistake; slow: the others (a fresh process each), the cases on the
    exported tiny bundle, and `export` (its process imports torch)."""
    seen = set()
    for i, (argv, code, names) in enumerate(SWEEP):
        slow = argv[0] in seen or argv[0] == "export" or "{bundle}" in argv
        seen.add(argv[0])
        yield pytest.param(argv, code, names, id=" ".join(argv[:3]) + f" ({i})",
                           marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("argv, code, names", list(_sweep_params()))
def test_sweep_every_command_fails_with_one_line(argv, code, names, photos, tmp_path, request):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("my notes\n")  # a user file: it must come out untouched
    shutil.copy(photos["astronaut"], work / "p.png")
    bundle = request.getfixturevalue("tiny_bundle") if "{bundle}" in argv else None  # exported only when used
    subst = {"{missing}": str(work / "missing"), "{notes}": str(work / "notes.txt"), "{photo}": str(work / "p.png"),
             "{tmp}": str(work), "{bundle}": str(bundle)}

    def fill(s: str) -> str:
        for k, v in subst.items():
            s = s.replace(k, v)
        return s

    before = _tree(work)
    r = _cli([fill(a) for a in argv], work)
    assert r.returncode == code, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert fill(names) in r.stderr, r.stderr
    assert "unexpected" not in r.stderr and "Traceback" not in r.stderr
    assert _tree(work) == before  # no user file changed, nothing (temporary or not) left behind


def test_json_nested_too_deeply_is_one_line_input_error(tmp_path, capsys):
    """JSON nested deeper than Python's recursion limit (a hostile bench, predictions file, dataset or bundle
    manifest) is malformed input like any other: exit 3 and one line, not "unexpected RecursionError"."""
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.json").write_text(deep)
    (tmp_path / "deep.jsonl").write_text(deep + "\n")
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "manifest.json").write_text(deep)
    for argv in (["eval", "score", "--bench", str(tmp_path / "deep.json"), "--predictions", str(tmp_path / "deep.jsonl"),
                  "--out", str(tmp_path / "o")],
                 ["eval", "compare", str(tmp_path / "deep.json"), str(tmp_path / "deep.json"), "--out",
                  str(tmp_path / "o")],
                 ["data", "import-fairfacegpt", str(tmp_path / "deep.jsonl"), "--out", str(tmp_path / "q.jsonl")],
                 ["inspect", str(tmp_path / "bundle")]):
        assert main(argv) == 3, argv
        assert "nested too deeply" in _err_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "deep.json", "deep.jsonl"]


def test_half_a_surrogate_pair_in_a_bench_is_refused_before_the_run(tmp_path, capsys):
    """"\\udc80" is valid JSON syntax but no text: it used to fail only when the results were written, after every
    question was answered. Now the bench is refused when it is read, before the model loads."""
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.json").write_text('[{"id": "x", "question": "Q?", "options": {"A": "a", "B": "b"}, "answer": "A", '
                                     '"images": ["a.jpg"], "category": "c", "task": "t", "group": {"g": "\\udc80"}}]')
    assert main(["eval", "run", "--bench", str(tmp_path / "b.json"), "--model", "unused", "--out",
                 str(tmp_path / "o")]) == 3
    assert "holds \\udc80, half of a surrogate pair" in _err_line(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content, message", [
    ("max_tokens = 4\n".encode("utf-16"), "not UTF-8 text"),
    ("[ask]\nsystem = 'caf\xe9'\n".encode("latin-1"), "not UTF-8 text"),
    (b"x = " + b"[" * 50_000 + b"]" * 50_000 + b"\n", "nested too deeply"),
])
def test_config_file_that_is_no_toml_text_is_an_input_error(content, message, photos, tmp_path, capsys):
    (tmp_path / "c.toml").write_bytes(content)
    rc = main(["ask", str(photos["astronaut"]), "Age?", "--config", str(tmp_path / "c.toml")])
    line = _err_line(capsys)
    assert rc == 3 and "is not valid TOML" in line and message in line, line


def test_deeply_nested_schema_is_a_usage_error(photos, tmp_path, capsys):
    from facellm_edge.errors import UsageError
    from facellm_edge.llm.sampling import schema_to_grammar

    deep = {"type": "object", "properties": {}}
    inner = deep
    for _ in range(5000):
        inner["properties"]["x"] = {"type": "object", "properties": {}}
        inner = inner["properties"]["x"]
    with pytest.raises(UsageError, match="nested too deeply"):
        schema_to_grammar(deep)
    with pytest.raises(UsageError, match="not valid JSON: nested too deeply"):
        schema_to_grammar("[" * 100_000 + "]" * 100_000)
