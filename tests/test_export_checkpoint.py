"""Checkpoint resolution, validation and loading (with a real PEFT LoRA merge) on tiny InternVL checkpoints."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from facellm_edge.errors import CheckpointError, UsageError  # noqa: E402
from facellm_edge.export import checkpoint  # noqa: E402

LLM_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _write_config(d: Path, config: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return d


def _input_ids(tokenizer) -> torch.Tensor:
    return tokenizer("Describe this person's face: age, expression, glasses.", return_tensors="pt").input_ids


def _make_adapter(base_dir: Path, out: Path, seed: int, targets: str = LLM_LORA_TARGETS) -> Path:
    """A real LoRA adapter on the LLM linear layers, with non-zero B matrices so it changes the model."""
    model = transformers.InternVLForConditionalGeneration.from_pretrained(base_dir).eval()
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint, tmp_path_factory) -> Path:
    return _make_adapter(tiny_checkpoint, tmp_path_factory.mktemp("lora") / "adapter", seed=3)


# -- resolve -------------------------------------------------------------------------------------------------


def test_resolve_local_directory(tiny_checkpoint):
    path, source = checkpoint.resolve_checkpoint(str(tiny_checkpoint), None)
    assert path == tiny_checkpoint.resolve()
    assert source == {"model": str(tiny_checkpoint), "revision": None, "commit": None, "path": str(path)}


def test_missing_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no" / "such" / "checkpoint"
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*neither an existing directory nor"):
        checkpoint.resolve_checkpoint(str(missing), None)
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.resolve_checkpoint("not a valid/repo id!", None)


def test_a_mistyped_folder_under_a_local_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    """``ck/missing`` with a local ``ck/``: a missing checkpoint folder, said at once (it was looked up on the hub)."""
    (tmp_path / "ck").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda **kw: pytest.fail("sent to the hub"))
    with pytest.raises(CheckpointError, match="checkpoint not found: ck/missing is neither an existing directory"):
        checkpoint.resolve_checkpoint("ck/missing", None)


def test_file_and_revision_on_local_dir_are_refused(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="is a file"):
        checkpoint.resolve_checkpoint(str(tiny_checkpoint / "config.json"), None)
    with pytest.raises(UsageError, match="--revision applies to hub ids only"):
        checkpoint.resolve_checkpoint(str(tiny_checkpoint), "main")


# -- inspect -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_cls, arch", [("Qwen2Config", "Qwen2ForCausalLM"), ("LlamaConfig", "LlamaForCausalLM")])
def test_not_internvl_names_the_architecture(tmp_path, config_cls, arch):
    cfg = getattr(transformers, config_cls)(hidden_size=64, num_hidden_layers=1, num_attention_heads=4).to_dict()
    cfg["architectures"] = [arch]
    d = _write_config(tmp_path / arch, cfg)
    with pytest.raises(CheckpointError, match=rf"is a {arch} checkpoint; facellm-edge exports InternVL "
                                              r"\(InternVLForConditionalGeneration\) with a Qwen2 LLM"):
        checkpoint.inspect_config(d)
    with pytest.raises(CheckpointError, match=arch):  # load_model checks before touching weights
        checkpoint.load_model(d)


def test_remote_code_internvl_points_to_the_hf_checkpoint(tmp_path):
    d = _write_config(tmp_path / "InternVL3-1B", {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat"})
    with pytest.raises(CheckpointError, match=r"remote-code InternVL .*'-hf'"):
        checkpoint.inspect_config(d)


def test_internvl_with_another_llm_is_refused(tiny_checkpoint, tmp_path):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    cfg["text_config"]["model_type"] = "llama"
    d = _write_config(tmp_path / "internvl-llama", cfg)
    with pytest.raises(CheckpointError, match=r"'llama' LLM"):
        checkpoint.inspect_config(d)


def test_no_config_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        checkpoint.inspect_config(tmp_path)


# -- load ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_checkpoint",
                                     pytest.param("tiny_checkpoint_untied", marks=pytest.mark.slow)])  # builds it
def test_load_model_reads_everything_from_the_checkpoint(request, fixture):
    loaded = checkpoint.load_model(request.getfixturevalue(fixture))
    assert isinstance(loaded.model, transformers.InternVLForConditionalGeneration)
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.config is loaded.model.config
    assert loaded.tokenizer is loaded.processor.tokenizer
    assert loaded.processor.image_seq_length == loaded.config.image_seq_length
    assert loaded.tokenizer.convert_tokens_to_ids(loaded.processor.image_token) == loaded.config.image_token_id
    with pytest.raises(AttributeError):
        loaded.model = None  # frozen


def test_truncated_safetensors_names_the_file(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"weight file .*model\.safetensors is corrupted or truncated"):
        checkpoint.load_model(broken)
    with open(weights, "r+b") as f:  # header itself cut off
        f.truncate(5)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupted or truncated"):
        checkpoint.load_model(broken)


def test_missing_shard_names_the_file(tiny_checkpoint, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint, d, ignore=shutil.ignore_patterns("*.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (d / checkpoint.SAFETENSORS_INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors is missing"):
        checkpoint.load_model(d)


def test_lora_adapter_merges_exactly_like_peft(tiny_checkpoint, adapter):
    merged = checkpoint.load_model(tiny_checkpoint, adapter)
    ids = _input_ids(merged.tokenizer)
    base = transformers.InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        peft_logits = peft.PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits
        merged_logits = merged.model(input_ids=ids).logits
    assert not any("lora" in n for n, _ in merged.model.named_parameters())  # merged and unloaded
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter really changes the model
    torch.testing.assert_close(merged_logits, peft_logits, atol=2e-5, rtol=1e-4)
    assert merged.source["adapter"] == str(adapter.resolve())


def test_adapter_for_another_base_only_warns(tiny_checkpoint, adapter, tmp_path, caplog):
    moved = tmp_path / "adapter"
    shutil.copytree(adapter, moved)
    cfg = json.loads((moved / checkpoint.ADAPTER_CONFIG).read_text())
    cfg["base_model_name_or_path"] = "someone/another-base"
    (moved / checkpoint.ADAPTER_CONFIG).write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="facellm_edge.export.checkpoint"):
        checkpoint.load_model(tiny_checkpoint, moved)
    assert any("someone/another-base" in r.getMessage() for r in caplog.records)


@pytest.mark.slow  # builds tiny_checkpoint_gqa
def test_adapter_shape_mismatch_is_an_error(tiny_checkpoint, tiny_checkpoint_gqa, tmp_path):
    # An adapter trained on the GQA model (1 KV head: k_proj/v_proj are narrower) does not fit the 2-KV-head model.
    other = _make_adapter(tiny_checkpoint_gqa, tmp_path / "gqa_adapter", seed=4,
                          targets=r".*language_model.*\.(k_proj|v_proj)")
    with pytest.raises(CheckpointError, match=r"does not fit the checkpoint .*size mismatch"):
        checkpoint.load_model(tiny_checkpoint, other)


def test_adapter_target_modules_missing_is_an_error(tiny_checkpoint, adapter, tmp_path):
    bad = tmp_path / "bad_targets"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / checkpoint.ADAPTER_CONFIG).read_text())
    cfg["target_modules"] = ["no_such_proj"]
    (bad / checkpoint.ADAPTER_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"does not fit the checkpoint .*no_such_proj"):
        checkpoint.load_model(tiny_checkpoint, bad)


def _retarget(adapter, targets: str) -> None:
    """Rewrite the adapter's target_modules (its weights unchanged)."""
    cfg = json.loads((adapter / checkpoint.ADAPTER_CONFIG).read_text())
    cfg["target_modules"] = targets
    (adapter / checkpoint.ADAPTER_CONFIG).write_text(json.dumps(cfg))


