"""Checkpoints laid out the way the ones on the hub are: export, train collation and eval accept them.

* ``tiny_checkpoint`` — InternVL3-hf today: the embedding has as many rows as ``tokenizer.json`` has tokens
  (``text_config.vocab_size``, 151,674 for InternVL3's Qwen2.5) and ``<video>``, declared as an extra special
  token, lands at id 151,674: one past the last row.
* ``tiny_checkpoint_old_hf`` — an older -hf conversion: no video token at all (transformers 5's InternVLProcessor
  raises AttributeError on it) and no BOS id in config or tokenizer (Qwen's tokenizer has ``bos_token: null``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from facellm_edge.bundle import load_bundle
from facellm_edge.cli import main

pytestmark = pytest.mark.slow  # builds tiny_checkpoint_old_hf; exports, writes GGUFs of the full vocabulary

LAYOUTS = ["tiny_checkpoint", "tiny_checkpoint_old_hf"]


def _rows(ckpt: Path) -> int:
    return json.loads((ckpt / "config.json").read_text())["text_config"]["vocab_size"]


def _video_token(tokenizer):
    try:
        return tokenizer.video_token
    except AttributeError:
        return None


def test_fixtures_have_the_hub_layouts(tiny_checkpoint, tiny_checkpoint_old_hf, qwen_tokenizer_dir):
    import transformers

    from facellm_edge.export.synthetic import INTERNVL3_ADDED_TOKENS, QWEN_SPECIALS_LAST, text_vocab_size

    qwen = json.loads((qwen_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    # Qwen2's regular tokens and specials, then InternVL3's added tokens: 151,674 rows, as InternVL3-1B-hf has
    last_qwen = next(t["id"] for t in qwen["added_tokens"] if t["content"] == QWEN_SPECIALS_LAST)
    real_vocab = last_qwen + 1 + len(INTERNVL3_ADDED_TOKENS)
    assert real_vocab == 151_674
    for ckpt in (tiny_checkpoint, tiny_checkpoint_old_hf):
        model = transformers.InternVLForConditionalGeneration.from_pretrained(ckpt)
        rows = model.model.language_model.embed_tokens.weight.shape[0]
        assert rows == _rows(ckpt) == text_vocab_size(ckpt) == real_vocab
    tok = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert tok.convert_tokens_to_ids(_video_token(tok)) == real_vocab == len(tok) - 1  # one past the last row
    old = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint_old_hf)
    assert _video_token(old) is None and len(old) == real_vocab
    assert old.bos_token_id is None
    assert json.loads((tiny_checkpoint_old_hf / "config.json").read_text())["text_config"].get("bos_token_id") is None
    with pytest.raises(AttributeError, match="video_token"):  # what users of such checkpoints hit in transformers
        transformers.AutoProcessor.from_pretrained(tiny_checkpoint_old_hf)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_processor_and_model_load(request, layout, astronaut_bgr):
    from PIL import Image

    from facellm_edge.export import checkpoint

    ckpt = request.getfixturevalue(layout)
    loaded = checkpoint.load_model(ckpt)
    proc = loaded.processor
    assert (proc.start_image_token, proc.image_token, proc.end_image_token) == ("<img>", "<IMG_CONTEXT>", "</img>")
    assert proc.image_token_id == loaded.config.image_token_id
    assert proc.video_token == ("<video>" if layout == "tiny_checkpoint" else None)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Age?"}]}],
                                    tokenize=False, add_generation_prompt=True)
    enc = proc(text=[text], images=[Image.fromarray(astronaut_bgr[:, :, ::-1].copy())], crop_to_patches=False,
               return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    assert ids.count(proc.image_token_id) == proc.image_seq_length and enc["pixel_values"].shape[0] == 1


def test_processor_equals_transformers_own_where_transformers_can_load_it(tiny_checkpoint):
    import transformers

    from facellm_edge.export.checkpoint import load_processor

    ours, theirs = load_processor(tiny_checkpoint), transformers.AutoProcessor.from_pretrained(tiny_checkpoint)
    assert type(ours) is type(theirs)
    assert ours.to_dict() == theirs.to_dict()
    assert ours.chat_template == theirs.chat_template and ours.video_token == theirs.video_token


def test_tokenizer_without_image_tokens_is_a_checkpoint_error(tiny_checkpoint_old_hf, tmp_path):
    import shutil

    from facellm_edge.errors import CheckpointError
    from facellm_edge.export.checkpoint import load_processor

    bad = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint_old_hf, bad)
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    del cfg["extra_special_tokens"]["context_image_token"]
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="context_image_token"):
        load_processor(bad)


def test_gguf_leaves_out_tokens_past_the_embedding_in_one_log_line(tiny_checkpoint, tmp_path, caplog):
    import gguf
    import transformers

    from facellm_edge.export.gguf_llm import write_llm_gguf
    from facellm_edge.export.verify_llm import open_engine, tokenizer_parity

    model = transformers.InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    rows = _rows(tiny_checkpoint)
    with caplog.at_level(logging.INFO, logger="facellm_edge.export.gguf_llm"):
        report = write_llm_gguf(model, tok, tmp_path / "llm.gguf")
    said = [r.getMessage() for r in caplog.records if "<video>" in r.getMessage()]
    assert len(said) == 1 and f"{rows}" in said[0] and "left out" in said[0], said
    assert report.n_vocab == rows and report.n_tokenizer_tokens == rows + 1
    tokens = gguf.GGUFReader(str(report.path)).get_field("tokenizer.ggml.tokens").contents()
    assert len(tokens) == rows and "<video>" not in tokens
    engine = open_engine(report.path, 16)
    try:
        assert engine.n_vocab == rows
    finally:
        engine.close()
    parity = tokenizer_parity(tok, report.path)
    assert parity["percent"] == 100.0, parity["first_mismatch"]


def test_gguf_without_a_bos_id_is_written_like_llama_cpp_writes_qwen2(tiny_checkpoint_old_hf, tmp_path):
    import gguf
    import transformers

    from facellm_edge.export.gguf_llm import write_llm_gguf
    from facellm_edge.export.verify_llm import compare_logits, open_engine

    model = transformers.InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint_old_hf).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint_old_hf)
    report = write_llm_gguf(model, tok, tmp_path / "llm.gguf")
    reader = gguf.GGUFReader(str(report.path))
    assert reader.get_field("tokenizer.ggml.bos_token_id") is None  # convert_hf_to_gguf writes none either
    assert reader.get_field("tokenizer.ggml.add_bos_token").contents() is False
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == tok.eos_token_id
    engine = open_engine(report.path, 16)
    try:
        assert engine.add_bos is False
    finally:
        engine.close()
    assert compare_logits(model, tok, report.path)["top1_agreement"] == 1.0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_verified_export_end_to_end(request, layout, tmp_path, capsys):
    from facellm_edge.export.verify_llm import open_engine

    ckpt = request.getfixturevalue(layout)
    out = tmp_path / "bundle"
    rc = main(["export", str(ckpt), "--out", str(out), "--quant", "f32", "--vision", "fp32"])
    err = capsys.readouterr().err
    assert rc == 0, err
    m = load_bundle(out).manifest
    v = m.verification
    assert v["llm"]["f32"]["top1_agreement"] == 1.0
    assert v["tokenizer"]["n_match"] == v["tokenizer"]["n_texts"] > 0
    rows = _rows(ckpt)
    assert m.arch.vocab_size == rows
    engine = open_engine(out / m.llm["f32"].path, 16)
    try:
        assert engine.n_vocab == rows
    finally:
        engine.close()
    assert m.tokens.bos_id is None  # neither layout's tokenizer has a BOS token
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_collation(request, layout, tmp_path, astronaut_bgr):
    import cv2

    from facellm_edge.export.checkpoint import load_processor
    from facellm_edge.train.collate import IGNORE_INDEX, Encoder, collate
    from facellm_edge.train.data import load_samples

    ckpt = request.getfixturevalue(layout)
    cv2.imwrite(str(tmp_path / "a.png"), astronaut_bgr)
    rec = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nHow old is this person?"},
                                               {"from": "gpt", "value": "About thirty."}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    encoder = Encoder(load_processor(ckpt), max_length=512)
    samples = load_samples(tmp_path / "d.jsonl", tmp_path, skip_bad=False, reserved=encoder.reserved)
    enc = encoder(samples[0])
    tok = encoder.tokenizer
    assert enc.input_ids.count(encoder.processor.image_token_id) == encoder.processor.image_seq_length
    answer = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert tok.decode(answer) == "About thirty.<|im_end|>"
    assert max(enc.input_ids) < _rows(ckpt)
    batch = collate([enc, enc], encoder.pad_id)
    assert tuple(batch["input_ids"].shape) == (2, len(enc.input_ids))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_transformers_backend(request, layout, tmp_path, astronaut_bgr):
    import cv2

    from facellm_edge.eval.backends import TransformersBackend, TransformersConfig
    from facellm_edge.eval.mcq import MCQItem

    ckpt = request.getfixturevalue(layout)
    cv2.imwrite(str(tmp_path / "a.png"), astronaut_bgr)
    item = MCQItem(id="q1", question="How old is this person?", options=(("A", "20-30"), ("B", "40-50")),
                   answer="A", images=(tmp_path / "a.png",), category="age", task="age_estimation")
    backend = TransformersBackend(TransformersConfig(model=str(ckpt), max_new_tokens=3))
    inputs = backend.encode(item)
    assert int((inputs["input_ids"] == backend._processor.image_token_id).sum()) == \
        inputs["pixel_values"].shape[0] * backend._processor.image_seq_length
    assert isinstance(backend.answer(item).text, str)
