"""Outputs never destroy what the tool did not write: the --force ownership rule (facellm_edge.io), data build's
torn-line repair, output permissions under the process umask, and stale temporary directories of dead writers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from facellm_edge.cli import main
from facellm_edge.errors import OutputError
from facellm_edge.io import (
    MARKER, OutputKind, atomic_directory, atomic_file, atomic_write_text, check_replaceable, clean_stale_temps,
)

EVAL = OutputKind("eval results")

REPO = Path(__file__).resolve().parents[1]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# -- the ownership rule ------------------------------------------------------------------------------------------

def test_force_replaces_only_marked_outputs_holding_nothing_else(tmp_path):
    dest = tmp_path / "out"
    with atomic_directory(dest, kind=EVAL) as tmp:
        (tmp / "results.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.txt").write_text("x")
    marker = json.loads((dest / MARKER).read_text())
    assert marker["tool"] == "facellm-edge" and marker["kind"] == "eval results"
    assert marker["files"] == ["results.json", "sub/x.txt"]

    check_replaceable(dest, force=True, kind=EVAL)  # ours, nothing else in it
    with pytest.raises(OutputError, match="already exists; choose another --out or pass --force"):
        check_replaceable(dest, force=False, kind=EVAL)
    with pytest.raises(OutputError, match=r"not bench results written by facellm-edge"):
        check_replaceable(dest, force=True, kind=OutputKind("bench results"))  # ours, but another kind of output

    (dest / "sub" / "notes.txt").write_text("mine")  # the user adds a file: --force must not delete it
    before = _snapshot(dest)
    with pytest.raises(OutputError, match=r"refusing to replace .*out: it holds sub/notes.txt, which facellm-edge "
                                          r"did not write; move it away or choose another --out"):
        with atomic_directory(dest, force=True, kind=EVAL) as tmp:
            (tmp / "results.json").write_text("{}")
    assert _snapshot(dest) == before and _hidden(tmp_path) == []


@pytest.mark.parametrize("make", ["plain folder", "file", "symlink to folder", "forged marker"])
def test_force_refuses_what_the_tool_did_not_write(tmp_path, make):
    dest = tmp_path / "out"
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "photo.jpg").write_bytes(b"\xff\xd8 me")
    if make == "plain folder":
        dest.mkdir()
        (dest / "photo.jpg").write_bytes(b"\xff\xd8 me")
    elif make == "file":
        dest.write_text("my notes")
    elif make == "symlink to folder":
        dest.symlink_to(target)
    else:  # a marker of another tool
        dest.mkdir()
        (dest / MARKER).write_text(json.dumps({"tool": "other", "kind": "eval results", "files": ["a"]}))
    before, before_target = (_snapshot(dest) if dest.is_dir() else dest.read_bytes()), _snapshot(target)
    with pytest.raises(OutputError, match="refusing to replace"):
        with atomic_directory(dest, force=True, kind=EVAL):
            pass
    assert (_snapshot(dest) if dest.is_dir() else dest.read_bytes()) == before
    assert _snapshot(target) == before_target and _hidden(tmp_path) == []


def _bench_json(tmp_path: Path) -> Path:
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps([{"id": "q1", "image": "a.jpg", "question": "Q?", "options": ["x", "y"],
                                  "answer": "A"}]))
    return bench


def test_eval_force_refuses_a_user_folder(tmp_path, capsys):
    out = tmp_path / "my_results"
    out.mkdir()
    (out / "thesis.tex").write_text("chapter 1")
    rc, err = _run(capsys, "eval", "--bench", str(_bench_json(tmp_path)), "--bundle", str(tmp_path / "b"),
                   "--out", str(out), "--force")
    assert rc == 4, err
    assert err.startswith("error: refusing to replace") and err.count("\n") == 1
    assert "it is not eval results written by facellm-edge; move it away or choose another --out" in err
    assert _snapshot(out) == {"thesis.tex": b"chapter 1"} and _hidden(tmp_path) == []


def test_eval_compare_force_refuses_a_user_folder(tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.json").write_text("{}")  # a name we use, but not our file set / schema
    rc, err = _run(capsys, "eval", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out),
                   "--force")
    assert rc == 4 and "refusing to replace" in err and err.count("\n") == 1, err
    assert _snapshot(out) == {"compare.json": b"{}"}


def _results_doc() -> dict:
    from facellm_edge.eval.runner import results_document
    from facellm_edge.eval.scoring import ItemResult, ScoreConfig

    items = [ItemResult(id=f"q{i}", category="c", task="t", groups={}, answer="A", predicted="A" if i else "B",
                        raw="A", seconds=0.1) for i in range(4)]
    return results_document(items, {"bench": "b", "model": "m", "backend": "bundle", "wall_s": 1.0},
                            ScoreConfig(n_bootstrap=10))


def test_eval_results_of_ours_and_of_older_versions_are_replaced(tmp_path):
    from facellm_edge.eval.report import RESULTS, check_out, write_results

    out = tmp_path / "res"
    write_results(out, _results_doc())
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "results.json", "results.md", "results.png"]
    write_results(out, _results_doc(), force=True)  # ours (marker): replaced
    # a folder written before the marker existed: recognised by its exact file set and the schema in its JSON
    (out / MARKER).unlink()
    check_out(out, True, RESULTS)
    write_results(out, _results_doc(), force=True)
    assert (out / MARKER).is_file()
    # the same names with a foreign results.json are not ours
    (out / MARKER).unlink()
    (out / "results.json").write_text(json.dumps({"schema": "someone-else/1"}))
    with pytest.raises(OutputError, match="refusing to replace"):
        check_out(out, True, RESULTS)


# -- data build: torn-line repair only for files the builder wrote ---------------------------------------------

def _labels(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "img"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"not decoded before the output check")
    csv = tmp_path / "labels.csv"
    csv.write_text("file,age,gender,race\na.jpg,30-39,Female,White\n")
    return csv, images


@pytest.mark.parametrize("content", [
    b"my diary, no newline at the end",  # one torn-looking line: used to be truncated to 0 bytes
    b'{"id": "x", "text": "my own jsonl"}\n{"id": "y", "text": "last line without newline"}',
    b'{"id": "a.jpg#pose", "image": "a.jpg"}\n{"id": "b',  # complete line is not a full record of the builder
    b'{"id": "a.jpg#pose", "note": "one-line JSON of mine"}',  # whole JSON, not a record: not a torn record
])
def test_data_build_leaves_foreign_file_byte_identical(tmp_path, capsys, monkeypatch, content):
    csv, images = _labels(tmp_path)
    out = tmp_path / "mine.jsonl"
    out.write_bytes(content)
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    rc, err = _run(capsys, "data", "build", "--labels", str(csv), "--images", str(images), "--out", str(out),
                   "--base-url", "http://127.0.0.1:9/v1", "--families", "pose")
    assert rc == 4, err
    assert "was not written by `facellm-edge data build` (" in err
    assert "), so it is left untouched; choose another --out" in err
    assert err.count("\n") == 1
    assert out.read_bytes() == content and _hidden(tmp_path) == []


def _record(rid: str = "a.jpg#pose") -> dict:
    image, family = rid.split("#")
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": "<image>\nq"},
                                                         {"from": "gpt", "value": "a"}],
            "family": family, "labels": {"age": "30-39"}, "model": "openai:m"}


def test_data_build_repairs_its_own_torn_line(tmp_path):
    from facellm_edge.data.build import JsonlStore

    out = tmp_path / "qa.jsonl"
    whole = json.dumps(_record(), ensure_ascii=False) + "\n"
    out.write_text(whole + json.dumps(_record("b.jpg#pose"), ensure_ascii=False)[:30])  # crash mid-write
    assert JsonlStore(out).recover() == {"a.jpg#pose"}
    assert out.read_text() == whole
    # a record whose newline alone was lost is kept, not dropped
    out.write_text(whole + json.dumps(_record("b.jpg#pose"), ensure_ascii=False))
    assert JsonlStore(out).recover() == {"a.jpg#pose", "b.jpg#pose"}
    assert out.read_text() == whole + json.dumps(_record("b.jpg#pose"), ensure_ascii=False) + "\n"


# -- permissions follow the umask ------------------------------------------------------------------------------

@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _modes(root: Path) -> set[tuple[str, int]]:
    return {("d" if p.is_dir() else "f", p.stat().st_mode & 0o777) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("mask, dmode, fmode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)])
def test_outputs_respect_the_umask(tmp_path, umask, mask, dmode, fmode):
    umask(mask)
    dest = tmp_path / "out"
    with atomic_directory(dest) as tmp:
        (tmp / "sub").mkdir()
        atomic_write_text(tmp / "sub" / "a.json", "{}")  # mkstemp: 600 before the fix
        (tmp / "b.txt").write_text("b")
    assert _modes(dest) == {("d", dmode), ("f", fmode)}
    atomic_write_text(tmp_path / "new.txt", "x")
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == fmode
    os.chmod(tmp_path / "new.txt", 0o640)  # a replaced file keeps the mode it had
    atomic_write_text(tmp_path / "new.txt", "y")
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o640


def test_data_jsonl_respects_the_umask(tmp_path, umask):
    from facellm_edge.data.build import JsonlStore

    umask(0o002)
    store = JsonlStore(tmp_path / "qa.jsonl")
    store.open()
    store.append(_record())
    store.close()
    assert (tmp_path / "qa.jsonl").stat().st_mode & 0o777 == 0o664


# -- stale temporary directories --------------------------------------------------------------------------------

_HOLDER = """
import sys, time
from pathlib import Path
from facellm_edge.io import atomic_directory
ctx = atomic_directory(Path(sys.argv[1]))
tmp = ctx.__enter__()
(tmp / "half.bin").write_bytes(b"x" * 100)
print(tmp, flush=True)
time.sleep(120)
"""


def _holder(dest: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(dest)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    return proc, Path(proc.stdout.readline().strip())


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dest = tmp_path / "bundle"
    live, live_tmp = _holder(dest)
    dead, dead_tmp = _holder(dest)
    try:
        assert live_tmp.name.startswith(f".bundle.tmp-{live.pid}-") and live_tmp.is_dir()
        dead.send_signal(signal.SIGKILL)  # kill -9: no cleanup ran
        dead.wait(timeout=30)
        assert dead_tmp.is_dir()
        foreign = [tmp_path / ".bundle.tmp-abcdefgh", tmp_path / f".bundle.tmp-{dead.pid}-mine"]  # not our names
        for f in foreign:
            f.mkdir()
        with atomic_directory(dest) as tmp:  # a later write to the same destination
            (tmp / "ok").write_text("1")
        assert not dead_tmp.exists()
        assert live_tmp.is_dir() and (live_tmp / "half.bin").is_file()  # a live writer is never touched
        assert all(f.is_dir() for f in foreign)
    finally:
        live.kill()
        live.wait(timeout=30)


def test_interrupted_swap_restores_the_previous_output(tmp_path):
    dest = tmp_path / "res"
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    old = tmp_path / f".res.old-{dead_pid}"
    old.mkdir()
    (old / "results.json").write_text("previous")  # killed between the two renames of the swap
    assert clean_stale_temps(dest) == [old]
    assert (dest / "results.json").read_text() == "previous" and not old.exists()


def test_ctrl_c_inside_the_block_leaves_nothing(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(dest) as tmp:
            (tmp / "x").write_text("1")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# -- one file filled by an external tool (llama.cpp's quantiser, gguf-py's writer) -------------------------------

def _external_tool(path: Path, data: bytes, rc: int = 0) -> int:
    """Another process writes ``path`` by name, as llama.cpp does: truncate and write."""
    code = f"open({str(path)!r}, 'wb').write({data!r}); raise SystemExit({rc})"
    return subprocess.run([sys.executable, "-c", code]).returncode


def test_atomic_file_commits_what_the_tool_wrote_and_leaves_nothing_on_failure(tmp_path, umask):
    umask(0o002)
    dest = tmp_path / "llm.gguf"
    with atomic_file(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".llm.tmp-") and tmp.suffix == ".gguf"
        assert tmp.stat().st_size == 0 and tmp.stat().st_mode & 0o777 == 0o600  # created by us, exclusively
        assert _external_tool(tmp, b"v1") == 0
    assert dest.read_bytes() == b"v1" and dest.stat().st_mode & 0o777 == 0o664 and _hidden(tmp_path) == []

    for stop in (RuntimeError("the tool failed"), KeyboardInterrupt()):  # its error, or Ctrl-C while it runs
        with pytest.raises(type(stop)):
            with atomic_file(dest) as tmp:
                _external_tool(tmp, b"half", rc=1)
                raise stop
        assert dest.read_bytes() == b"v1" and _hidden(tmp_path) == []  # untouched, no temporary left

    with pytest.raises(FileExistsError):  # replace=False never touches an existing file
        with atomic_file(dest, replace=False) as tmp:
            tmp.write_bytes(b"v2")
    assert dest.read_bytes() == b"v1" and _hidden(tmp_path) == []


def test_atomic_file_removes_the_temporaries_of_dead_runs_only(tmp_path):
    dest = tmp_path / "llm.gguf"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".llm.tmp-{int(dead.stdout)}-abcd_123.gguf"  # killed mid-write: may hold a model or faces
    live = tmp_path / f".llm.tmp-{os.getpid()}-abcd_123.gguf"
    foreign = tmp_path / ".llm.tmp-notapid.gguf"
    for f in (stale, live, foreign):
        f.write_bytes(b"x")
    with atomic_file(dest) as tmp:
        tmp.write_bytes(b"new")
    assert dest.read_bytes() == b"new" and not stale.exists() and live.is_file() and foreign.is_file()


def test_import_fairfacegpt_force_replaces_only_its_own_jsonl(tmp_path, capsys):
    src = tmp_path / "dataset.json"
    src.write_text(json.dumps([{"image": "train/1.jpg", "question": "Pose?", "answer": "Frontal."}]))
    out = tmp_path / "qa.jsonl"
    out.write_bytes(b'{"id": 1, "my": "own data"}\n')
    rc, err = _run(capsys, "data", "import-fairfacegpt", str(src), "--out", str(out), "--force")
    assert rc == 4 and err == (f"error: refusing to replace {out}: it is not a ShareGPT JSONL written by facellm-edge;"
                               " move it away or choose another --out\n")
    assert out.read_bytes() == b'{"id": 1, "my": "own data"}\n' and _hidden(tmp_path) == []
    out.unlink()
    assert main(["data", "import-fairfacegpt", str(src), "--out", str(out)]) == 0
    src.write_text(json.dumps([{"image": "train/2.jpg", "question": "Light?", "answer": "Soft."}]))
    assert main(["data", "import-fairfacegpt", str(src), "--out", str(out), "--force"]) == 0  # ours: replaced
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == ["train/2.jpg"]


def test_output_files_through_a_folder_not_yet_made_are_checked_and_written_where_they_land(tmp_path):
    """dir/NEW/../x is dir/x for every single-file output: checked there (an existing dir/x is refused, though
    NEW does not exist, so the path seen through it did not), written there, and NEW is never made."""
    from facellm_edge.io import atomic_file, check_output_file, open_line_log

    with atomic_file(tmp_path / "NEW" / ".." / "x.txt") as tmp:
        tmp.write_text("hi")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]
    with pytest.raises(OutputError, match=f"--jsonl {tmp_path / 'x.txt'} already exists"):
        check_output_file(tmp_path / "NEW" / ".." / "x.txt", option="--jsonl")
    open_line_log(tmp_path / "NEW" / ".." / "y.jsonl", append=False).close()
    with pytest.raises(OutputError, match="already exists"):
        open_line_log(tmp_path / "NEW" / ".." / "x.txt", append=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt", "y.jsonl"]
