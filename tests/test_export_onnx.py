"""Vision tower + pixel shuffle + projector -> ONNX: exactness vs transformers, dynamic batch, metadata, int8,
external data. Everything runs the real exporter and ONNX Runtime on the tiny InternVL checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

from facellm_edge import __version__  # noqa: E402
from facellm_edge.errors import ExportError  # noqa: E402
from facellm_edge.export import checkpoint, onnx_vision  # noqa: E402


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return checkpoint.load_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def image(loaded):
    ip = loaded.processor.image_processor
    return {"size": int(ip.size["height"]), "mean": tuple(ip.image_mean), "std": tuple(ip.image_std)}


@pytest.fixture(scope="module")
def int8_onnx(tiny_vision_onnx, tmp_path_factory) -> Path:
    return onnx_vision.quantize_vision_int8(tiny_vision_onnx, tmp_path_factory.mktemp("vision_int8") / "int8.onnx")


def _pixels(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layer", [-1, -2])
def test_encoder_is_exactly_get_image_features(loaded, image, layer):
    model = loaded.model
    if layer != -1:  # another feature layer: the encoder must follow the config, like get_image_features does
        model = copy.deepcopy(model)
        model.config.vision_feature_layer = layer
    pixels = _pixels(2, image["size"], seed=1)
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=layer,
                                             return_dict=True).pooler_output
        got = onnx_vision.VisionEncoder(model).eval()(pixels)
    assert got.shape == (2, loaded.processor.image_seq_length, loaded.config.text_config.hidden_size)
    assert torch.equal(got, ref)


@pytest.mark.slow  # exports the vision graph (tiny_vision_onnx)
def test_fp32_onnx_matches_torch_with_one_dynamic_batch_graph(loaded, tiny_vision_onnx):
    sess = ort.InferenceSession(str(tiny_vision_onnx), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == "pixel_values" and out.name == "image_embeds"
    assert isinstance(inp.shape[0], str) and isinstance(out.shape[0], str)  # symbolic batch
    assert onnx_vision.onnx_files(tiny_vision_onnx) == [tiny_vision_onnx]  # tiny: no external data

    report = onnx_vision.verify_vision(loaded.model, tiny_vision_onnx, batch_sizes=(1, 3), seed=0)
    for b in (1, 3):
        r = report[f"batch_{b}"]
        assert r["max_abs_diff"] <= 1e-4, r
        assert r["max_rel_diff"] <= 1e-3, r
        assert r["cosine"] > 0.99999, r
    assert report["max_abs_diff"] == max(report["batch_1"]["max_abs_diff"], report["batch_3"]["max_abs_diff"])


@pytest.mark.slow  # exports the vision graph (tiny_vision_onnx)
def test_batch_rows_are_independent(loaded, image, tiny_vision_onnx):
    """Row i of a batch-3 run equals a batch-1 run on image i (no batch mixing in the exported reshapes)."""
    sess = ort.InferenceSession(str(tiny_vision_onnx), providers=["CPUExecutionProvider"])
    pixels = _pixels(3, image["size"], seed=7).numpy()
    batched = sess.run(["image_embeds"], {"pixel_values": pixels})[0]
    for i in range(3):
        single = sess.run(["image_embeds"], {"pixel_values": pixels[i:i + 1]})[0][0]
        np.testing.assert_allclose(batched[i], single, atol=1e-5)
    assert not np.allclose(batched[0], batched[1])


@pytest.mark.slow  # exports the vision graph (tiny_vision_onnx)
def test_metadata_props_come_from_the_checkpoint(loaded, image, tiny_vision_onnx):
    meta = onnx_vision.read_metadata(tiny_vision_onnx)
    assert meta["image_size"] == str(image["size"])
    assert [float(x) for x in meta["mean"].split(",")] == pytest.approx(image["mean"])
    assert [float(x) for x in meta["std"].split(",")] == pytest.approx(image["std"])
    assert meta["tokens_per_tile"] == str(loaded.processor.image_seq_length)
    assert meta["hidden_size"] == str(loaded.config.text_config.hidden_size)
    assert meta["source_model"] == "tiny-internvl"
    assert __version__ in meta["producer"]


@pytest.mark.slow  # exports the vision graph (tiny_vision_onnx)
def test_int8_runs_keeps_metadata_and_is_close(loaded, tiny_vision_onnx, int8_onnx):
    ops = {n.op_type for n in onnx.load(str(int8_onnx)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    assert int8_onnx.stat().st_size < tiny_vision_onnx.stat().st_size
    meta, meta32 = onnx_vision.read_metadata(int8_onnx), onnx_vision.read_metadata(tiny_vision_onnx)
    assert {k: meta[k] for k in meta32} == meta32 and "quantization" in meta
    report = onnx_vision.verify_vision(loaded.model, int8_onnx, batch_sizes=(1, 3), seed=0)
    # Reported, and on the tiny random model int8 stays close to fp32 torch.
    assert report["cosine_min"] > 0.99, report
    assert report["max_abs_diff"] > 0.0  # it really is quantised


@pytest.fixture(scope="module")
def internvit6b_style_model(tiny_checkpoint):
    """The tiny model with FaceLLM-38B's vision variant (InternViT-6B: RMSNorm, QK-norm, no attention bias)."""
    config = transformers.AutoConfig.from_pretrained(tiny_checkpoint)
    config.vision_config.norm_type = "rms_norm"
    config.vision_config.use_qk_norm = True
    config.vision_config.attention_bias = False
    torch.manual_seed(11)
    return transformers.InternVLForConditionalGeneration(config).eval()


@pytest.mark.slow  # more than 7 s: a larger vision tower
def test_external_data_for_large_models(internvit6b_style_model, image, tmp_path, monkeypatch):
    """Weights above the threshold (38B's 6B vision tower) go to one external data file; fp32, int8 and
    verification all follow it. Uses the RMSNorm/QK-norm vision variant so that architecture is exported too."""
    model = internvit6b_style_model
    monkeypatch.setattr(onnx_vision, "EXTERNAL_DATA_THRESHOLD", 0)
    fp32 = onnx_vision.export_vision_onnx(model, tmp_path / "fp32.onnx", image["size"])
    files = onnx_vision.onnx_files(fp32)
    assert len(files) == 2 and all(f.is_file() for f in files)
    assert fp32.stat().st_size < files[1].stat().st_size  # the weights are in the data file
    report = onnx_vision.verify_vision(model, fp32, batch_sizes=(1, 2))
    assert report["max_abs_diff"] <= 1e-4, report

    int8 = onnx_vision.quantize_vision_int8(fp32, tmp_path / "int8.onnx")
    int8_files = onnx_vision.onnx_files(int8)
    assert int8_files[0] == int8 and all(f.is_file() for f in int8_files)
    assert onnx_vision.read_metadata(int8)["image_size"] == str(image["size"])
    assert onnx_vision.verify_vision(model, int8, batch_sizes=(1,))["cosine_min"] > 0.99


def test_export_refuses_wrong_image_size_and_dtype(loaded, image, tmp_path):
    with pytest.raises(ExportError, match="image size"):
        onnx_vision.export_vision_onnx(loaded.model, tmp_path / "x.onnx", image["size"] // 2)
    bf16 = copy.deepcopy(loaded.model).to(torch.bfloat16)
    with pytest.raises(ExportError, match="float32"):
        onnx_vision.export_vision_onnx(bf16, tmp_path / "x.onnx", image["size"])
    assert not (tmp_path / "x.onnx").exists()
