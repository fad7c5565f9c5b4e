"""Bundles are untrusted input: every manifest path stays inside the bundle (nothing outside is opened or even
stat-ed), the manifest's schema is checked with one line naming the key, and a mistyped local --bundle path is never
sent to the model hub."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from facellm_edge.bundle import (
    SCHEMA_VERSION, ArchSpec, ImageSpec, Manifest, PromptSpec, TokenSpec, file_entry, load_bundle,
)
from facellm_edge.cli import main
from facellm_edge.errors import BundleError
from facellm_edge.io import atomic_write_text


def _bundle(root: Path) -> dict:
    """A small valid bundle on disk; returns its manifest as a dict for the test to tamper with."""
    root.mkdir(exist_ok=True)
    (root / "vision").mkdir()
    (root / "llm").mkdir()
    (root / "vision" / "fp32.onnx").write_bytes(b"onnx-bytes")
    (root / "vision" / "fp32.onnx.data").write_bytes(b"weights")
    (root / "llm" / "q8_0.gguf").write_bytes(b"gguf-bytes")
    m = Manifest(
        schema_version=SCHEMA_VERSION, created="2026-01-01T00:00:00+00:00", source={"model": "x"},
        arch=ArchSpec(64, 2, 14, 0.5, 64, 2, 4, 2, 100, 4096, True),
        image=ImageSpec(448, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        tokens=TokenSpec("<IMG_CONTEXT>", 7, "<img>", 5, "</img>", 6, 256, (3,)),
        prompt=PromptSpec(first="u {image}\n{question} a", followup="e u {question} a", chat_template="t"),
        vision={"fp32": file_entry(root, root / "vision" / "fp32.onnx", external_data=[
            {"path": "vision/fp32.onnx.data", "bytes": 7, "sha256": file_entry(
                root, root / "vision" / "fp32.onnx.data").sha256, "extra": {}}])},
        llm={"q8_0": file_entry(root, root / "llm" / "q8_0.gguf", bits_per_weight=8.5)},
        tools={"facellm-edge": "0"},
    )
    atomic_write_text(root / "manifest.json", m.to_json())
    load_bundle(root)  # valid as written
    return json.loads(m.to_json())


def _write(root: Path, d: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(d))


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside the bundle that must never be opened or stat-ed."""
    p = tmp_path / "outside" / "passwd"
    p.parent.mkdir()
    p.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 37)
    return p


_OPENED: list[list[str]] = []  # the active recorder of the audit hook (audit hooks cannot be removed)


def _audit(event: str, args: tuple) -> None:
    if _OPENED and event == "open" and isinstance(args[0], (str, os.PathLike)):
        _OPENED[-1].append(os.fspath(args[0]))


sys.addaudithook(_audit)


class _Touches:
    """Records every open (audit hook: builtins, io, os.open) and stat/lstat (pathlib and os.path go through
    os.stat / os.lstat) of a path while active."""

    def __init__(self, monkeypatch) -> None:
        self.paths: list[str] = []
        _OPENED.append(self.paths)
        real_stat, real_lstat = os.stat, os.lstat
        monkeypatch.setattr(os, "stat", lambda p, *a, **k: (self._add(p), real_stat(p, *a, **k))[1])
        monkeypatch.setattr(os, "lstat", lambda p, *a, **k: (self._add(p), real_lstat(p, *a, **k))[1])

    def _add(self, p) -> None:
        if isinstance(p, (str, os.PathLike)):
            self.paths.append(os.fspath(p))

    def stop(self, monkeypatch) -> None:
        monkeypatch.undo()
        _OPENED.clear()

    def touched(self, target: Path) -> bool:
        outside = (str(target.parent), os.path.realpath(target.parent))
        return any(p.startswith(outside) for p in self.paths)


def _damaged_untouched(monkeypatch, root: Path, **load) -> tuple[str, "_Touches"]:
    """load_bundle(root) must raise BundleError; its message and what the load opened or stat-ed."""
    touches = _Touches(monkeypatch)
    try:
        with pytest.raises(BundleError) as exc:
            load_bundle(root, **load)
    finally:
        touches.stop(monkeypatch)
    return str(exc.value), touches


@pytest.mark.parametrize("where", ["llm", "vision", "external_data", "mmproj"])
@pytest.mark.parametrize("bad", ["../outside/passwd", "{abs}", "llm/../../outside/passwd", "./llm/q8_0.gguf",
                                 "llm//q8_0.gguf", "llm\\q8_0.gguf"])
