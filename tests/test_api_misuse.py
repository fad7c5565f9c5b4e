"""Misusing the Python API: a question that is no text, a model used after close(). Each fails at once, before any
image work, with a one-line error that says what to do; close() frees the whole model, not only the LLM.

Everything runs for real: the tiny bundle, YuNet, ONNX Runtime, llama.cpp.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from facellm_edge.errors import UsageError
from facellm_edge.runtime.config import DetectorConfig, EncoderConfig, EngineConfig, GenerationConfig, RuntimeConfig
from facellm_edge.runtime.detect.yunet import YuNetDetector
from facellm_edge.runtime.encode import VisionEncoder
from facellm_edge.runtime.pipeline import FaceLLM

CLOSED = r"^this FaceLLM is closed; load the bundle again \(FaceLLM.load\)$"
ENCODER_CLOSED = r"^the vision encoder is closed \(its FaceLLM was closed\); load the bundle again$"


def _load(tiny_bundle, yunet_model) -> FaceLLM:
    cfg = RuntimeConfig(detector=DetectorConfig(model_path=yunet_model), encoder=EncoderConfig(precision="fp32"),
                        engine=EngineConfig(quant="f32"), generation=GenerationConfig(max_tokens=2))
    return FaceLLM.load(tiny_bundle, cfg)


@pytest.fixture
def image_work(monkeypatch) -> list[str]:
    """The image stages run from here on ("detect", "encode"), whichever model runs them."""
    calls: list[str] = []
    detect, encode = YuNetDetector.detect_checked, VisionEncoder.encode

    def counted_detect(self, image):
        calls.append("detect")
        return detect(self, image)

    def counted_encode(self, pixels, **kw):
        calls.append("encode")
        return encode(self, pixels, **kw)

    monkeypatch.setattr(YuNetDetector, "detect_checked", counted_detect)
    monkeypatch.setattr(VisionEncoder, "encode", counted_encode)
    return calls


@pytest.mark.slow  # tiny_bundle
def test_a_question_that_is_not_text_fails_before_any_image_work(tiny_bundle, yunet_model, astronaut_bgr,
                                                                 image_work):
    """Half a surrogate pair: before, a raw UnicodeEncodeError after detect, encode and the image prefill (whose
    session then leaked)."""
    with _load(tiny_bundle, yunet_model) as m:
        calls = {
            "ask": lambda q: m.ask(astronaut_bgr, q),
            "stream": lambda q: list(m.stream(astronaut_bgr, q)),
            "ask_crop": lambda q: m.ask_crop(astronaut_bgr, q),
            "ask_image": lambda q: m.ask_image(astronaut_bgr, q),
            "ask_images": lambda q: m.ask_images([astronaut_bgr], q),
        }
        for name, call in calls.items():
            with pytest.raises(UsageError, match=r"^the question is not valid text: it holds '\\ud800' at character "
                                                 r"1, half of a surrogate pair; send it as UTF-8$"):
                call("a\ud800b")
        assert image_work == [] and m.generator.n_cached == 0
        (session,) = m.open_faces(astronaut_bgr)
        with pytest.raises(UsageError, match="^the question is not valid text"):
            session.ask("\ud800")
        assert session.ask("Hi?").n_generated >= 1  # the session is still usable


@pytest.mark.slow  # tiny_bundle
def test_a_closed_model_says_so_before_any_image_work(tiny_bundle, yunet_model, astronaut_bgr, image_work):
    """After close(): a session's ``cached`` is False (it raised "this Generator is closed"), and the model's image
    calls fail at once naming the model (``ask`` detected and encoded first; ``detect`` kept working)."""
    m = _load(tiny_bundle, yunet_model)
    sessions = m.open_faces(astronaut_bgr)
    assert sessions and all(s.cached for s in sessions)
    m.close()
    assert [s.cached for s in sessions] == [False] * len(sessions)
    image_work.clear()
    calls = {
        "ask": lambda: m.ask(astronaut_bgr, "Hi?"),
        "stream": lambda: list(m.stream(astronaut_bgr, "Hi?")),
        "open_faces": lambda: m.open_faces(astronaut_bgr),
        "detect": lambda: m.detect(astronaut_bgr),
    }
    for name, call in calls.items():
        with pytest.raises(UsageError, match=CLOSED):
            call()
    assert image_work == []
    m.close()  # still idempotent
    for s in sessions:
        s.close()
        assert not s.cached


@pytest.mark.slow  # tiny_bundle
def test_close_frees_the_vision_encoder_and_the_detector(tiny_bundle, yunet_model, astronaut_bgr):
    """A closed model a program still references held its ONNX encoder (~19 MB at the tiny bundle, hundreds at
    FaceLLM-1B) and its detector until it was garbage collected."""
    m = _load(tiny_bundle, yunet_model)
    assert m.ask(astronaut_bgr, "Hi?")  # the detector is made on first use
    session, detector = weakref.ref(m.encoder._session), weakref.ref(m._detector)
    m.close()
    gc.collect()
    assert m.encoder._session is None and session() is None
    assert m._detector is None and detector() is None
    size = m.bundle.manifest.image.size
    with pytest.raises(UsageError, match=ENCODER_CLOSED):
        m.encoder.encode(np.zeros((1, 3, size, size), np.float32))
    for call in (lambda: m.ask_crop(astronaut_bgr, "Hi?"), lambda: m.ask_images([astronaut_bgr], "Hi?")):
        with pytest.raises(UsageError, match=ENCODER_CLOSED):
            call()
    m.encoder.close()  # idempotent


@pytest.mark.parametrize("kwargs, message", [
    ({"generation": {"max_tokens": 3}}, "generation must be a GenerationConfig"),
    ({"engine": None}, "engine must be a EngineConfig"),
    ({"max_pixels": 2.5}, "max_pixels must be a whole number"),
    ({"check_hashes": 1}, "check_hashes must be True or False"),
    ({"system": 3}, "system must be a string"),
])
def test_runtime_config_refuses_wrong_types_when_made(kwargs, message):
    """A dict where a stage config belongs failed at load or at ask time as an AttributeError naming no field."""
    from facellm_edge.errors import UsageError
    from facellm_edge.runtime.config import RuntimeConfig

    with pytest.raises(UsageError, match=message):
        RuntimeConfig(**kwargs)
