"""The bundle contract: manifest round trip, hash checks, atomic writes, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from facellm_edge.bundle import (
    SCHEMA_VERSION, ArchSpec, ImageSpec, Manifest, PromptSpec, TokenSpec, file_entry, load_bundle,
)
from facellm_edge.errors import BundleError, OutputError
from facellm_edge.io import MARKER, atomic_directory, atomic_write_text


def _manifest(root: Path) -> Manifest:
    (root / "vision").mkdir()
    (root / "llm").mkdir()
    (root / "vision" / "fp32.onnx").write_bytes(b"onnx-bytes")
    (root / "llm" / "q8_0.gguf").write_bytes(b"gguf-bytes")
    return Manifest(
        schema_version=SCHEMA_VERSION, created="2026-01-01T00:00:00+00:00", source={"model": "x"},
        arch=ArchSpec(64, 2, 14, 0.5, 64, 2, 4, 2, 100, 4096, True),
        image=ImageSpec(448, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        tokens=TokenSpec("<IMG_CONTEXT>", 7, "<img>", 5, "</img>", 6, 256, (3,)),
        prompt=PromptSpec(first="u {image}\n{question} a", followup="e u {question} a", chat_template="t"),
        vision={"fp32": file_entry(root, root / "vision" / "fp32.onnx")},
        llm={"q8_0": file_entry(root, root / "llm" / "q8_0.gguf", bits_per_weight=8.5)},
        tools={"facellm-edge": "0"},
    )


def test_manifest_round_trip_and_hash_check(tmp_path):
    m = _manifest(tmp_path)
    atomic_write_text(tmp_path / "manifest.json", m.to_json())
    b = load_bundle(tmp_path)
    assert b.manifest == m
    assert b.vision_file()[0] == "fp32" and b.llm_file("q8_0")[1] == tmp_path / "llm" / "q8_0.gguf"
    with pytest.raises(BundleError, match="no llm precision 'f16'; it has: q8_0"):
        b.llm_file("f16")
    (tmp_path / "llm" / "q8_0.gguf").write_bytes(b"gguf-bytez")  # same size, other content
    with pytest.raises(BundleError, match=r"llm/q8_0.gguf: sha256 mismatch"):
        load_bundle(tmp_path)
    (tmp_path / "vision" / "fp32.onnx").unlink()
    with pytest.raises(BundleError, match=r"vision/fp32.onnx: missing"):
        load_bundle(tmp_path)


def test_load_bundle_errors(tmp_path):
    with pytest.raises(BundleError, match="bundle not found"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot read"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(BundleError, match="schema version 99 is not supported"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION}))
    with pytest.raises(BundleError, match="malformed"):
        load_bundle(tmp_path)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "bundle"
    with pytest.raises(RuntimeError):
        with atomic_directory(dest) as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("boom")
    assert not dest.exists() and list(tmp_path.iterdir()) == []

    with atomic_directory(dest) as tmp:
        (tmp / "a").write_text("1")
    assert (dest / "a").read_text() == "1"
    with pytest.raises(OutputError, match="already exists"):
        with atomic_directory(dest):
            pass
    # --force replaces only once the new one is complete; a failed forced export keeps the old bundle.
    with pytest.raises(RuntimeError):
        with atomic_directory(dest, force=True) as tmp:
            raise RuntimeError("boom")
    assert (dest / "a").read_text() == "1"
    with atomic_directory(dest, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == [MARKER, "b"]  # our marker: a later --force may replace it
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_unwritable_parent_is_a_clear_error(tmp_path):
    parent = tmp_path / "file"
    parent.write_text("not a dir")
    with pytest.raises(OutputError, match="cannot write to"):
        with atomic_directory(parent / "bundle"):
            pass


def test_cli_help_is_light():
    """`--help` must not import torch/transformers/onnxruntime/llama.cpp (it must be instant on a kiosk)."""
    code = (
        "import sys\n"
        "from facellm_edge.cli import main\n"
        "rc = main(['--help'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'llama_cpp', 'cv2') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    assert "export" in out and "inspect" in out
