"""The SCRFD backend (the `insightface` extra) driven end to end with insightface's own SCRFD class.

No SCRFD weights can be downloaded here, so the tests build an ONNX with SCRFD's real interface and random weights:
input ``input.1`` [1, 3, H, W]; nine outputs in insightface's order -- scores (1 per anchor), box distances (4) and
keypoint offsets (10) at strides 8, 16 and 32, two anchors per position, each flattened to [anchors, C] as SCRFD's
export does (NCHW head -> NHWC -> reshape). Random weights give random boxes: the tests check the structure, that
insightface's SCRFD class is what runs, and that our detector returns exactly what that class detects.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from facellm_edge.errors import MissingExtraError
from facellm_edge.runtime.detect import DetectorConfig, create_detector

STRIDES = (8, 16, 32)
ANCHORS = 2
HEADS = (("score", 1), ("bbox", 4), ("kps", 10))  # insightface's output order: all scores, all boxes, all keypoints
SCORE_BIAS = -8.0
SCORE_GAIN = 4.0


def build_scrfd_onnx(path: Path, seed: int = 0, width: int = 8) -> Path:
    """A random-weight network with SCRFD's input and nine-output layout (see the module docstring)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x: str, name: str, cin: int, cout: int, k: int, stride: int, bias: float = 0.0, gain: float = 1.0) -> str:
        w = rng.normal(0, gain / np.sqrt(cin * k * k), (cout, cin, k, k)).astype(np.float32)
        b = (bias + rng.normal(0, 0.5, cout)).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4))
        return name

    def relu(x: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [f"{x}.relu"]))
        return f"{x}.relu"

    x, cin, feats = "input.1", 3, {}
    for i, s in enumerate((2, 4, 8, 16, 32)):  # a strided stem: feature maps at strides 8, 16, 32
        x, cin = relu(conv(x, f"stem{i}", cin, width, 3, 2)), width
        if s in STRIDES:
            feats[s] = x
    outputs = []
    for head, c in HEADS:
        for s in STRIDES:
            # scores: spread out, and a negative bias keeps those above 0.7 to a few hundred (NMS is quadratic in them)
            score = head == "score"
            y = conv(feats[s], f"{head}_{s}.conv", width, ANCHORS * c, 1, 1, bias=SCORE_BIAS if score else 0.0,
                     gain=SCORE_GAIN if score else 1.0)
            if head == "score":
                nodes.append(helper.make_node("Sigmoid", [y], [f"{y}.sig"]))
                y = f"{y}.sig"
            elif head == "bbox":  # distances from the anchor centre: non-negative, as a trained SCRFD gives
                y = relu(y)
            nodes.append(helper.make_node("Transpose", [y], [f"{y}.nhwc"], perm=[0, 2, 3, 1]))
            shape = numpy_helper.from_array(np.array([-1, c], dtype=np.int64), f"{head}_{s}.shape")
            inits.append(shape)
            nodes.append(helper.make_node("Reshape", [f"{y}.nhwc", shape.name], [f"{head}_{s}"]))
            outputs.append(helper.make_tensor_value_info(f"{head}_{s}", TensorProto.FLOAT, [f"n{s}", c]))
    graph = helper.make_graph(nodes, "scrfd_random", [helper.make_tensor_value_info(
        "input.1", TensorProto.FLOAT, [1, 3, "height", "width"])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="facellm-edge-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def scrfd_onnx(tmp_path_factory) -> Path:
    return build_scrfd_onnx(tmp_path_factory.mktemp("scrfd") / "det_random.onnx")


def test_the_random_network_has_scrfds_layout(scrfd_onnx):
    from facellm_edge.onnxrt import onnxruntime_module

    ort = onnxruntime_module()
    sess = ort.InferenceSession(str(scrfd_onnx), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"input.1": np.zeros((1, 3, 640, 480), np.float32)})
    assert [o.name for o in sess.get_outputs()] == [f"{h}_{s}" for h, _ in HEADS for s in STRIDES]
    for (head, c), group in zip(HEADS, (outs[0:3], outs[3:6], outs[6:9])):
        for s, out in zip(STRIDES, group):
            assert out.shape == ((640 // s) * (480 // s) * ANCHORS, c), (head, s)


def test_scrfd_backend_runs_insightfaces_scrfd_class(scrfd_onnx, t1_bgr):
    pytest.importorskip("insightface")
    from insightface.model_zoo import get_model
    from insightface.model_zoo.scrfd import SCRFD

    config = DetectorConfig(name="scrfd", model_path=scrfd_onnx, score_threshold=0.7, max_faces=5)
    detector = create_detector(config)
    assert isinstance(detector._model, SCRFD)
    assert detector._model.fmc == 3 and detector._model.use_kps and detector._model._num_anchors == ANCHORS

    faces = detector.detect(t1_bgr)
    assert 0 < len(faces) <= 5
    scores = [f.score for f in faces]
    assert scores == sorted(scores, reverse=True) and all(0.7 <= s <= 1.0 for s in scores)
    for f in faces:
        assert f.box.shape == (4,) and f.landmarks.shape == (5, 2)
        assert f.box[2] >= f.box[0] and f.box[3] >= f.box[1]  # distances are >= 0: never an inverted box
        assert np.isfinite(f.box).all() and np.isfinite(f.landmarks).all()

    # exactly what insightface's class detects on its own, at the same size and threshold (ours keeps the top 5)
    reference = get_model(str(scrfd_onnx))
    reference.prepare(ctx_id=-1, input_size=(640, 640), det_thresh=0.7)
    det, kps = reference.detect(t1_bgr, input_size=(640, 640))
    assert len(det) > 5  # more candidates than max_faces: the cut is ours
    order = np.argsort(-det[:, 4], kind="stable")[:5]
    np.testing.assert_allclose(np.stack([f.box for f in faces]), det[order, :4], rtol=1e-6)
    np.testing.assert_allclose(np.stack([f.landmarks for f in faces]), kps[order], rtol=1e-6)
    np.testing.assert_allclose(scores, det[order, 4], rtol=1e-6)


def test_scrfd_without_insightface_names_the_extra(scrfd_onnx, monkeypatch):
    monkeypatch.setitem(sys.modules, "insightface", None)  # `import insightface` now fails as if not installed
    with pytest.raises(MissingExtraError) as info:
        create_detector(DetectorConfig(name="scrfd", model_path=scrfd_onnx))
    assert info.value.exit_code == 7
    assert "pip install 'facellm-edge[insightface]'" in str(info.value)


@pytest.mark.slow
def test_ask_with_scrfd_and_without_insightface(tiny_bundle, scrfd_onnx, t1_bgr, tmp_path, capsys, monkeypatch):
    """`ask --detector scrfd` end to end on the random SCRFD (faces answered), then the same without insightface:
    one line naming the extra, exit code 7."""
    pytest.importorskip("insightface")
    import json

    import cv2

    from facellm_edge.cli import main

    photo = tmp_path / "t1.jpg"
    cv2.imwrite(str(photo), t1_bgr)
    args = ["ask", str(photo), "Age?", "--bundle", str(tiny_bundle), "--detector", "scrfd", "--detector-model",
            str(scrfd_onnx), "--max-faces", "2", "--max-tokens", "2", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert 1 <= len(out["faces"]) <= 2 and all(len(f["box"]) == 4 for f in out["faces"])

    monkeypatch.setitem(sys.modules, "insightface", None)
    assert main(args) == 7
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "facellm-edge[insightface]" in err[0]
