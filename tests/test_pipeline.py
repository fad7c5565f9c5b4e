"""The Python API end to end on the tiny bundle: real YuNet, real ONNX Runtime, real llama.cpp."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from facellm_edge.errors import BundleError, UsageError
from facellm_edge.runtime.pipeline import FaceAnswer, FaceLLM, RuntimeConfig

QUESTION = "How old is this person?"
STAGES = {"detect", "align", "encode", "prefill", "ttft", "decode"}


@pytest.fixture(scope="module")
def model(tiny_bundle, yunet_model):
    cfg = RuntimeConfig(detector_model=yunet_model, max_tokens=3, llm_quant="f32", vision_precision="fp32")
    with FaceLLM.load(tiny_bundle, cfg) as m:
        yield m


def test_ask_answers_every_face(model, t1_bgr, tmp_path):
    answers = model.ask(t1_bgr, QUESTION)
    assert len(answers) == 6
    boxes = np.array([a.box for a in answers])
    detected = np.array([f.box for f in model.detect(t1_bgr)])
    assert np.allclose(boxes, detected, atol=1e-3)
    for a in answers:
        assert isinstance(a, FaceAnswer) and len(a.token_ids) >= 1 and a.stop_reason in ("eos", "length")
        assert STAGES <= set(a.timings) and all(v >= 0 for v in a.timings.values())
        json.dumps(a.to_dict())
    assert list(tmp_path.iterdir()) == []  # nothing written unless asked


def test_stream_matches_ask(model, astronaut_bgr):
    answers = model.ask(astronaut_bgr, QUESTION)
    streamed: dict[int, str] = {}
    for i, piece in model.stream(astronaut_bgr, QUESTION):
        streamed[i] = streamed.get(i, "") + piece
    assert [streamed.get(i, "") for i in range(len(answers))] == [a.text for a in answers]


def test_chat_reuses_the_cached_face(model, astronaut_bgr):
    (face,) = model.ask(astronaut_bgr, QUESTION)
    follow = model.chat(face, "And the gender?")
    assert follow.key == face.key and len(follow.token_ids) >= 1
    assert follow.timings["ttft"] < face.timings["prefill"] + face.timings["ttft"]  # no image prefill again
    model.ask(astronaut_bgr, QUESTION)  # a new ask forgets the old faces
    with pytest.raises(UsageError, match="no longer cached"):
        model.chat(face, "Anything else?")


def test_readme_example_chats_with_every_face_of_a_group_photo(tiny_bundle, t1_bgr):
    """The README's loop (ask, then chat() about each answer) on a 6-face photo with the default config: every
    face's conversation is still cached (the slots follow the context, not a fixed 4)."""
    with FaceLLM.load(tiny_bundle, RuntimeConfig(max_tokens=3)) as m:
        answers = m.ask(t1_bgr, QUESTION)
        assert len(answers) == 6
        for answer in answers:
            follow = m.chat(answer, "And what is their expression?")
            assert follow.key == answer.key and len(follow.token_ids) >= 1
            assert follow.timings["ttft"] < answer.timings["prefill"] + answer.timings["ttft"]  # no image prefill


def test_chat_past_the_slots_says_how_to_raise_them(tiny_bundle, t1_bgr):
    with FaceLLM.load(tiny_bundle, RuntimeConfig(max_tokens=2, max_slots=4)) as m:
        answers = m.ask(t1_bgr, QUESTION)
        assert m.chat(answers[5], "And?").key == answers[5].key  # the last 4 are kept
        with pytest.raises(UsageError, match=r"max_slots=4, n_ctx=4096\); .*raise RuntimeConfig.n_ctx \(--ctx\) "
                                             r"and max_slots"):
            m.chat(answers[0], "And?")


def test_no_face_gives_empty_list(model):
    assert model.ask(np.full((480, 640, 3), 90, np.uint8), QUESTION) == []


def test_save_crops_only_when_asked(model, astronaut_bgr, tmp_path):
    import cv2

    out = tmp_path / "crops"
    model.ask(astronaut_bgr, QUESTION, max_tokens=1, save_crops=out)
    files = sorted(out.iterdir())
    assert len(files) == 1
    crop = cv2.imread(str(files[0]))
    assert crop.shape == (448, 448, 3)


def test_concurrent_callers_are_serialised(model, astronaut_bgr):
    mirrored = np.ascontiguousarray(astronaut_bgr[:, ::-1])
    expected = {"a": [a.token_ids for a in model.ask(astronaut_bgr, QUESTION)],
                "t": [a.token_ids for a in model.ask(mirrored, QUESTION)]}
    got: dict[str, list] = {}
    errors: list[BaseException] = []

    def call(name, image):
        try:
            got[name] = [a.token_ids for a in model.ask(image, QUESTION)]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=("a", astronaut_bgr)),
               threading.Thread(target=call, args=("t", mirrored))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and got == expected


