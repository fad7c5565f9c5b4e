"""Attention fusion of the vision graph into ONNX Runtime's MultiHeadAttention (facellm_edge.export.onnx_fuse)."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from facellm_edge.export import onnx_vision  # noqa: E402
from facellm_edge.export.onnx_fuse import MS_DOMAIN, fuse_attention  # noqa: E402

pytestmark = pytest.mark.slow  # exports the vision graph (tiny_vision_onnx) or uses tiny_bundle


def _run(model_or_path, x: np.ndarray) -> np.ndarray:
    src = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixel_values": x})[0]


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.fixture(scope="module")
def tiny_fp32(tiny_vision_onnx, tiny_checkpoint):
    """The exported fp32 vision graph, its number of attention blocks and a batch-2 input."""
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    size = int(onnx_vision.read_metadata(tiny_vision_onnx)["image_size"])
    x = np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32)
    return tiny_vision_onnx, config["vision_config"]["num_hidden_layers"], x


def test_fused_fp32_graph_computes_the_same_attention(tiny_fp32):
    path, layers, x = tiny_fp32
    plain = onnx.load(str(path))
    fused = onnx.load(str(path))
    report = fuse_attention(fused)
    assert (report.fused, report.skipped) == (layers, 0)
    assert _ops(fused).count("MultiHeadAttention") == layers and "Softmax" not in _ops(fused)
    assert len(fused.graph.node) < len(plain.graph.node)
    assert any(o.domain == MS_DOMAIN for o in fused.opset_import)
    ref, got = _run(plain, x), _run(fused, x)  # batch 2: the batch dimension stays dynamic
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_a_block_that_does_not_match_is_left_as_it_was(tiny_fp32):
    path, layers, x = tiny_fp32
    model = onnx.load(str(path))
    first = next(n for n in model.graph.node if n.op_type == "Softmax")
    # Same result (the last axis of a rank-4 tensor), but not the pattern's axis=-1: must not be fused.
    del first.attribute[:]
    first.attribute.append(onnx.helper.make_attribute("axis", 3))
    ref = _run(model, x)
    report = fuse_attention(model)
    assert (report.fused, report.skipped) == (layers - 1, 1)
    assert "softmax over axis 3" in report.reasons[0]
    np.testing.assert_allclose(_run(model, x), ref, rtol=1e-4, atol=1e-5)


def test_exported_int8_graph_is_fused_and_says_so(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    layers = manifest["arch"]["vision_layers"]
    model = onnx.load(str(tiny_bundle / manifest["vision"]["int8"]["path"]))
    assert _ops(model).count("MultiHeadAttention") == layers
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["attention"] == f"com.microsoft.MultiHeadAttention x{layers}"