@pytest.mark.slow  # builds tiny_checkpoint_gqa
def test_adapter_without_weights_for_selected_modules_is_an_error(tiny_checkpoint, tiny_checkpoint_gqa, tmp_path):
    # Trained on q_proj of the 3-layer model, then its config is widened to o_proj: o_proj has no weights.
    other = _make_adapter(tiny_checkpoint_gqa, tmp_path / "partial", seed=5, targets=r".*language_model.*\.q_proj")
    _retarget(other, r".*language_model.*\.(q_proj|o_proj)")
    with pytest.raises(CheckpointError, match=r"has no weights for \d+ of the \d+ LoRA tensors"):
        checkpoint.load_model(tiny_checkpoint, other)


def test_adapter_weights_beyond_its_target_modules_are_an_error(tiny_checkpoint, tmp_path):
    """Trained on q_proj and v_proj, its config narrowed to q_proj: PEFT ignored the v_proj LoRA tensors silently
    (and an adapter for a deeper base of the same widths lost its extra layers the same way)."""
    other = _make_adapter(tiny_checkpoint, tmp_path / "narrow", seed=6, targets=r".*language_model.*\.(q_proj|v_proj)")
    _retarget(other, r".*language_model.*\.q_proj")
    with pytest.raises(CheckpointError, match=r"\d+ of its LoRA tensors belong to no module .*v_proj\.lora_"):
        checkpoint.load_model(tiny_checkpoint, other)