def test_ask_image_tiles_the_whole_frame(model, t1_bgr):
    a = model.ask_image(t1_bgr, QUESTION, max_tokens=2)
    assert len(a.token_ids) >= 1 and a.timings["prefill"] > 0


def test_greedy_tokens_match_transformers(model, tiny_bundle, astronaut_bgr):
    """Same crop, same question: llama.cpp + ONNX greedy tokens == transformers' greedy generation."""
    import torch
    from transformers import AutoProcessor, InternVLForConditionalGeneration

    face = model.detect(astronaut_bgr)[0]
    model.encode_faces(astronaut_bgr, [face])
    n_new = 8
    ours = model.ask_crop(face.crop, QUESTION, max_tokens=n_new)

    src = model.bundle.manifest.source["path"]
    processor = AutoProcessor.from_pretrained(src)
    hf = InternVLForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[np.ascontiguousarray(face.crop[..., ::-1])], return_tensors="pt")
    with torch.no_grad():
        feats = hf.get_image_features(pixel_values=inputs["pixel_values"])
        ref_embeds = getattr(feats, "pooler_output", feats).reshape(1, -1, face.embeds.shape[-1])
        out = hf.generate(**inputs, max_new_tokens=n_new, do_sample=False)
    assert np.allclose(face.embeds, ref_embeds[0].numpy(), atol=1e-3)
    eos = set(model.bundle.manifest.tokens.eos_ids)
    hf_tokens = []
    for t in out[0, inputs["input_ids"].shape[1]:].tolist():
        if t in eos:
            break
        hf_tokens.append(t)
    assert list(ours.token_ids) == hf_tokens


# -- bundle errors ---------------------------------------------------------------------------------------------


def _copy_bundle(src: Path, dst: Path) -> Path:
    """A cheap copy: manifest copied, large files hard-linked (a symlink out of the bundle is a damaged bundle now;
    the tests replace a file by unlinking it first, so the original is never changed)."""
    dst.mkdir()
    for p in src.rglob("*"):
        if p.is_file():
            q = dst / p.relative_to(src)
            q.parent.mkdir(parents=True, exist_ok=True)
            if p.name == "manifest.json":
                shutil.copy(p, q)
            else:
                try:
                    os.link(p, q)
                except OSError:  # another file system
                    shutil.copy(p, q)
    return dst


def test_missing_bundle(tmp_path):
    with pytest.raises(BundleError, match="bundle not found"):
        FaceLLM.load(tmp_path / "nope")


def test_tampered_bundle(tiny_bundle, tmp_path):
    b = _copy_bundle(Path(tiny_bundle), tmp_path / "b")
    onnx = next((b / "vision").glob("*.onnx"))
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.unlink()
    onnx.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        FaceLLM.load(b)


