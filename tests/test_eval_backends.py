"""The eval's two backends on the same questions: several images per question on both, the same tiling, the same
system message, images read through ``io.read_image`` (the decoded-size bound of ask/run), the cap reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facellm_edge.errors import InputError
from facellm_edge.eval.backends import BundleBackend, BundleConfig, TransformersBackend, TransformersConfig
from facellm_edge.eval.mcq import MCQAnswer, MCQItem
from facellm_edge.llm.system_prompt import INTERN_VL, system_messages

N_NEW = 6


@pytest.fixture(scope="module")
def items(tmp_path_factory, astronaut_bgr, t1_bgr) -> list[MCQItem]:
    """A 2-image question (512x512: 1 tile; 420x886: 1x2 tiles + thumbnail) and a 1-image one (1280x886: 3x2 + 1)."""
    import cv2

    d = tmp_path_factory.mktemp("evalimg")
    files = {"a.png": astronaut_bgr, "b.jpg": np.ascontiguousarray(t1_bgr[:, 300:720]), "c.jpg": t1_bgr}
    for name, img in files.items():
        assert cv2.imwrite(str(d / name), img)
    opts = (("A", "Yes"), ("B", "No"), ("C", "Cannot determine"), ("D", "Only one of them"))
    return [MCQItem(id="pair", question="Is this the same person in both images?", options=opts, answer="B",
                    images=(d / "a.png", d / "b.jpg"), category="face_recognition", task="pairs"),
            MCQItem(id="group", question="How many faces are there?", options=opts, answer="C",
                    images=(d / "c.jpg",), category="crowd", task="counting")]


@pytest.fixture(scope="module")
def backends(tiny_bundle, tiny_checkpoint_varied):
    hf = TransformersBackend(TransformersConfig(model=str(tiny_checkpoint_varied), max_new_tokens=N_NEW))
    edge = BundleBackend(BundleConfig(bundle=tiny_bundle, max_new_tokens=N_NEW, llm_quant="f32",
                                      vision_precision="fp32"))
    yield hf, edge
    edge.close()


@pytest.mark.slow  # tiny_bundle
def test_both_backends_answer_several_images_alike(backends, items):
    hf, edge = backends
    assert hf.max_images is None and edge.max_images is None
    assert hf.system == edge.system == "none"
    for item in items:
        a, b = hf.answer(item), edge.answer(item)
        assert isinstance(a, MCQAnswer) and isinstance(b, MCQAnswer)
        assert b.text == a.text and b.truncated == a.truncated, item.id  # greedy: the same answer
        assert isinstance(a.truncated, bool)


@pytest.mark.slow  # tiny_bundle
def test_the_edge_context_fits_the_models_own(backends, tiny_bundle):
    from facellm_edge.bundle import load_bundle

    _, edge = backends
    assert edge._llm.config.engine.n_ctx == load_bundle(tiny_bundle).manifest.arch.context_length
    assert edge._llm.config.engine.max_slots == edge._llm.generator.max_slots == 1


@pytest.mark.slow  # tiny_bundle
def test_cap_is_reported(backends, items, tiny_bundle, tiny_checkpoint_varied):
    """An answer cut by --max-new-tokens says so on both backends (the cut text is the start of the longer one)."""
    hf, edge = backends
    full = [hf.answer(items[1]), edge.answer(items[1])]
    assert [a.truncated for a in full] == [True, True]  # this random model talks past N_NEW tokens here
    short = [TransformersBackend(TransformersConfig(model=str(tiny_checkpoint_varied), max_new_tokens=1)),
             BundleBackend(BundleConfig(bundle=tiny_bundle, max_new_tokens=1, llm_quant="f32",
                                        vision_precision="fp32"))]
    for backend, longer in zip(short, full):
        ans = backend.answer(items[1])
        backend.close()
        assert ans.truncated is True and longer.text.startswith(ans.text) and ans.text


def test_system_message_reaches_the_transformers_prompt(tiny_checkpoint, items):
    plain = TransformersBackend(TransformersConfig(model=str(tiny_checkpoint), max_new_tokens=2))
    sys_ = TransformersBackend(TransformersConfig(model=str(tiny_checkpoint), max_new_tokens=2, system="intern_vl"))
    assert sys_.system == "intern_vl"
    ids = sys_.encode(items[0])["input_ids"][0].tolist()
    processor = sys_._processor
    content = [{"type": "image"}] * 2 + [{"type": "text", "text": items[0].prompt()}]
    text = processor.apply_chat_template(system_messages(INTERN_VL) + [{"role": "user", "content": content}],
                                         add_generation_prompt=True)
    assert INTERN_VL in text
    expected = processor(text=text, images=[_rgb(p) for p in items[0].images], return_tensors="pt")["input_ids"]
    assert ids == expected[0].tolist()
    assert len(ids) > len(plain.encode(items[0])["input_ids"][0])


@pytest.mark.slow  # tiny_bundle
def test_images_are_read_with_the_decoded_size_bound(tiny_checkpoint, tiny_bundle, items):
    """Both backends read images through io.read_image: a file above --max-pixels is refused from its header."""
    for backend in (TransformersBackend(TransformersConfig(model=str(tiny_checkpoint), max_pixels=1000)),
                    BundleBackend(BundleConfig(bundle=tiny_bundle, llm_quant="f32", max_pixels=1000))):
        with pytest.raises(InputError, match=r"above the .* limit; downscale it or raise --max-pixels"):
            backend.answer(items[0])
        backend.close()


def _rgb(path: Path):
    from PIL import Image

    from facellm_edge.io import read_image

    return Image.fromarray(read_image(path)[:, :, ::-1].copy())


@pytest.mark.slow  # tiny_bundle
def test_a_bundle_whose_template_shows_one_image_says_so(tiny_bundle, items, tmp_path):
    """prompt.image_separator null (a template that cannot render several images in one turn): the backend's
    max_images is 1, so check_supported refuses such questions up front, naming one."""
    import json
    import shutil

    from facellm_edge.errors import UsageError
    from facellm_edge.eval.backends import check_supported

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b, copy_function=shutil.copy)
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["prompt"]["image_separator"] = None
    (b / "manifest.json").write_text(json.dumps(manifest))
    backend = BundleBackend(BundleConfig(bundle=b, llm_quant="f32"))
    try:
        assert backend.max_images == 1 and BundleBackend.max_images is None
        with pytest.raises(UsageError, match=r"1 of 2 questions have more than 1 image\(s\) \(e\.g\. pair, 2 images\)"):
            check_supported(items, backend.name, backend.max_images)
        check_supported(items[1:], backend.name, backend.max_images)
    finally:
        backend.close()
