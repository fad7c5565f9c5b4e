# Length (~430 lines): 19 end-to-end tests share one module-scoped model; split, each part loads it again.
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
from facellm_edge.runtime.config import (DetectorConfig, EncoderConfig, EngineConfig, GenerationConfig,
                                         RuntimeConfig)
from facellm_edge.runtime.pipeline import FaceAnswer, FaceLLM
from facellm_edge.runtime.session import FaceSession, SessionError
from facellm_edge.timings import STAGES

QUESTION = "How old is this person?"


def _config(max_tokens: int = 3, **engine) -> RuntimeConfig:
    return RuntimeConfig(encoder=EncoderConfig(precision="fp32"), engine=EngineConfig(quant="f32", **engine),
                         generation=GenerationConfig(max_tokens=max_tokens))


@pytest.fixture(scope="module")
def model(tiny_bundle, yunet_model):
    cfg = RuntimeConfig(detector=DetectorConfig(model_path=yunet_model), encoder=EncoderConfig(precision="fp32"),
                        engine=EngineConfig(quant="f32"), generation=GenerationConfig(max_tokens=3))
    with FaceLLM.load(tiny_bundle, cfg) as m:
        yield m


@pytest.fixture
def count_image_prefills(monkeypatch):
    """Counts image prefills (calls that decode image embeddings into the KV cache) of a model's generator."""
    calls: list[int] = []

    def install(model: FaceLLM) -> list[int]:
        real = model.generator.prefill_many  # every image prefill (one face, several together, whole images)

        def counted(items, **kwargs):
            calls.extend(len(embeds) for _, embeds in items)  # images per conversation prefilled
            return real(items, **kwargs)

        monkeypatch.setattr(model.generator, "prefill_many", counted)
        return calls

    return install


@pytest.mark.slow  # tiny_bundle
def test_ask_answers_every_face(model, t1_bgr, tmp_path):
    answers = model.ask(t1_bgr, QUESTION)
    assert len(answers) == 6
    boxes = np.array([a.box for a in answers])
    detected = np.array([f.box for f in model.detect(t1_bgr)])
    assert np.allclose(boxes, detected, atol=1e-3)
    for a in answers:
        assert isinstance(a, FaceAnswer) and len(a.token_ids) >= 1 and a.stop_reason in ("eos", "length")
        assert set(a.timings) == set(STAGES) and all(v >= 0 for v in a.timings.values())
        assert isinstance(a.session, FaceSession) and a.session.index == a.index and a.session.turns == 1
        record = json.loads(json.dumps(a.to_dict()))
        assert record["session"] == a.session.id and list(record["timings_ms"]) == list(STAGES)
    assert list(tmp_path.iterdir()) == []  # nothing written unless asked


@pytest.mark.slow  # tiny_bundle
def test_stream_matches_ask(model, astronaut_bgr):
    answers = model.ask(astronaut_bgr, QUESTION)
    streamed: dict[int, str] = {}
    for i, piece in model.stream(astronaut_bgr, QUESTION):
        streamed[i] = streamed.get(i, "") + piece
    assert [streamed.get(i, "") for i in range(len(answers))] == [a.text for a in answers]


@pytest.mark.slow  # tiny_bundle
def test_chat_reuses_the_cached_face(model, astronaut_bgr, count_image_prefills):
    prefills = count_image_prefills(model)
    (face,) = model.ask(astronaut_bgr, QUESTION)
    follow = model.chat(face, "And the gender?")
    assert follow.session is face.session and len(follow.token_ids) >= 1 and face.session.turns == 2
    assert len(prefills) == 1 and "image_prefill" not in follow.timings  # the image was not prefilled again
    face.session.close()
    with pytest.raises(SessionError, match=f"session {face.session.id} is closed"):
        model.chat(face, "Anything else?")
    face.session.close()  # idempotent


@pytest.mark.slow  # tiny_bundle
def test_readme_example_chats_with_every_face_of_a_group_photo(tiny_bundle, t1_bgr, count_image_prefills):
    """The README's loop (ask, then a follow-up in each answer's session) on a 6-face photo with the default
    config: every face's conversation is still cached (the slots follow the context, not a fixed 4)."""
    with FaceLLM.load(tiny_bundle, RuntimeConfig(generation=GenerationConfig(max_tokens=3))) as m:
        prefills = count_image_prefills(m)
        answers = m.ask(t1_bgr, QUESTION)
        assert len(answers) == 6 and len(prefills) == 6
        for answer in answers:
            follow = answer.session.ask("And what is their expression?")
            assert len(follow.token_ids) >= 1 and answer.session.cached
        assert len(prefills) == 6  # no image prefilled twice


@pytest.mark.slow  # tiny_bundle
def test_session_past_the_slots_says_it_was_evicted_and_how_to_keep_more(tiny_bundle, t1_bgr):
    with FaceLLM.load(tiny_bundle, _config(max_tokens=2, max_slots=4)) as m:
        answers = m.ask(t1_bgr, QUESTION)
        assert m.chat(answers[5], "And?").session is answers[5].session  # the last 4 are kept
        assert [a.session.cached for a in answers] == [False, False, True, True, True, True]
        with pytest.raises(SessionError, match=r"evicted from the KV cache: .*\(max_slots=4, n_ctx=4096\); ask "
                                               r"about the image again, or raise the context"):
            m.chat(answers[0], "And?")
        assert answers[0].session.closed