def test_manifest_paths_must_stay_inside(tmp_path, secret, monkeypatch, where, bad):
    root = tmp_path / "b"
    d = _bundle(root)
    entry = {"path": bad.replace("{abs}", str(secret)), "bytes": 0, "sha256": "0" * 64, "extra": {}}
    if where == "llm":
        d["llm"]["q8_0"] = entry
    elif where == "vision":
        d["vision"]["fp32"] = entry
    elif where == "external_data":
        d["vision"]["fp32"]["extra"]["external_data"] = [entry]
    else:
        d["mmproj"] = entry
    _write(root, d)
    msg, touches = _damaged_untouched(monkeypatch, root, check_hashes=True)
    assert msg.startswith(f"bundle {root} is damaged: manifest.json is malformed: '") and "\n" not in msg
    assert "must be a" in msg and "path inside the bundle" in msg and "re-export the bundle" in msg
    assert str(secret.stat().st_size) not in msg  # the outside file's size never leaks
    assert not touches.touched(secret)


@pytest.mark.parametrize("link", ["file", "dir", "absolute", "chain"])
def test_symlinks_pointing_out_are_damage_and_never_followed(tmp_path, secret, monkeypatch, link):
    root = tmp_path / "b"
    d = _bundle(root)
    gguf = root / "llm" / "q8_0.gguf"
    gguf.unlink()
    if link == "file":
        gguf.symlink_to(Path("..") / ".." / "outside" / "passwd")
    elif link == "dir":  # the folder holding the file points out
        (root / "llm" / "q8_0.gguf").parent.rename(root / "llm_real")
        (root / "llm").symlink_to(secret.parent)
        d["llm"]["q8_0"]["path"] = "llm/passwd"
    elif link == "absolute":
        gguf.symlink_to(secret)
    else:  # inside -> inside -> out
        (root / "hop").symlink_to("llm/../../outside")
        gguf.symlink_to(Path("..") / "hop" / "passwd")
    # size and hash of the outside file: before the fix such a bundle loaded and passed `inspect`
    d["llm"]["q8_0"].update(bytes=secret.stat().st_size, sha256=hashlib.sha256(secret.read_bytes()).hexdigest())
    _write(root, d)
    msg, touches = _damaged_untouched(monkeypatch, root, check_hashes=True)
    assert msg == (f"bundle {root} is damaged: {d['llm']['q8_0']['path']} leads outside the bundle; "
                              "re-export it")
    assert not touches.touched(secret)


def test_symlinks_inside_the_bundle_are_fine(tmp_path):
    root = tmp_path / "b"
    _bundle(root)
    (root / "store").mkdir()
    (root / "llm" / "q8_0.gguf").rename(root / "store" / "model.gguf")
    (root / "llm" / "q8_0.gguf").symlink_to("../store/model.gguf")
    b = load_bundle(root)  # hashes checked through the link
    assert b.llm_file()[1].resolve() == (root / "store" / "model.gguf").resolve()


def test_hub_cache_snapshot_links_into_its_own_blobs(tmp_path, secret, monkeypatch):
    """A bundle downloaded by huggingface_hub is a snapshot folder of symlinks into the repo's blobs/: it loads; a
    link into another repo's blobs (or anywhere else) does not."""
    built = tmp_path / "built"
    _bundle(built)
    repo = tmp_path / "hub" / "models--acme--facellm-bundle"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    for f in sorted(p for p in built.rglob("*") if p.is_file()):
        rel = f.relative_to(built)
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).symlink_to(Path(*[".."] * (len(rel.parts) + 1), "blobs", blob.name))  # as the hub writes them
    b = load_bundle(snap)
    assert b.llm_file()[1] == repo / "blobs" / b.manifest.llm["q8_0"].sha256
    other = tmp_path / "hub" / "models--evil--x" / "blobs"
    other.mkdir(parents=True)
    (other / "w").write_bytes(b"gguf-bytes")
    gguf = snap / "llm" / "q8_0.gguf"
    gguf.unlink()
    gguf.symlink_to(Path("..", "..", "..", "..", "models--evil--x", "blobs", "w"))
    msg, touches = _damaged_untouched(monkeypatch, snap)
    assert "is damaged: llm/q8_0.gguf leads outside the bundle" in msg
    assert not touches.touched(other / "w")


def test_manifest_symlinked_out_is_damage(tmp_path, secret):
    root = tmp_path / "b"
    _bundle(root)
    (root / "manifest.json").unlink()
    (root / "manifest.json").symlink_to(secret)
    with pytest.raises(BundleError, match="is damaged: manifest.json leads outside the bundle"):
        load_bundle(root)