def test_weights_the_config_has_no_place_for_are_an_error(tiny_checkpoint, tmp_path, capfd):
    """A config of 1 LLM layer over weights of 2: transformers drops layer 1 without a word, and the export's
    verification compares against the same cut-down model. Now a one-line error naming the keys."""
    cut = tmp_path / "cut"
    shutil.copytree(tiny_checkpoint, cut)
    cfg = json.loads((cut / "config.json").read_text())
    n = cfg["text_config"]["num_hidden_layers"]
    cfg["text_config"]["num_hidden_layers"] = n - 1
    if isinstance(cfg["text_config"].get("layer_types"), list):
        cfg["text_config"]["layer_types"] = cfg["text_config"]["layer_types"][:n - 1]
    (cut / "config.json").write_text(json.dumps(cfg))
    capfd.readouterr()
    with pytest.raises(CheckpointError, match=rf"do not match its config \(unexpected_keys: .*layers\.{n - 1}\."):
        checkpoint.load_model(cut)
    assert "LOAD REPORT" not in capfd.readouterr().err  # transformers' table of keys: said in the one line


def test_not_an_adapter_directory(tiny_checkpoint, adapter, tmp_path):
    with pytest.raises(CheckpointError, match="is not a PEFT adapter"):
        checkpoint.load_model(tiny_checkpoint, tmp_path)
    other = tmp_path / "prompt_tuning"
    shutil.copytree(adapter, other)
    cfg = json.loads((other / checkpoint.ADAPTER_CONFIG).read_text())
    (other / checkpoint.ADAPTER_CONFIG).write_text(json.dumps({**cfg, "peft_type": "PROMPT_TUNING"}))
    with pytest.raises(CheckpointError, match="only LoRA adapters can be merged"):
        checkpoint.load_model(tiny_checkpoint, other)
    for f in other.glob("*.safetensors"):
        f.unlink()
    (other / checkpoint.ADAPTER_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"has no \*\.safetensors weights"):
        checkpoint.load_model(tiny_checkpoint, other)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(text_config="qwen2"), r"'text_config' must be an object, got str"),
    (lambda c: c.update(architectures="InternVLForConditionalGeneration"), r"'architectures' must be a list"),
    # weights of another shape than the config's: one line naming the tensor and both shapes (transformers raised
    # "look at the above report" after a multi-line table)
    (lambda c: c["text_config"].update(vocab_size=c["text_config"]["vocab_size"] - 8),
     r"do not match its config \(mismatched_keys: .*embed_tokens\.weight"),
])
def test_a_damaged_config_is_one_line_naming_the_key(tiny_checkpoint, tmp_path, capfd, edit, message):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    capfd.readouterr()
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load_model(d)
    assert "LOAD REPORT" not in capfd.readouterr().err
