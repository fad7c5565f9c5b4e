"""``facellm-edge ask`` / ``run`` through the real CLI entry point (cli.main), with the tiny bundle."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from facellm_edge.cli import main


@pytest.mark.slow  # tiny_bundle
def test_ask_json(photos, bundle_args, capsys):
    rc = main(["ask", str(photos["astronaut"]), "How old is this person?", "--json", *bundle_args])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["question"] == "How old is this person?" and out["no_face"] is False
    (face,) = out["faces"]
    assert len(face["box"]) == 4 and isinstance(face["answer"], str) and 1 <= face["n_tokens"] <= 2
    assert {"detect", "align", "encode", "image_prefill", "ttft", "decode"} <= set(face["timings_ms"])


@pytest.mark.slow  # tiny_bundle
def test_ask_text_and_save_crops(photos, bundle_args, capsys, tmp_path):
    rc = main(["ask", str(photos["t1"]), "Age?", "--save-crops", str(tmp_path / "crops"), *bundle_args])
    out = capsys.readouterr().out
    # one "face N [box]: answer" line per face (the random model's answers may contain any text, "face " too)
    assert rc == 0 and len(re.findall(r"^face \d+ \[", out, flags=re.M)) == 6 and "ms" in out
    assert len(list((tmp_path / "crops").glob("*.png"))) == 6
    assert not [p for p in (tmp_path / "crops").iterdir() if p.name.startswith(".")]  # no hidden temp left
    # a second ask into the same folder: the crops there are not provably ours, so nothing is replaced
    before = {p.name: p.read_bytes() for p in (tmp_path / "crops").iterdir()}
    (tmp_path / "crops" / "face0.png").write_bytes(b"the user's own picture")
    before["face0.png"] = b"the user's own picture"
    rc = main(["ask", str(photos["t1"]), "Age?", "--save-crops", str(tmp_path / "crops"), *bundle_args])
    err = capsys.readouterr().err
    assert rc == 4 and err.count("\n") == 1 and "face0.png already exists; choose an empty folder" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "crops").iterdir()} == before


@pytest.mark.slow  # tiny_bundle
def test_ask_no_face_is_a_record(photos, bundle_args, capsys):
    rc = main(["ask", str(photos["blank"]), "Age?", "--json", *bundle_args])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["faces"] == [] and out["no_face"] is True
    rc = main(["ask", str(photos["blank"]), "Age?", *bundle_args])
    assert rc == 0 and "no face found" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, code, message",
    [
        pytest.param(["ask", "{empty}", "Age?"], 3, "cannot decode image", marks=pytest.mark.slow),
        pytest.param(["ask", "{missing}", "Age?"], 3, "image not found", marks=pytest.mark.slow),
        pytest.param(["ask", "{folder}", "Age?"], 3, "is a folder, not an image (`run --source",
                     marks=pytest.mark.slow),
        pytest.param(["ask", "{astronaut}", "Age?", "--detector", "haar"], 2,
                     "unknown detector 'haar'; choose one of: scrfd, yunet", marks=pytest.mark.slow),
        (["ask", "{astronaut}", "Age?", "--bundle", "{nobundle}"], 3, "bundle not found"),
        pytest.param(["ask", "{astronaut}", "Age?", "--detector", "scrfd", "--detector-model", "{missing}"], 3,
                     "SCRFD model not found", marks=pytest.mark.slow),
        pytest.param(["run", "--camera", "9", "--question", "Age?", "--no-display"], 3, "cannot open camera 9",
                     marks=pytest.mark.slow),
        pytest.param(["run", "--question", "Age?"], 2, "exactly one of --source", marks=pytest.mark.slow),
    ],
)
def test_errors_are_one_line(photos, yunet_model, tmp_path, capsys, no_camera, request, args, code, message):
    """Slow: the cases on the exported tiny bundle (exported only when a case uses it). No camera opens: camera 9
    is asked for and is not there, whatever this machine has."""
    subst = {"{empty}": str(photos["empty"]), "{missing}": str(tmp_path / "missing.onnx"),
             "{astronaut}": str(photos["astronaut"]), "{nobundle}": str(tmp_path / "nobundle"),
             "{folder}": str(tmp_path)}
    argv = [subst.get(a, a) for a in args]
    if "--bundle" not in argv:
        argv += ["--bundle", str(request.getfixturevalue("tiny_bundle"))]
    if "--detector-model" not in argv:
        argv += ["--detector-model", str(yunet_model)]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert no_camera.opened == ([9] if "--camera" in args else [])


@pytest.mark.slow  # tiny_bundle
def test_run_headless_on_image_folder(photos, bundle_args, capsys, tmp_path):
    d = tmp_path / "frames"
    d.mkdir()
    for name in ("astronaut", "t1"):
        (d / photos[name].name).write_bytes(photos[name].read_bytes())
    jsonl = tmp_path / "out.jsonl"
    rc = main(["run", "--source", str(d), "--question", "Age?", "--no-display", "--jsonl", str(jsonl), *bundle_args])
    assert rc == 0, capsys.readouterr().err
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(recs) == 7 and len({r["track_id"] for r in recs}) == 7
    assert all(r["question"] == "Age?" for r in recs)


def _subprocess(code: str, env_extra: dict[str, str], tmp_path: Path):
    import os
    import subprocess
    import sys

    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)


def test_default_bundle_needs_the_export_extra(photos, yunet_model, tmp_path):
    """No --bundle and no cached bundle: building it needs torch; without it, the exact pip command."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # torch not installed: `import torch` raises ImportError\n"
        "from facellm_edge.cli import main\n"
        f"sys.exit(main(['ask', {str(photos['astronaut'])!r}, 'Age?', '--detector-model', {str(yunet_model)!r}]))\n"
    )
    r = _subprocess(code, {"XDG_CACHE_HOME": str(tmp_path / "cache")}, tmp_path)
    assert r.returncode == 7, r.stderr
    assert "pip install 'facellm-edge[export]'" in r.stderr
    assert not (tmp_path / "cache" / "facellm-edge" / "bundles").exists()


