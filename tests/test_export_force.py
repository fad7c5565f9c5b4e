"""`export --force` replaces only a bundle this tool wrote; bundles get ordinary permissions (umask); an export
killed with SIGKILL leaves a temporary folder that the next export removes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facellm_edge.bundle import load_bundle
from facellm_edge.cli import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test exports or uses tiny_bundle

FAST = ["--quant", "f32", "--vision", "fp32", "--no-verify"]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("case", ["any manifest.json", "bundle + user file", "manifest of another schema"])
def test_force_never_replaces_what_export_did_not_write(case, tiny_bundle, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "work"
    if case == "any manifest.json":  # a project folder that happens to hold a manifest.json
        out.mkdir()
        (out / "manifest.json").write_text('{"name": "my web app", "icons": []}\n')
        (out / "index.html").write_text("<html>")
    elif case == "bundle + user file":
        shutil.copytree(tiny_bundle, out)
        (out / "llm" / "NOTES.md").write_text("measurements I made by hand")
    else:
        shutil.copytree(tiny_bundle, out)
        m = json.loads((out / "manifest.json").read_text())
        m["vision"] = "x"
        (out / "manifest.json").write_text(json.dumps(m))
    before = _snapshot(out)
    rc = main(["export", str(tiny_checkpoint), "--out", str(out), "--force", *FAST])
    err = capsys.readouterr().err
    assert rc == 4, err
    assert err.startswith(f"error: refusing to replace {out}: ") and err.count("\n") == 1
    assert ("NOTES.md, which facellm-edge did not write" in err) == (case == "bundle + user file")
    assert ("it is not a bundle written by facellm-edge" in err) == (case != "bundle + user file")
    assert _snapshot(out) == before and _hidden(tmp_path) == []


@pytest.mark.parametrize("mask, dmode, fmode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_force_replaces_our_bundle_with_umask_modes(tiny_bundle, tiny_checkpoint, tmp_path, capsys, mask, dmode,
                                                     fmode):
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    old = os.umask(mask)
    try:
        rc = main(["export", str(tiny_checkpoint), "--out", str(out), "--force", *FAST])
    finally:
        os.umask(old)
    assert rc == 0, capsys.readouterr().err
    b = load_bundle(out)
    assert set(b.manifest.llm) == {"f32"} and _hidden(tmp_path) == []
    modes = {("d" if p.is_dir() else "f", p.stat().st_mode & 0o777) for p in [out, *out.rglob("*")]}
    assert modes == {("d", dmode), ("f", fmode)}  # the temp dir was 700 and mkstemp files 600 before


def test_a_later_export_removes_the_temp_dir_of_a_killed_one(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "facellm_edge.cli", "export", str(tiny_checkpoint), "--out",
                             str(out), "--quant", "f32,q8_0", "--vision", "fp32,int8"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not any((p / "vision").exists() for p in tmp_path.glob(".b.tmp-*")):  # mid-export
            assert proc.poll() is None and time.monotonic() < deadline, "export ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    stale = [p.name for p in tmp_path.iterdir()]
    assert len(stale) == 1 and stale[0].startswith(f".b.tmp-{proc.pid}-") and not out.exists()
    rc = main(["export", str(tiny_checkpoint), "--out", str(out), *FAST])
    assert rc == 0, capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
    load_bundle(out)
