"""ShareGPT validation and loss masking (tiny InternVL processor, real face crops)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facellm_edge.errors import InputError


def _write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_valid_jsonl_and_json_list(face_dataset, tmp_path):
    from facellm_edge.train.data import load_samples

    data, images, records = face_dataset
    samples = load_samples(data, images, skip_bad=False)
    assert len(samples) == len(records) >= 3
    assert samples[0].where == "line 1"
    msgs = samples[0].messages()
    assert msgs[0]["content"][0] == {"type": "image"}
    assert msgs[0]["content"][1]["text"] == records[0]["conversations"][0]["value"].removeprefix("<image>\n")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    as_list = tmp_path / "dataset.json"
    as_list.write_text(json.dumps(records), encoding="utf-8")
    listed = load_samples(as_list, images, skip_bad=False)
    assert [s.where for s in listed[:2]] == ["index 0", "index 1"]
    assert [s.turns for s in listed] == [s.turns for s in samples]


BAD = {
    "missing image": lambda r: {**r, "image": "faces/nope.jpg"},
    "empty turn 1": lambda r: {**r, "conversations": [r["conversations"][0], {"from": "gpt", "value": "  "}]},
    "no <image>": lambda r: {**r, "conversations": [{"from": "human", "value": "Who?"}, r["conversations"][1]]},
    "bad role 'robot'": lambda r: {**r, "conversations": [r["conversations"][0], {"from": "robot", "value": "x"}]},
    "reserved token <|im_end|>": lambda r: {**r, "conversations": [r["conversations"][0],
                                                                   {"from": "gpt", "value": "a<|im_end|>b"}]},
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_bad_record_kind_is_reported_with_count(face_dataset, tmp_path, kind):
    from facellm_edge.train.data import load_samples

    _, images, records = face_dataset
    bad = [BAD[kind](records[0]), BAD[kind](records[1])]
    data = _write(tmp_path / "d.jsonl", [*bad, *records[2:]])
    reserved = ("<|im_end|>", "<IMG_CONTEXT>")
    with pytest.raises(InputError) as e:
        load_samples(data, images, skip_bad=False, reserved=reserved)
    msg = str(e.value)
    assert f"2 bad record(s) of {len(records)}" in msg
    assert "line 1:" in msg and "line 2:" in msg and kind in msg and "--skip-bad" in msg
    assert "\n" not in msg
    kept = load_samples(data, images, skip_bad=True, reserved=reserved)
    assert [s.where for s in kept] == [f"line {i}" for i in range(3, len(records) + 1)]


def test_many_bad_records_show_the_first_few(face_dataset, tmp_path):
    from facellm_edge.train.data import load_samples

    _, images, records = face_dataset
    lines = ["{not json"] + [json.dumps({**records[0], "image": f"faces/missing{i}.jpg"}) for i in range(8)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"9 bad record\(s\) of 9 .*line 1: invalid JSON.*and 4 more"):
        load_samples(data, images, skip_bad=False)
    with pytest.raises(InputError, match="no usable records"):
        load_samples(data, images, skip_bad=True)


def test_missing_data_and_images(face_dataset, tmp_path):
    from facellm_edge.train.data import load_samples

    data, images, _ = face_dataset
    with pytest.raises(InputError, match="--data"):
        load_samples(tmp_path / "none.jsonl", images, skip_bad=False)
    with pytest.raises(InputError, match="--images"):
        load_samples(data, tmp_path / "no_images", skip_bad=False)


def test_labels_cover_exactly_the_answers_and_their_end_of_turn(face_dataset, tiny_checkpoint):
    from transformers import AutoProcessor

    from facellm_edge.train.collate import IGNORE_INDEX, Encoder, collate
    from facellm_edge.train.data import load_samples

    data, images, records = face_dataset
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    tok = processor.tokenizer
    encoder = Encoder(processor, max_length=2048)
    sample = load_samples(data, images, skip_bad=False)[0]
    enc = encoder(sample)
    ids, labels = enc.input_ids, enc.labels
    # the prompt is the model's own chat template with the processor's image expansion
    expected_text = processor.apply_chat_template(sample.messages(), tokenize=False)
    assert ids == processor(text=[expected_text], images=[_rgb(sample.image)], crop_to_patches=False)["input_ids"][0]
    image_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert ids.count(image_id) == processor.image_seq_length  # one 448 tile for a face crop
    assert tuple(enc.pixel_values.shape[:2]) == (1, 3)
    # labelled tokens, run by run, are the tokenizer's own encoding of each answer + <|im_end|>
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(lab)
        elif cur:
            runs.append(cur)
            cur = []
    answers = [c["value"] for c in records[0]["conversations"] if c["from"] == "gpt"]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert runs == [tok.encode(a, add_special_tokens=False) + [eot] for a in answers]
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i == image_id)
    batch = collate([enc, encoder(load_samples(data, images, skip_bad=False)[1])], tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape[0] == 2


def test_truncation_keeps_the_image_and_refuses_to_cut_it(face_dataset, tiny_checkpoint):
    from transformers import AutoProcessor

    from facellm_edge.errors import UsageError
    from facellm_edge.train.collate import Encoder
    from facellm_edge.train.data import load_samples

    data, images, _ = face_dataset
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    sample = load_samples(data, images, skip_bad=False)[0]
    full = Encoder(processor, 2048)(sample)
    cut = Encoder(processor, len(full.input_ids) - 3)(sample)
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
    with pytest.raises(UsageError, match="--max-length"):
        Encoder(processor, 100)(sample)


def test_encoder_sees_a_sideways_stored_photo_upright_as_the_runtime_does(face_dataset, tiny_checkpoint, tmp_path):
    """A phone photo stored sideways with an EXIF orientation tag is trained on upright, as the edge runtime reads
    it (Pillow's Image.open alone ignores the tag); unreadable images name the record."""
    import dataclasses
    import re

    from PIL import Image, ImageOps
    from transformers import AutoProcessor

    from facellm_edge.train.collate import Encoder
    from facellm_edge.train.data import load_samples

    data, images, _ = face_dataset
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    sample = load_samples(data, images, skip_bad=False)[0]
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    sideways = tmp_path / "sideways.jpg"
    _rgb(sample.image).transpose(Image.Transpose.ROTATE_90).save(sideways, exif=exif.tobytes(), quality=95)
    got = Encoder(processor, 2048)(dataclasses.replace(sample, image=sideways)).pixel_values

    def pixels(image):
        return processor.image_processor(images=[image], crop_to_patches=False, return_tensors="pt")["pixel_values"]

    with Image.open(sideways) as im:
        shown, stored = pixels(ImageOps.exif_transpose(im).convert("RGB")), pixels(im.convert("RGB"))
    assert (got - shown).abs().mean() < 0.02 < 0.2 < (got - stored).abs().mean()

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match=rf"^cannot decode image {re.escape(str(broken))} .*\({sample.where}\)$"):
        Encoder(processor, 2048)(dataclasses.replace(sample, image=broken))


