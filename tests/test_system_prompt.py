"""``--system none|intern_vl|TEXT``: export stores the default, ask/run/the API override it, train opens records with
it; the runtime's prompt tokens equal the processor's chat template tokens with that system message (none: no
system turn). Older bundles (no system-turn prompt, no separator, no crop_to_patches) still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from facellm_edge.bundle import load_bundle
from facellm_edge.cli import main
from facellm_edge.errors import BundleError, UsageError
from facellm_edge.runtime.config import EncoderConfig, EngineConfig, GenerationConfig, RuntimeConfig
from facellm_edge.runtime.pipeline import FaceLLM
from facellm_edge.llm.system_prompt import INTERN_VL, describe, resolve_system, system_messages

QUESTION = "How old is this person?"
N_NEW = 6


def test_intern_vl_is_llama_factorys_default_system_text():
    # LLaMA-Factory's `intern_vl` template, default_system (hiyouga/LLaMA-Factory src/llamafactory/data/template.py)
    assert INTERN_VL == ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                         "多模态大语言模型。")
    assert resolve_system("none") is None and resolve_system("intern_vl") == INTERN_VL
    assert resolve_system("Be brief.") == "Be brief." and describe(INTERN_VL) == "intern_vl"
    for bad in ("", "  "):
        with pytest.raises(UsageError, match="--system needs none, intern_vl or the text"):
            resolve_system(bad)


@pytest.fixture(scope="module")
def intern_vl_bundle(tmp_path_factory, tiny_checkpoint_varied) -> Path:
    """The tiny varied checkpoint exported with --system intern_vl (f32 GGUF, fp32 ONNX, no verification)."""
    out = tmp_path_factory.mktemp("sys") / "bundle"
    rc = main(["export", str(tiny_checkpoint_varied), "--out", str(out), "--quant", "f32", "--vision", "fp32",
               "--no-verify", "--system", "intern_vl"])
    assert rc == 0
    return out


def _reference(hf, image_bgr, system: str | None, eos: set[int]):
    """The processor's input_ids for one image + QUESTION after ``system`` (None: no system message) and
    transformers' greedy tokens."""
    import torch

    processor, net = hf
    messages = system_messages(system) + [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=[np.ascontiguousarray(image_bgr[..., ::-1])], return_tensors="pt")
    with torch.no_grad():
        out = net.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return inputs["input_ids"][0].tolist(), new[: next((i for i, t in enumerate(new) if t in eos), len(new))]


def _ours(bundle: Path, image_bgr, system: str | None):
    cfg = RuntimeConfig(encoder=EncoderConfig(precision="fp32"),
                                       engine=EngineConfig(quant="f32", n_threads=1),
                        generation=GenerationConfig(max_tokens=N_NEW), system=system)
    with FaceLLM.load(bundle, cfg) as m:
        ans = m.ask_images([image_bgr], QUESTION)
        rows = [t * m.bundle.manifest.tokens.num_image_tokens for t in ans.tiles]
        return m.generator.prompt_tokens(rows, QUESTION), ans


@pytest.mark.slow  # exports
def test_export_stores_the_chosen_default(intern_vl_bundle, tiny_bundle):
    p = load_bundle(intern_vl_bundle).manifest.prompt
    assert p.system == INTERN_VL and p.first_system.count(p.system_marker) == 1
    assert INTERN_VL not in p.first  # `first` stays the prompt without a system turn
    default = load_bundle(tiny_bundle).manifest.prompt  # exported with the default: none
    assert default.system is None and default.first_system == p.first_system and default.image_separator == "\n"


@pytest.mark.parametrize("system", [None, "none", "intern_vl", "Describe faces briefly."])
@pytest.mark.slow  # exports
def test_runtime_prompt_equals_the_processors_chat_template(intern_vl_bundle, tiny_varied_hf, astronaut_bgr,
                                                            system):
    """None keeps the bundle's own (intern_vl here); the others override it. Prompt ids and greedy tokens equal
    transformers' with the same system message."""
    text = INTERN_VL if system is None else resolve_system(system)
    eos = set(load_bundle(intern_vl_bundle).manifest.tokens.eos_ids)
    ids, tokens = _reference(tiny_varied_hf, astronaut_bgr, text, eos)
    ours, ans = _ours(intern_vl_bundle, astronaut_bgr, system)
    assert ours == ids and ans.n_prompt == len(ids)
    assert list(ans.token_ids) == tokens


@pytest.mark.slow  # tiny_bundle
def test_override_on_a_bundle_exported_without_one(tiny_bundle, tiny_varied_hf, astronaut_bgr):
    eos = set(load_bundle(tiny_bundle).manifest.tokens.eos_ids)
    for system in ("intern_vl", None):
        ids, _ = _reference(tiny_varied_hf, astronaut_bgr, resolve_system(system) if system else None, eos)
        assert _ours(tiny_bundle, astronaut_bgr, system)[0] == ids
    plain, _ = _reference(tiny_varied_hf, astronaut_bgr, None, eos)
    assert len(_reference(tiny_varied_hf, astronaut_bgr, INTERN_VL, eos)[0]) > len(plain)  # the system turn is there