@pytest.mark.slow  # tiny_bundle
def test_sessions_open_ask_stream_and_close(model, t1_bgr, count_image_prefills):
    """The session API the server hands out: open every face once, ask and stream in any order, close."""
    prefills = count_image_prefills(model)
    sessions = model.open_faces(t1_bgr)
    assert len(sessions) == 6 and len(prefills) == 6 and len({s.id for s in sessions}) == 6
    assert [s.index for s in sessions] == list(range(6)) and all(s.n_prefix > 256 for s in sessions)
    first = sessions[3].ask(QUESTION)
    again = sessions[3].ask(QUESTION)  # a follow-up in the same conversation continues it
    pieces = sessions[0].stream(QUESTION)
    text = "".join(pieces)
    assert len(first.token_ids) >= 1 and len(again.token_ids) >= 1 and len(prefills) == 6
    face = model.encode_faces(t1_bgr, model.detect(t1_bgr)[:1])[0]
    with model.open_face(face) as fresh:
        assert text == fresh.ask(QUESTION).text  # stream == ask, for the same face
    with sessions[1] as s:
        assert s.ask(QUESTION, max_tokens=1).n_generated <= 1
    assert sessions[1].closed and not sessions[1].cached
    with pytest.raises(SessionError, match="is closed"):
        sessions[1].ask(QUESTION)
    with pytest.raises(UsageError, match="the question is empty"):
        sessions[2].ask("  ")
    for s in sessions:
        s.close()


@pytest.mark.slow  # tiny_bundle
def test_sessions_from_two_threads(model, t1_bgr):
    """Sessions are handles: two threads asking in two sessions get the answers they get alone."""
    a, b = model.open_faces(t1_bgr)[:2]
    alone = {"a": a.ask(QUESTION).token_ids, "b": b.ask(QUESTION).token_ids}
    a2, b2 = model.open_faces(t1_bgr)[:2]
    got: dict[str, tuple] = {}
    errors: list[BaseException] = []

    def call(name, session):
        try:
            got[name] = session.ask(QUESTION).token_ids
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=("a", a2)), threading.Thread(target=call, args=("b", b2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and got == alone
    for s in (a, b, a2, b2):
        s.close()


@pytest.mark.slow  # tiny_bundle
def test_no_face_gives_empty_list(model):
    assert model.ask(np.full((480, 640, 3), 90, np.uint8), QUESTION) == []


@pytest.mark.slow  # tiny_bundle
def test_save_crops_only_when_asked(model, astronaut_bgr, tmp_path):
    import cv2

    out = tmp_path / "crops"
    model.ask(astronaut_bgr, QUESTION, max_tokens=1, save_crops=out)
    files = sorted(out.iterdir())
    assert len(files) == 1
    crop = cv2.imread(str(files[0]))
    assert crop.shape == (448, 448, 3)


@pytest.mark.slow  # tiny_bundle
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


@pytest.mark.slow  # tiny_bundle
def test_ask_image_tiles_the_whole_frame(model, t1_bgr):
    a = model.ask_image(t1_bgr, QUESTION, max_tokens=2)
    assert len(a.token_ids) >= 1 and {"preprocess", "encode", "image_prefill", "ttft"} <= set(a.timings)
    assert a.session.face is not None and a.session.n_prefix > 2 * 256  # several tiles: more than one image block


@pytest.mark.slow  # tiny_bundle
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


@pytest.mark.slow  # tiny_bundle
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


@pytest.mark.slow  # tiny_bundle
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
        FaceLLM.load(b, RuntimeConfig(engine=EngineConfig(quant="f32")))


def test_encoder_batches_and_providers(tmp_path):
    import onnxruntime as ort

    from facellm_edge.runtime.encode import EncoderConfig, VisionEncoder, check_session_providers, select_providers
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
    # ORT lists TensorRT whenever its provider library ships, then runs the session on CUDA when libnvinfer is
    # missing: what the session really runs on is checked, never a silent fallback
    check_session_providers("tensorrt", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    check_session_providers("auto", ["CPUExecutionProvider"])
    check_session_providers("cpu", enc.providers)
    with pytest.raises(RuntimeStageError, match="--device tensorrt: onnxruntime could not start its Tensorrt"):
        check_session_providers("tensorrt", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(RuntimeStageError, match="--device cuda: .* runs on CPUExecutionProvider"):
        check_session_providers("cuda", ["CPUExecutionProvider"])


@pytest.mark.slow  # tiny_bundle
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


@pytest.mark.slow  # four CLI processes
def test_bad_device_or_system_fails_before_any_bundle_is_resolved(tmp_path, astronaut_bgr, yunet_model):
    """RuntimeConfig checks its device (and system message) when it is made: `ask` without --bundle would export
    the default checkpoint on first use, `--bundle DIR` would be resolved and loaded, `run` would open its source;
    a bad value stops all of that in one line (exit 2), nothing written to the cache."""
    import subprocess
    import sys

    import cv2

    from facellm_edge.runtime.encode import DEVICES

    with pytest.raises(UsageError, match="unknown device 'npu'; choose one of: auto, cpu, cuda, tensorrt"):
        RuntimeConfig(encoder=EncoderConfig(device="npu"))
    with pytest.raises(UsageError, match="--system needs none, intern_vl or the text"):
        RuntimeConfig(system=" ")
    with pytest.raises(UsageError, match="unknown detector 'retina'"):
        DetectorConfig(name="retina")
    for device in DEVICES:
        assert RuntimeConfig(encoder=EncoderConfig(device=device)).encoder.device == device
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