def _onnx_encoder(path: Path, width: int, tokens: int = 256, size: int = 448) -> None:
    """A real (tiny) ONNX encoder: patchify conv (stride size/16) -> [B, tokens, width]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = size // int(tokens ** 0.5)
    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.01, (width, 3, k, k)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([0, width, tokens], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["pixel_values", "w"], ["c"], kernel_shape=[k, k], strides=[k, k]),
         helper.make_node("Reshape", ["c", "shape"], ["r"]),
         helper.make_node("Transpose", ["r"], ["image_embeds"], perm=[0, 2, 1])],
        "enc",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["batch", tokens, width])],
        [w, shape],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_onnx_width_must_match_gguf(tiny_bundle, tmp_path):
    from facellm_edge.bundle import file_entry, load_bundle

    b = _copy_bundle(Path(tiny_bundle), tmp_path / "b")
    manifest = json.loads((b / "manifest.json").read_text())
    width = manifest["arch"]["llm_hidden"]
    for prec, entry in manifest["vision"].items():
        p = b / entry["path"]
        p.unlink()
        _onnx_encoder(p, width // 2)
        manifest["vision"][prec] = {**entry, **{k: v for k, v in file_entry(b, p).__dict__.items()
                                                 if k in ("bytes", "sha256")}}
    (b / "manifest.json").write_text(json.dumps(manifest))
    load_bundle(b)  # the hashes are right: only the widths disagree
    with pytest.raises(BundleError, match=f"width {width // 2}.*n_embd is {width}"):
        FaceLLM.load(b, RuntimeConfig(llm_quant="f32"))


def test_encoder_batches_and_providers(tmp_path):
    import onnxruntime as ort

    from facellm_edge.runtime.encode import EncoderConfig, VisionEncoder, select_providers
    from facellm_edge.errors import RuntimeStageError

    path = tmp_path / "enc.onnx"
    _onnx_encoder(path, 32)
    enc = VisionEncoder(path, precision="fp32", config=EncoderConfig(device="cpu", n_threads=1),
                        num_image_tokens=256, width=32)
    assert enc.providers == ["CPUExecutionProvider"]
    x = np.random.default_rng(1).normal(size=(3, 3, 448, 448)).astype(np.float32)
    batch = enc.encode(x)
    assert batch.shape == (3, 256, 32)
    assert np.allclose(batch[1], enc.encode(x[1:2])[0], atol=1e-5)
    assert np.allclose(batch, enc.encode(x, one_call=True), atol=1e-5)  # CPU policy (face by face) == one call
    with pytest.raises(BundleError, match="width 32 but the LLM's n_embd is 64"):
        VisionEncoder(path, precision="fp32", config=EncoderConfig(), num_image_tokens=256, width=64)
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        with pytest.raises(RuntimeStageError, match="CUDAExecutionProvider.*pip"):
            select_providers("cuda", available)
    assert select_providers("auto", available)[-1] == "CPUExecutionProvider"
    with pytest.raises(UsageError, match="unknown device 'npu'"):
        select_providers("npu", available)


def test_runtime_never_imports_torch(tiny_bundle, yunet_model, tmp_path):
    import subprocess
    import sys

    import cv2
    from skimage import data

    photo = tmp_path / "a.png"
    cv2.imwrite(str(photo), data.astronaut()[:, :, ::-1])
    code = (
        "import sys\n"
        "import facellm_edge.runtime.pipeline\n"
        "from facellm_edge.cli import main\n"
        f"rc = main(['ask', {str(photo)!r}, 'Age?', '--bundle', {str(tiny_bundle)!r}, '--json', '--max-tokens', '2',"
        f" '--detector-model', {str(yunet_model)!r}])\n"
        "assert rc == 0, rc\n"
        "bad = [m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('OK')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-2000:]


def test_tensorrt_options_cache_engines_and_profile_the_batch(tmp_path, monkeypatch):
    """TensorRT gets an engine cache in the user cache and a 1..8-face profile at the bundle's tile size."""
    from facellm_edge.runtime.encode import TRT_MAX_BATCH, provider_options

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    onnx = tmp_path / "bundle" / "vision" / "int8.onnx"
    opts = provider_options(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], onnx, 448)
    (name, trt), cuda, cpu = opts
    assert name == "TensorrtExecutionProvider" and (cuda, cpu) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert Path(trt["trt_engine_cache_path"]).is_dir() and str(tmp_path) in trt["trt_engine_cache_path"]
    assert trt["trt_profile_max_shapes"] == f"pixel_values:{TRT_MAX_BATCH}x3x448x448"
    assert provider_options(["CPUExecutionProvider"], onnx, 448) == ["CPUExecutionProvider"]


# -- configuration checked before anything loads ----------------------------------------------------------------


def test_bad_device_or_system_fails_before_any_bundle_is_resolved(tmp_path, astronaut_bgr, yunet_model):
    """RuntimeConfig checks its device (and system message) when it is made: `ask` without --bundle would export
    the default checkpoint on first use, `--bundle DIR` would be resolved and loaded, `run` would open its source;
    a bad value stops all of that in one line (exit 2), nothing written to the cache."""
    import subprocess
    import sys

    import cv2

    from facellm_edge.runtime.encode import DEVICES

    with pytest.raises(UsageError, match="unknown device 'npu'; choose one of: auto, cpu, cuda, tensorrt"):
        RuntimeConfig(device="npu")
    with pytest.raises(UsageError, match="--system needs none, intern_vl or the text"):
        RuntimeConfig(system=" ")
    for device in DEVICES:
        assert RuntimeConfig(device=device).device == device
    photo = tmp_path / "a.png"
    cv2.imwrite(str(photo), astronaut_bgr)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    det = ["--detector-model", str(yunet_model)]
    cases = [
        (["ask", str(photo), "Age?", "--device", "npu", *det], "unknown device 'npu'"),  # no --bundle: no export
        (["ask", str(photo), "Age?", "--device", "npu", "--bundle", str(tmp_path / "missing"), *det],
         "unknown device 'npu'"),
        (["run", "--camera", "9", "-q", "Age?", "--no-display", "--device", "gpu", *det], "unknown device 'gpu'"),
        (["ask", str(photo), "Age?", "--system", "", *det], "--system needs none, intern_vl or the text"),
    ]
    for argv, message in cases:
        code = f"import sys\nfrom facellm_edge.cli import main\nsys.exit(main({argv!r}))\n"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                           cwd=tmp_path)
        err = r.stderr.strip()
        assert r.returncode == 2 and err.startswith("error: ") and message in err and "\n" not in err, (argv, err)
    assert not (tmp_path / "cache" / "facellm-edge" / "bundles").exists() and not (tmp_path / "hf").exists()