@pytest.mark.parametrize("tamper, message", [
    (lambda d: d.update(vision="x"), "'vision' must be an object, got a string ('x')"),
    (lambda d: d["image"].update(size="448"), "'image.size' must be an integer, got a string ('448')"),
    (lambda d: d["image"].update(size=0), "'image.size' must be >= 1, got 0"),
    (lambda d: d["image"].update(mean=[0.5, 0.5]), "'image.mean' must be a list of 3 numbers, got a list of 2"),
    (lambda d: d["llm"]["q8_0"].update(bytes=-1), "'llm.q8_0.bytes' must be >= 0, got -1"),
    (lambda d: d["llm"]["q8_0"].update(sha256="not-hex"),
     "'llm.q8_0.sha256' must match [0-9a-f]{64}, got a string ('not-hex')"),
    (lambda d: d["tokens"].update(eos_ids=[3, "4"]), "'tokens.eos_ids[1]' must be an integer, got a string ('4')"),
    (lambda d: d["tokens"].update(bos_id=True), "'tokens.bos_id' must be an integer or null, got a boolean"),
    (lambda d: d["arch"].pop("llm_hidden"), "'arch.llm_hidden' is missing"),
    (lambda d: d["vision"]["fp32"]["extra"].update(external_data="w.bin"),
     "'vision.fp32.extra.external_data' must be a list of objects, got a string ('w.bin')"),
    (lambda d: d.update(schema_version="1"), "'schema_version' must be an integer, got \"1\""),
    (lambda d: d.update(mmproj=[]), "'mmproj' must be an object or null, got a list"),
    # bounded: each tile is size^2 x 3 floats before the encoder sees it (60000 took 21 GB, then MemoryError)
    (lambda d: d["image"].update(size=60000), "'image.size' must be <= 2048, got 60000"),
    (lambda d: d["image"].update(max_tiles=10**6), "'image.max_tiles' must be <= 64, got 1000000"),
    # a bundle with no LLM (or no vision file) runs nothing: inspect passed it, ask refused it
    (lambda d: d.update(llm={}), "'llm' must name at least one file"),
    (lambda d: d.update(vision={}), "'vision' must name at least one file (or an mmproj)"),
])
def test_manifest_schema_errors_name_the_key(tmp_path, capsys, tamper, message):
    root = tmp_path / "b"
    d = _bundle(root)
    tamper(d)
    _write(root, d)
    with pytest.raises(BundleError) as exc:
        load_bundle(root)
    assert str(exc.value) == f"bundle {root} is damaged: manifest.json is malformed: {message}; re-export the bundle"
    rc = main(["inspect", str(root)])
    err = capsys.readouterr().err
    assert rc == 3 and err == f"error: {exc.value}\n"


def test_unknown_manifest_keys_are_ignored(tmp_path):
    root = tmp_path / "b"
    d = _bundle(root)
    d["licence"] = "MIT"
    d["image"]["interpolation"] = "bicubic"
    _write(root, d)
    assert load_bundle(root).manifest.image.size == 448


# -- --bundle: local paths never go to the hub ------------------------------------------------------------------

def test_mistyped_local_bundle_path_is_not_sent_to_the_hub(tmp_path, monkeypatch, no_network, capsys, astronaut_bgr):
    import cv2

    from facellm_edge.bundle import resolve_bundle_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bundles").mkdir()
    cv2.imwrite(str(tmp_path / "face.png"), astronaut_bgr)
    hub_calls = []
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: hub_calls.append(kw))
    with pytest.raises(BundleError) as exc:
        resolve_bundle_spec("bundles/facellm")
    assert str(exc.value).startswith("no bundle at bundles/facellm ('bundles' is a local folder, so bundles/facellm "
                                     "was not looked up as a hub repo)")
    rc = main(["ask", "face.png", "Age?", "--bundle", "bundles/facellm"])
    err = capsys.readouterr().err
    assert rc == 3 and err == f"error: {exc.value}\n" and hub_calls == []
    for local in ("./bundles/facellm", "bundles/facellm/", "a/b/c", str(tmp_path / "x"), "~/nope-bundle"):
        assert resolve_bundle_spec(local) == Path(local).expanduser()  # load_bundle: "bundle not found"
    assert hub_calls == []


def test_plausible_hub_id_goes_to_the_hub(tmp_path, monkeypatch, no_network):
    from facellm_edge.bundle import resolve_bundle_spec

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(BundleError, match=r"^no bundle at nobody/no-such-bundle: neither a local folder nor a "
                                          r"downloadable hub repo \(the hub cannot be reached or HF_HUB_OFFLINE is "
                                          r"set, and nobody/no-such-bundle is not in the cache .*\)$"):
        resolve_bundle_spec("nobody/no-such-bundle")
    assert "huggingface_hub" in sys.modules


@pytest.mark.slow  # tiny_bundle
def test_manifest_tile_size_must_be_the_encoders(tiny_bundle, tmp_path, capsys, astronaut_bgr):
    """The manifest's image.size drives preprocessing; an ONNX graph taking another tile size is two models mixed,
    said in one line when the encoder loads (not an ONNX Runtime shape error on the first face)."""
    import shutil

    import cv2

    root = shutil.copytree(tiny_bundle, tmp_path / "b")
    d = json.loads((root / "manifest.json").read_text())
    d["image"]["size"] = 224
    _write(root, d)
    cv2.imwrite(str(tmp_path / "a.png"), astronaut_bgr)
    assert main(["ask", str(tmp_path / "a.png"), "Age?", "--bundle", str(root), "--max-tokens", "1"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "takes [448, 448] px tiles but the manifest says image.size 224" in err