def _rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def test_cli_options_map_one_to_one_onto_train_config():
    import dataclasses
    import inspect

    from facellm_edge.commands.train import train_command
    from facellm_edge.train.config import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    params = inspect.signature(train_command).parameters
    assert set(params) == set(fields)
    for name, p in params.items():
        option = p.default
        flag = "--" + name.replace("_", "-")
        assert flag in option.param_decls, name
        if fields[name].default is not dataclasses.MISSING:
            assert option.default == fields[name].default, name  # the dataclass is the one source of defaults
    d = TrainConfig(base="b", data="d", images="i", out="o")
    assert (d.lora_rank, d.lora_alpha, d.lora_dropout, d.learning_rate, d.lr_scheduler, d.epochs, d.max_length,
            d.max_grad_norm) == (16, 32, 0.0, 1e-5, "cosine", 1, 2048, 1.0)  # FaceLLM's recipe
    assert TrainConfig.from_json(d.to_json()) == d


def test_lora_targets_the_llm_by_path_and_vision_or_projector_only_when_asked(tiny_checkpoint):
    from transformers import InternVLForConditionalGeneration

    from facellm_edge.train.config import TrainConfig
    from facellm_edge.train.model import wrap_lora

    def trainable(**kw) -> set[str]:
        model = InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint)
        cfg = TrainConfig(base=str(tiny_checkpoint), data="d", images="i", out="o", **kw)
        return {n for n, p in wrap_lora(model, cfg).named_parameters() if p.requires_grad}

    config = InternVLForConditionalGeneration.config_class.from_pretrained(tiny_checkpoint)
    layers = config.text_config.num_hidden_layers
    default = trainable()
    assert all(".language_model.layers." in n and ("lora_A" in n or "lora_B" in n) for n in default)
    assert len(default) == layers * 7 * 2  # q k v o gate up down, A and B
    wider = trainable(lora_vision=True, train_projector=True)
    extra = wider - default
    assert any(".vision_tower.encoder.layer." in n and "lora_" in n for n in extra)
    assert any("multi_modal_projector.modules_to_save" in n for n in extra)
    assert not any("embeddings" in n or "lm_head" in n for n in wider)


