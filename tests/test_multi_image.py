"""Several whole images in one question through the bundle runtime (``FaceLLM.ask_images``), against transformers.

The tiny varied checkpoint and the bundle exported from it: the same images and question give the processor's
``input_ids`` token for token (one ``<img>…</img>`` block per image, tiled as the processor tiles it) and the same
greedy tokens as ``InternVLForConditionalGeneration.generate``. Real ONNX Runtime, real llama.cpp, real transformers.
"""

from __future__ import annotations

import numpy as np
import pytest

from facellm_edge.errors import BundleError, UsageError
from facellm_edge.runtime.config import EncoderConfig, EngineConfig, GenerationConfig, RuntimeConfig
from facellm_edge.runtime.pipeline import FaceLLM, ImagesAnswer
from facellm_edge.runtime.session import SessionError

# A FaceXBench-style question (the eval builds these): images first, then question, instruction and options.
QUESTION = ("Are the people in these images the same person?\nAnswer with the option's letter from the given choices "
            "directly.\n(A) Yes, all of them\n(B) No\n(C) Cannot determine\n(D) Only the first two\n")
N_NEW = 8

pytestmark = pytest.mark.slow  # every test runs the tiny bundle


@pytest.fixture(scope="module")
def model(tiny_bundle):
    cfg = RuntimeConfig(encoder=EncoderConfig(precision="fp32", n_threads=2),
                        engine=EngineConfig(quant="f32", n_ctx=4096, n_threads=1, n_threads_batch=2),
                        generation=GenerationConfig(max_tokens=N_NEW))
    with FaceLLM.load(tiny_bundle, cfg) as m:
        yield m


@pytest.fixture(scope="module")
def three_photos(astronaut_bgr, t1_bgr) -> list[np.ndarray]:
    """Three real photos of different shapes: 512x512 (1 tile), 420x886 (1x2 tiles + thumbnail), 1024x1024 (3x3
    tiles + thumbnail). Only the last is resized here (to make a large input)."""
    import cv2

    return [astronaut_bgr, np.ascontiguousarray(t1_bgr[:, 300:720]),
            cv2.resize(t1_bgr, (1024, 1024), interpolation=cv2.INTER_AREA)]


def _transformers(hf, images_bgr, question, eos, system=None):
    import torch

    from facellm_edge.llm.system_prompt import system_messages

    processor, net = hf
    content = [{"type": "image"}] * len(images_bgr) + [{"type": "text", "text": question}]
    text = processor.apply_chat_template(system_messages(system) + [{"role": "user", "content": content}],
                                         add_generation_prompt=True)
    inputs = processor(text=text, images=[np.ascontiguousarray(im[..., ::-1]) for im in images_bgr],
                       return_tensors="pt")
    with torch.no_grad():
        out = net.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
    tokens = []
    for t in out[0, inputs["input_ids"].shape[1]:].tolist():
        if t in eos:
            break
        tokens.append(t)
    return inputs, tokens


@pytest.mark.parametrize("n_images", [2, 3])
def test_greedy_tokens_and_prompt_equal_transformers(model, tiny_varied_hf, three_photos, n_images):
    images = three_photos[:n_images]
    ours = model.ask_images(images, QUESTION)
    assert isinstance(ours, ImagesAnswer)
    inputs, hf_tokens = _transformers(tiny_varied_hf, images, QUESTION, set(model.bundle.manifest.tokens.eos_ids))
    ids = inputs["input_ids"][0].tolist()
    assert ours.tiles == (1, 3, 10)[:n_images]  # each image tiled as the processor tiles it ...
    assert sum(ours.tiles) == inputs["pixel_values"].shape[0]
    per_tile = model.bundle.manifest.tokens.num_image_tokens
    # ... and the prompt is the processor's input_ids, token for token (image rows shown as <IMG_CONTEXT>)
    assert model.generator.prompt_tokens([t * per_tile for t in ours.tiles], QUESTION) == ids
    assert ours.n_prompt == len(ids)
    assert list(ours.token_ids) == hf_tokens and len(hf_tokens) > 0
    assert set(ours.timings) == {"preprocess", "encode", "image_prefill", "question_prefill", "ttft", "decode"}


def test_image_order_matters_and_follow_up_reuses_the_prefix(model, three_photos, monkeypatch):
    a = model.ask_images(three_photos[:2], QUESTION)
    b = model.ask_images(three_photos[:2][::-1], QUESTION)
    assert (a.tiles, b.tiles) == ((1, 3), (3, 1)) and a.n_prompt == b.n_prompt
    prefills = []
    real = model.generator.prefill_images
    monkeypatch.setattr(model.generator, "prefill_images", lambda *args: prefills.append(args) or real(*args))
    follow = model.chat(b, "Why?", max_tokens=3)
    assert follow.session is b.session and len(follow.token_ids) >= 1 and follow.tiles == b.tiles
    assert prefills == [] and b.session.turns == 2  # the images were not prefilled again
    b.session.close()
    with pytest.raises(SessionError, match="is closed"):
        model.chat(b, "And?")
    a.session.close()


def test_one_image_equals_ask_image(model, three_photos):
    """ask_images with one image is ask_image (whole image, the processor's tiling)."""
    one = model.ask_images(three_photos[1:2], QUESTION)
    whole = model.ask_image(three_photos[1], QUESTION)
    assert one.token_ids == whole.token_ids and one.tiles == (3,)


def test_bad_calls(model, three_photos, tiny_bundle):
    with pytest.raises(UsageError, match="non-empty list"):
        model.ask_images([], QUESTION)
    with pytest.raises(UsageError, match="non-empty list"):
        model.ask_images(three_photos[0], QUESTION)  # one array is not a list
    with pytest.raises(UsageError, match="empty"):
        model.ask_images(three_photos[:1], "  ")
    with FaceLLM.load(tiny_bundle, RuntimeConfig(encoder=EncoderConfig(precision="fp32"),
                                                 engine=EngineConfig(quant="f32", n_ctx=1024, n_threads=1))) as small:
        with pytest.raises(Exception, match=r"needs \d+ tokens but the context holds 1024; .*--ctx"):
            small.ask_images(three_photos, QUESTION)


def test_template_without_a_separator_answers_one_image(tiny_bundle, three_photos, tmp_path):
    """A bundle whose chat template cannot show several images (prompt.image_separator null) still answers one
    image and refuses several in one line."""
    import json
    import shutil

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b, copy_function=shutil.copy)
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["prompt"]["image_separator"] = None
    (b / "manifest.json").write_text(json.dumps(manifest))
    with FaceLLM.load(b, RuntimeConfig(encoder=EncoderConfig(precision="fp32"),
                                       engine=EngineConfig(quant="f32", n_threads=1),
                                       generation=GenerationConfig(max_tokens=2))) as m:
        assert len(m.ask_images(three_photos[:1], QUESTION).token_ids) >= 1
        with pytest.raises(BundleError, match="several images"):
            m.ask_images(three_photos[:2], QUESTION)
