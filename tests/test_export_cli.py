"""`facellm-edge export` / `inspect` end to end through the CLI: a verified bundle, and every bad input giving one
line, a non-zero exit and no bundle directory left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from facellm_edge.bundle import load_bundle
from facellm_edge.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], "temporary export dir left behind"


@pytest.fixture(scope="module")
def verified_bundle(tmp_path_factory, tiny_checkpoint_untied) -> Path:
    """An untied-head checkpoint exported with every verification on and four LLM precisions."""
    out = tmp_path_factory.mktemp("cli") / "bundle"
    rc = main(["export", str(tiny_checkpoint_untied), "--out", str(out), "--quant", "f32,f16,q8_0,q4_k_m"])
    assert rc == 0
    return out


@pytest.mark.slow  # verified export
def test_verified_export_meets_the_gates(verified_bundle):
    m = load_bundle(verified_bundle).manifest
    v = m.verification
    assert v["vision"]["fp32"]["max_abs_diff"] <= 1e-4
    assert v["vision"]["int8"]["cosine_min"] > 0.99
    assert v["llm"]["f32"]["top1_agreement"] == 1.0
    assert v["llm"]["f32"]["n_image_positions"] == m.tokens.num_image_tokens  # probe injects a full tile
    assert v["llm"]["f16"]["top1_agreement"] >= 0.99
    assert v["tokenizer"]["n_match"] == v["tokenizer"]["n_texts"] > 0
    assert set(m.llm) == {"f32", "f16", "q8_0", "q4_k_m"} and set(m.vision) == {"fp32", "int8"}
    assert m.arch.tie_word_embeddings is False
    assert "bits_per_weight" in m.llm["q4_k_m"].extra and "fallbacks" in m.llm["q4_k_m"].extra
    # Nothing absolute or temporary leaks into the manifest.
    assert ".tmp-" not in m.to_json()


@pytest.mark.slow  # exports
def test_export_prints_steps_and_next_command(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "b"
    rc, stdout, stderr = _run(capsys, "export", str(tiny_checkpoint), "--out", str(out), "--quant", "q8_0",
                              "--vision", "int8", "--no-verify")
    assert rc == 0, stderr
    text = stdout + stderr
    assert "vision -> ONNX fp32" in text and "quantise q8_0" in text and " s " in text
    assert f"facellm-edge run --camera 0 --bundle {out}" in text.replace("\n", " ")
    m = load_bundle(out).manifest
    assert set(m.llm) == {"q8_0"} and set(m.vision) == {"int8"}  # intermediates were not kept
    assert sorted(p.name for p in (out / "llm").iterdir()) == ["q8_0.gguf"]


@pytest.mark.slow  # verified export
def test_inspect_rechecks_hashes(verified_bundle, tmp_path, capsys):
    rc, stdout, _ = _run(capsys, "inspect", str(verified_bundle))
    assert rc == 0 and "all file hashes match" in stdout and "q4_k_m" in stdout
    rc, stdout, _ = _run(capsys, "inspect", str(verified_bundle), "--json")
    assert rc == 0 and json.loads(stdout)["schema_version"] == 1
    copy = tmp_path / "copy"
    shutil.copytree(verified_bundle, copy)
    with open(copy / "llm" / "q8_0.gguf", "r+b") as f:
        f.seek(-16, 2)
        f.write(b"\0" * 16)
    rc, _, stderr = _run(capsys, "inspect", str(copy))
    assert rc != 0 and "llm/q8_0.gguf: sha256 mismatch" in stderr and stderr.count("\n") == 1


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", "not found"),
        ("not_internvl", "Qwen2ForCausalLM"),
        ("truncated", "model.safetensors"),
        ("unknown_quant", "unknown quant 'q4_km'; choose from"),
        ("missing_adapter", "adapter directory not found"),
        ("bad_adapter", "adapter"),
    ],
)
def test_bad_input_one_line_and_no_bundle(case, expect, tiny_checkpoint, tmp_path, capsys):
    src = str(tiny_checkpoint)
    extra: list[str] = []
    if case == "missing":
        src = str(tmp_path / "no_such_checkpoint")
    elif case == "not_internvl":
        d = tmp_path / "qwen"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
        src = str(d)
    elif case == "truncated":
        d = tmp_path / "trunc"
        shutil.copytree(tiny_checkpoint, d)
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        src = str(d)
    elif case == "unknown_quant":
        extra = ["--quant", "q4_km"]
    elif case == "missing_adapter":
        extra = ["--adapter", str(tmp_path / "nope")]
    elif case == "bad_adapter":
        d = tmp_path / "adapter"
        d.mkdir()
        (d / "adapter_config.json").write_text("{not json")
        extra = ["--adapter", str(d)]
    rc, _, stderr = _run(capsys, "export", src, "--out", str(tmp_path / "out"), "--no-verify", *extra)
    assert rc != 0
    assert expect in stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    _no_leftovers(tmp_path, "out")


@pytest.mark.slow  # tiny_bundle
def test_existing_output_needs_force(tiny_bundle, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    before = (out / "manifest.json").read_text()
    rc, _, stderr = _run(capsys, "export", str(tiny_checkpoint), "--out", str(out), "--no-verify")
    assert rc != 0 and "already exists" in stderr and "--force" in stderr
    assert (out / "manifest.json").read_text() == before
    # An unrelated directory is never replaced, even with --force.
    other = tmp_path / "photos"
    other.mkdir()
    (other / "me.jpg").write_bytes(b"x")
    rc, _, stderr = _run(capsys, "export", str(tiny_checkpoint), "--out", str(other), "--force", "--no-verify")
    assert rc != 0 and "not a bundle" in stderr and (other / "me.jpg").exists()


def test_unwritable_output(tiny_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc, _, stderr = _run(capsys, "export", str(tiny_checkpoint), "--out", str(blocker / "bundle"), "--no-verify")
    assert rc != 0 and "cannot write" in stderr


@pytest.mark.slow  # exports
def test_disk_full_mid_export_leaves_nothing(tiny_checkpoint, tmp_path):
    """A real write failure mid-export: the file-size limit stops the GGUF write (EFBIG), as a full disk would."""
    out = tmp_path / "out"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 2**20, 8 * 2**20))\n"
        "from facellm_edge.cli import main\n"
        f"sys.exit(main(['export', {str(tiny_checkpoint)!r}, '--out', {str(out)!r}, '--quant', 'f32', '--no-verify']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    # Python writers report EFBIG as OSError ("disk full …"); Rust-backed ones (tokenizers) as "File too large".
    assert last.startswith("error: ") and ("disk full" in last or "File too large" in last), proc.stderr[-2000:]
    assert "unexpected" not in last
    assert "Traceback" not in proc.stderr
    _no_leftovers(tmp_path, "out")


def test_out_through_a_folder_not_yet_made_is_checked_as_written(tiny_checkpoint, tmp_path, capsys):
    """--out existing/NEW/.. names `existing`: refused at once as an existing output, NEW not created. Before, the
    check went through NEW (absent, so "absent"), the whole export ran, then writing found `existing` and NEW stayed."""
    existing = tmp_path / "existing"
    existing.mkdir()
    rc, _, stderr = _run(capsys, "export", str(tiny_checkpoint), "--out", str(existing / "NEW" / ".."), "--no-verify")
    assert rc != 0 and f"output {existing} already exists" in stderr
    assert not (existing / "NEW").exists() and sorted(tmp_path.iterdir()) == [existing]
