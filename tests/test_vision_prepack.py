"""The vision encoder's memory/speed trade (issue 15): ONNX Runtime's weight pre-packing + CPU memory arena, chosen
per machine (``auto``) or by the user (``on`` / ``off``; ``--vision-prepack``, the ``vision_prepack`` config key,
``bench --vision-prepack``), and recorded by the bench."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facellm_edge.bench.config import BenchConfig
from facellm_edge.cli import main
from facellm_edge.cpu import cpuinfo
from facellm_edge.errors import UsageError
from facellm_edge.runtime.encode import (
    INT8_DOT_FLAGS, PREPACK, SPIN_STOP, EncoderConfig, VisionEncoder, auto_prepack, resolve_prepack,
)

AVX2 = {"sse4_2", "avx", "avx2", "fma", "f16c"}  # the project's AVX2 box: no int8 dot products


@pytest.mark.parametrize("flags, precision, on", [
    (AVX2, "int8", False),  # measured: ~5 % faster for ~380 MB: off
    (AVX2 | {"avx512f", "avx512bw"}, "int8", False),  # AVX-512 without VNNI
    (AVX2 | {"avx512f", "avx512_vnni"}, "int8", True),  # measured: 13 % faster for +24...150 MB: on
    (AVX2 | {"avx_vnni"}, "int8", True),  # Alder Lake and later: VNNI in the AVX encoding
    (AVX2 | {"amx_int8", "amx_tile"}, "int8", True),
    (AVX2 | {"amx_bf16", "amx_tile"}, "int8", False),  # bf16 tiles are no int8 dot product
    ({"fp", "asimd", "asimddp"}, "int8", True),  # ARM64 SDOT/UDOT
    ({"fp", "asimd", "i8mm"}, "int8", True),
    ({"fp", "asimd"}, "int8", False),  # plain NEON (Cortex-A53/A72: Raspberry Pi 3/4)
    (set(), "int8", False),  # no /proc/cpuinfo (macOS): nothing known, lean
    (AVX2 | {"avx512_vnni"}, "fp32", False),  # only the int8 graph was measured
])
def test_auto_rule_by_flag_set(flags, precision, on):
    got, why = auto_prepack(flags, precision)
    assert got is on and why.startswith("auto: ") and "\n" not in why
    if on:
        assert any(f in why for f in INT8_DOT_FLAGS)  # the log says which instruction decided it


def test_resolve_explicit_and_gpu_and_this_cpu():
    for cpu_only in (True, False):
        for precision in ("int8", "fp32"):
            assert resolve_prepack("on", cpu_only=cpu_only, precision=precision)[0] is True
            assert resolve_prepack("off", cpu_only=cpu_only, precision=precision)[0] is False
    assert resolve_prepack("auto", cpu_only=False, precision="int8") == (
        True, "auto: a GPU provider runs the graph (ONNX Runtime's defaults)")
    assert resolve_prepack("auto", cpu_only=True, precision="int8") == auto_prepack(cpuinfo()[1], "int8")
    with pytest.raises(UsageError):
        resolve_prepack("yes", cpu_only=True, precision="int8")


@pytest.mark.parametrize("bad", ["yes", "ON", "", "true"])
def test_bad_values_are_one_line_usage_errors(bad):
    for make in (lambda: EncoderConfig(prepack=bad), lambda: BenchConfig(synthetic="tiny", vision_prepack=bad)):
        with pytest.raises(UsageError) as err:
            make()
        msg = str(err.value)
        assert msg == f"unknown vision prepack setting '{bad}'; choose one of: {', '.join(PREPACK)}"
        assert err.value.exit_code == 2


def test_cli_refuses_a_bad_value_in_one_line_before_loading(photos, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["ask", str(photos["astronaut"]), "Age?", "--vision-prepack", "fast"],
                 ["run", "--source", str(photos["astronaut"]), "--question", "Age?", "--no-display",
                  "--vision-prepack", "fast"]):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert err.startswith("error: unknown vision prepack setting 'fast'; choose one of: auto, on, off"), err
    assert list(tmp_path.iterdir()) == []


def _session_prepacks(enc: VisionEncoder) -> bool:
    """What the live ORT session was created with: pre-packing and the CPU arena, both on or both off."""
    opts = enc._session.get_session_options()
    try:
        disabled = opts.get_session_config_entry("session.disable_prepacking") == "1"
    except RuntimeError:  # ORT: no such entry, i.e. its default (pre-packing on)
        disabled = False
    assert disabled is not opts.enable_cpu_mem_arena  # one switch: both follow it
    # whatever the packing, ORT's threads stop spinning when an encode returns (llama.cpp prefills on those cores)
    assert opts.get_session_config_entry(SPIN_STOP) == "1"
    return not disabled


@pytest.mark.slow  # tiny_bundle
@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_values_reach_ort_and_on_off_encode_the_same(tiny_bundle, precision):
    from facellm_edge.bundle import load_bundle

    bundle = load_bundle(tiny_bundle)
    size = bundle.manifest.image.size
    x = np.random.default_rng(0).uniform(-2.0, 2.0, (2, 3, size, size)).astype(np.float32)
    encoders = {v: VisionEncoder.from_bundle(bundle, EncoderConfig(device="cpu", precision=precision, n_threads=1,
                                                                     prepack=v)) for v in PREPACK}
    assert {v: enc.prepack for v, enc in encoders.items()} == {
        "on": True, "off": False, "auto": auto_prepack(cpuinfo()[1], precision)[0]}
    for enc in encoders.values():
        assert enc.precision == precision and enc.providers == ["CPUExecutionProvider"]
        assert _session_prepacks(enc) is enc.prepack
    on, off = encoders["on"].encode(x), encoders["off"].encode(x)
    assert on.shape == (2, bundle.manifest.tokens.num_image_tokens, bundle.manifest.arch.llm_hidden)
    np.testing.assert_allclose(on, off, rtol=1e-4, atol=1e-4 * float(np.abs(off).max()))


@pytest.mark.slow  # tiny_bundle
def test_flag_and_config_key_reach_the_loaded_encoder(tiny_bundle, yunet_model, photos, tmp_path, monkeypatch,
                                                      capsys):
    from facellm_edge.runtime.pipeline import FaceLLM

    seen, load = [], FaceLLM.load.__func__

    def recording_load(cls, bundle, config):
        model = load(cls, bundle, config)
        seen.append((config.encoder.prepack, model.encoder.prepack))
        return model

    monkeypatch.setattr(FaceLLM, "load", classmethod(recording_load))
    cfg = tmp_path / "f.toml"
    cfg.write_text('vision_prepack = "on"\n', encoding="utf-8")
    base = ["ask", str(photos["astronaut"]), "Age?", "--json", "--bundle", str(tiny_bundle), "--detector-model",
            str(yunet_model), "--max-tokens", "1", "--precision", "int8", "--device", "cpu"]
    for extra, want in ((["--config", str(cfg)], ("on", True)),
                        (["--config", str(cfg), "--vision-prepack", "off"], ("off", False))):  # the flag wins
        assert main([*base, *extra]) == 0, capsys.readouterr().err
        assert len(json.loads(capsys.readouterr().out)["faces"]) == 1
        assert seen.pop() == want
    assert main(base) == 0, capsys.readouterr().err
    assert seen.pop() == ("auto", auto_prepack(cpuinfo()[1], "int8")[0])


@pytest.mark.slow  # tiny_bundle
@pytest.mark.parametrize("setting", ["on", "off"])
def test_bench_records_the_resolved_setting(tiny_bundle, yunet_model, photos, setting):
    from facellm_edge.bench.edge import edge_payload, run_edge

    payload = edge_payload(tiny_bundle, "int8", "q8_0", photos["astronaut"], "Age?", "Smiling?", runs=1, warmup=0,
                           decode_tokens=2, threads=1, detector_model=yunet_model, vision_prepack=setting)
    result = run_edge(payload)
    assert result["kind"] == "edge" and result["vision_prepack"] is (setting == "on")
    assert result["stages"]["encode_ms"]["n"] == 1


def test_bench_option_is_checked_by_the_runtime_rule(tmp_path, capsys, monkeypatch):
    """`bench --vision-prepack` builds BenchConfig.vision_prepack: a bad value is the runtime's one-line usage error,
    before anything is built or written."""
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "--synthetic", "tiny", "--vision-prepack", "fast", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "unknown vision prepack setting 'fast'" in err, err
    assert list(tmp_path.iterdir()) == []