@pytest.mark.slow  # tiny_bundle
def test_older_bundles_load_with_backward_compatible_defaults(tiny_bundle, astronaut_bgr, tmp_path):
    """A manifest written before these fields: no system turn (override refused in one line), "\n" between images,
    tiling on (what transformers' InternVLProcessor did for every checkpoint)."""
    b = tmp_path / "old"
    shutil.copytree(tiny_bundle, b, copy_function=shutil.copy)
    manifest = json.loads((b / "manifest.json").read_text())
    for key in ("image_separator", "first_system", "system", "system_marker"):
        del manifest["prompt"][key]
    del manifest["image"]["crop_to_patches"]
    (b / "manifest.json").write_text(json.dumps(manifest))
    m = load_bundle(b).manifest
    assert m.prompt.image_separator == "\n" and m.prompt.first_system is None and m.image.crop_to_patches is True
    with FaceLLM.load(b, RuntimeConfig(encoder=EncoderConfig(precision="fp32"),
                                       engine=EngineConfig(quant="f32", n_threads=1),
                                       generation=GenerationConfig(max_tokens=2))) as old:
        assert len(old.ask_images([astronaut_bgr, astronaut_bgr], QUESTION).token_ids) >= 1
    with pytest.raises(BundleError, match="exported before --system existed.*re-export"):
        FaceLLM.load(b, RuntimeConfig(engine=EngineConfig(quant="f32"), system="intern_vl"))
    with FaceLLM.load(b, RuntimeConfig(encoder=EncoderConfig(precision="fp32"),
                                       engine=EngineConfig(quant="f32", n_threads=1),
                                       system="none")):
        pass  # asking for no system message is what an old bundle does anyway


def test_export_refuses_an_empty_system_before_any_work(tiny_checkpoint, tmp_path, capsys):
    rc = main(["export", str(tiny_checkpoint), "--out", str(tmp_path / "b"), "--system", " ", "--no-verify"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "--system needs" in err and "\n" not in err
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []


# -- train ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def records(tmp_path_factory, astronaut_bgr) -> tuple[Path, Path]:
    """Two records on a real face crop: one without a system message, one with its own (a `system` column)."""
    import cv2

    root = tmp_path_factory.mktemp("sysdata")
    (root / "images").mkdir()
    assert cv2.imwrite(str(root / "images" / "a.jpg"), astronaut_bgr[40:300, 120:380])
    turns = [{"from": "human", "value": "<image>\nHow old is this person?"}, {"from": "gpt", "value": "About 40."}]
    rows = [{"image": "a.jpg", "conversations": turns},
            {"image": "a.jpg", "conversations": turns, "system": "You are a record's own system message."}]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return data, root / "images"


def test_train_encoder_opens_records_with_the_system_message(records, tiny_checkpoint):
    from PIL import Image

    from facellm_edge.export.checkpoint import load_processor
    from facellm_edge.train.collate import Encoder
    from facellm_edge.train.data import load_samples

    processor = load_processor(tiny_checkpoint)
    plain, own = load_samples(*records, skip_bad=False)

    def expected(messages):
        text = processor.apply_chat_template(messages, tokenize=False)
        with Image.open(plain.image) as im:
            return processor(text=[text], images=[im.convert("RGB")], crop_to_patches=False)["input_ids"][0]

    with_system = Encoder(processor, 2048, system=INTERN_VL)
    assert with_system(plain).input_ids == expected(system_messages(INTERN_VL) + plain.messages())
    assert with_system(own).input_ids == expected(own.messages())  # a record's own system message wins
    assert own.messages()[0]["role"] == "system"
    assert Encoder(processor, 2048)(plain).input_ids == expected(plain.messages())  # none: no system turn
    # the answer mask is unchanged by the system turn: only the answer and its end-of-turn are labelled
    enc = with_system(plain)
    assert [i for i, lab in zip(enc.input_ids, enc.labels) if lab != -100] == \
        processor.tokenizer.encode("About 40.", add_special_tokens=False) + [processor.tokenizer.eos_token_id]
    with pytest.raises(UsageError, match="control tokens"):
        Encoder(processor, 2048, system="hi <|im_end|>")


def test_train_config_and_cli_take_system(records, tmp_path, capsys):
    from facellm_edge.train.config import TrainConfig

    data, images = records
    cfg = TrainConfig(base="b", data=data, images=images, out=tmp_path / "o", system="intern_vl")
    assert TrainConfig.from_json(cfg.to_json()).system == "intern_vl"
    assert TrainConfig(base="b", data=data, images=images, out=tmp_path / "o").system == "none"
    with pytest.raises(UsageError, match="--system needs"):
        TrainConfig(base="b", data=data, images=images, out=tmp_path / "o", system="")
    rc = main(["train", "--base", "b", "--data", str(data), "--images", str(images), "--out", str(tmp_path / "o"),
               "--system", ""])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--system needs" in err and not (tmp_path / "o").exists()