@pytest.mark.parametrize("wide", [False, True])
def test_save_adapter_writes_exactly_what_peft_writes(tiny_checkpoint, tmp_path, wide):
    """The adapter writer (needed because PEFT cannot select FSDP-wrapped names) matches PeftModel.save_pretrained."""
    import torch
    from safetensors.torch import load_file
    from transformers import InternVLForConditionalGeneration

    from facellm_edge.train.config import TrainConfig
    from facellm_edge.train.model import save_adapter, wrap_lora

    cfg = TrainConfig(base=str(tiny_checkpoint), data="d", images="i", out="o", lora_vision=wide, train_projector=wide)
    model = wrap_lora(InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint), cfg)
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_()
    (tmp_path / "peft").mkdir()
    (tmp_path / "ours").mkdir()
    model.save_pretrained(tmp_path / "peft")
    save_adapter(model, model.state_dict(), tmp_path / "ours")
    want = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "ours" / "adapter_config.json").read_text())


def _png_header(path: Path, w: int, h: int) -> Path:
    """A PNG whose header says w x h (the pixel data is cut short: only the header is read up front)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


def test_images_that_cannot_be_read_are_bad_records_found_up_front(face_dataset, tmp_path, monkeypatch):
    """A file that is no image (or an empty one, or one above the size training decodes) is a bad record when the
    records are read, before the model loads, not an error steps into training: listed with the others without
    --skip-bad, dropped with it. Only headers are read (88k images for FairFaceGPT): no pixel is decoded."""
    import shutil

    import cv2

    from facellm_edge.train.data import load_samples

    _, images, records = face_dataset
    mine = tmp_path / "images"
    shutil.copytree(images, mine)  # the fixture's folder is shared: the bad files go into a copy
    (mine / "text.jpg").write_text("notanimage\n", encoding="utf-8")
    (mine / "empty.jpg").write_bytes(b"")
    _png_header(mine / "wide.png", 9000, 5000)  # 45 MP: above the 40 MP training reads, below Pillow's own cap
    _png_header(mine / "bomb.png", 20000, 20000)  # 400 MP: Pillow itself refuses the header
    bad = ["text.jpg", "empty.jpg", "wide.png", "bomb.png"]
    data = _write(tmp_path / "d.jsonl", [*({**records[0], "image": b} for b in bad), *records])
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("an image was decoded, not only its header read"))
    with pytest.raises(InputError) as e:
        load_samples(data, mine, skip_bad=False)
    msg = str(e.value)
    assert f"4 bad record(s) of {len(records) + 4}" in msg and "\n" not in msg and "--skip-bad" in msg
    assert "line 1: cannot decode image text.jpg (empty, damaged or not an image file)" in msg
    assert "line 2: cannot decode image empty.jpg" in msg
    assert "line 3: image wide.png is 9000x5000 (45 MP), above the 40 MP limit; downscale it (training" in msg
    assert "line 4: image bomb.png is 400 MP, above the 40 MP limit; downscale it (training reads" in msg
    kept = load_samples(data, mine, skip_bad=True)
    assert [s.where for s in kept] == [f"line {i}" for i in range(5, len(records) + 5)]