def test_hub_bundle_id_offline(photos, yunet_model, tmp_path):
    code = (
        "import sys\n"
        "from facellm_edge.cli import main\n"
        f"sys.exit(main(['ask', {str(photos['astronaut'])!r}, 'Age?', '--bundle', 'nobody/no-such-bundle',"
        f" '--detector-model', {str(yunet_model)!r}]))\n"
    )
    r = _subprocess(code, {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, tmp_path)
    assert r.returncode == 3, r.stderr
    assert "neither a local folder nor a downloadable hub repo" in r.stderr


@pytest.mark.slow  # tiny_bundle
def test_ask_with_json_schema_gives_valid_json(photos, tiny_bundle, yunet_model, tmp_path, capsys):
    """`--schema` constrains the (random tiny) model's answer to the schema through a llama.cpp grammar."""
    schema = tmp_path / "attributes.json"
    schema.write_text(json.dumps({
        "type": "object",
        "properties": {"age": {"type": "integer"}, "smiling": {"type": "boolean"}},
        "required": ["age", "smiling"],
    }))
    rc = main(["ask", str(photos["astronaut"]), "Describe the face as JSON.", "--json", "--bundle", str(tiny_bundle),
               "--detector-model", str(yunet_model), "--max-tokens", "48", "--schema", str(schema)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    (face,) = out["faces"]
    assert face["stop_reason"] == "grammar"  # the grammar completed the object before max_tokens
    fields = json.loads(face["answer"])
    assert isinstance(fields["age"], int) and isinstance(fields["smiling"], bool)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    rc = main(["ask", str(photos["astronaut"]), "q", "--bundle", str(tiny_bundle), "--schema", str(bad)])
    assert rc != 0 and "JSON schema" in capsys.readouterr().err


# -- the command line's shape: one table of commands, one option set for ask and run ---------------------------
def _params(name: str) -> dict:
    from facellm_edge.cli import cli

    return {p.name: p for p in cli.commands[name].load().params}


def test_ask_and_run_share_one_option_set_with_the_configs_defaults():
    from dataclasses import fields

    from facellm_edge.commands.runtime_options import LIVE_MAX_TOKENS, RuntimeOptions
    from facellm_edge.io import DEFAULT_MAX_PIXELS
    from facellm_edge.runtime.config import DetectorConfig, EncoderConfig, EngineConfig, GenerationConfig

    ask, run = _params("ask"), _params("run")
    shared = {f.name for f in fields(RuntimeOptions)} - {"live"}
    assert shared <= set(ask) and shared <= set(run)
    for name in shared:  # same flags; same defaults but one
        assert ask[name].opts == run[name].opts, name
        assert (ask[name].default == run[name].default) == (name != "max_tokens"), name
    assert ask["max_tokens"].default == GenerationConfig().max_tokens == 128
    assert run["max_tokens"].default == LIVE_MAX_TOKENS == 64
    expected = {"temperature": GenerationConfig().temperature, "ctx": EngineConfig().n_ctx,
                "gpu_layers": EngineConfig().n_gpu_layers,
                "quant": EngineConfig().quant, "threads": EngineConfig().n_threads,
                "detector": DetectorConfig().name, "detector_model": DetectorConfig().model_path,
                "detect_size": DetectorConfig().input_size,
                "max_faces": DetectorConfig().max_faces, "device": EncoderConfig().device,
                "precision": EncoderConfig().precision, "vision_prepack": EncoderConfig().prepack, "max_pixels": DEFAULT_MAX_PIXELS, "system": None,
                "bundle": None, "schema": None}
    assert expected.keys() | {"max_tokens"} == shared
    assert {name: ask[name].default for name in expected} == expected
    assert [ask[n].opts for n in ("ctx", "threads", "max_faces")] == [["--ctx"], ["--threads"], ["--max-faces"]]


@pytest.mark.slow  # tiny_bundle
def test_the_options_reach_the_runtime_config(photos, tiny_bundle, yunet_model, monkeypatch, capsys):
    """Each shared option sets its stage's field; run adds the live thread policy (the detector's thread count left
    unset -> 1; the encoder and llama.cpp keep every core)."""
    from facellm_edge.runtime.pipeline import FaceLLM

    seen, load = [], FaceLLM.load.__func__

    def recording_load(cls, bundle, config):
        seen.append(config)
        return load(cls, bundle, config)

    monkeypatch.setattr(FaceLLM, "load", classmethod(recording_load))
    base = ["--bundle", str(tiny_bundle), "--detector-model", str(yunet_model)]
    rc = main(["ask", str(photos["t1"]), "Age?", "--json", *base, "--max-tokens", "3", "--temperature", "0.5",
               "--threads", "2", "--ctx", "1024", "--max-faces", "1", "--device", "cpu", "--precision", "int8",
               "--quant", "q8_0", "--system", "intern_vl"])
    assert rc == 0, capsys.readouterr().err
    assert len(json.loads(capsys.readouterr().out)["faces"]) == 1  # --max-faces 1 of the photo's 6
    cfg = seen.pop()
    assert (cfg.generation.max_tokens, cfg.generation.temperature, cfg.generation.grammar) == (3, 0.5, None)
    assert (cfg.engine.n_threads, cfg.engine.n_threads_batch, cfg.engine.n_ctx, cfg.engine.quant) == (2, 2, 1024,
                                                                                                       "q8_0")
    assert (cfg.detector.name, cfg.detector.model_path, cfg.detector.max_faces) == ("yunet", yunet_model, 1)
    assert (cfg.encoder.device, cfg.encoder.precision, cfg.encoder.n_threads) == ("cpu", "int8", None)
    assert cfg.system == "intern_vl"
    rc = main(["run", "--source", str(photos["astronaut"]), "--question", "Age?", "--no-display", *base,
               "--max-tokens", "2"])
    assert rc == 0, capsys.readouterr().err
    cfg = seen.pop()
    assert (cfg.engine.n_threads, cfg.detector.n_threads, cfg.encoder.n_threads) == (None, 1, None)
    assert cfg.generation.max_tokens == 2 and cfg.system is None


def test_root_help_imports_no_command_module(tmp_path):
    """`facellm-edge --help` lists every command from the table without importing any command's module."""
    code = (
        "import sys\n"
        "from facellm_edge.cli import COMMANDS, main\n"
        "assert main(['--help']) == 0\n"
        "heavy = ('facellm_edge.commands', 'facellm_edge.runtime', 'facellm_edge.llm', 'numpy', 'cv2', 'torch')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    r = _subprocess(code, {"COLUMNS": "200"}, tmp_path)
    assert r.returncode == 0, r.stderr
    *help_lines, imported = r.stdout.strip().splitlines()
    assert imported == "[]"
    from facellm_edge.cli import COMMANDS

    for name, (_, summary) in COMMANDS.items():
        assert any(line.split()[1:3] == [name, summary.split()[0]] for line in help_lines if len(line.split()) > 2)


def test_every_command_of_the_table_loads_with_its_summary_first():
    from facellm_edge.cli import COMMANDS, cli

    for name, (_, summary) in COMMANDS.items():
        real = cli.commands[name].load()
        assert real.name == name and real.help.startswith(summary) and real.short_help == summary
    assert sorted(cli.commands["eval"].load().commands) == ["compare", "run", "score"]
    assert sorted(cli.commands["data"].load().commands) == ["build", "import-fairfacegpt"]


def test_eval_with_options_first_is_eval_run(capsys):
    """`eval --bench ...` (the form from before eval had subcommands) runs `eval run`; its usage names `eval run`."""
    assert main(["eval", "--limit", "0"]) == 2
    assert "usage: facellm-edge eval run [OPTIONS]" in capsys.readouterr().err
    assert main(["eval", "--help"]) == 0
    assert "is `eval run --bench ... --model ...`" in " ".join(capsys.readouterr().out.split())
