"""A LoRA adapter merged at export time: the f32 GGUF's logits equal the (unmerged) PEFT model's logits."""

from __future__ import annotations

import pytest

from facellm_edge.bundle import load_bundle
from facellm_edge.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow  # exports

TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def test_adapter_export_matches_peft_logits(tiny_checkpoint, tmp_path, capsys):
    from facellm_edge.export.verify_llm import LogitProbe, compare_logits

    base = transformers.InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    # PEFT initialises lora_A from torch's global generator: seeded, so the adapter (and the size of the differences
    # checked below) does not depend on which tests ran before in this process (unseeded, it failed after others)
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-zero B so the adapter really changes the model (0.25: max_rel_diff 5.2e-3 here; at
        # 0.5 the larger activations put llama.cpp's f16 KV-cache noise at 0.8-1.7e-2, around the bound, by seed)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.25)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    peft_model.eval()

    out = tmp_path / "bundle"
    rc = main(["export", str(tiny_checkpoint), "--adapter", str(adapter), "--out", str(out), "--quant", "f32",
               "--vision", "fp32", "--no-verify"])
    assert rc == 0, capsys.readouterr().err
    b = load_bundle(out)
    assert b.manifest.source["adapter"] == str(adapter.resolve())
    gguf = b.llm_file("f32")[1]

    probe = LogitProbe(n_image_tokens=b.manifest.tokens.num_image_tokens)
    # The PEFT model computes base + LoRA on the fly (nothing merged): the GGUF must reproduce it.
    lora = compare_logits(peft_model.base_model.model, tokenizer, gguf, probe)
    # (llama.cpp keeps the KV cache in f16, hence ~1e-3 relative differences on these larger activations, which can
    # flip the argmax of a near-tied random-weight position: top-1 must agree wherever the margin is above that noise)
    assert lora["max_rel_diff"] < 1e-2 and lora["top1_agreement"] >= 0.99
    assert lora["top1_agreement_clear_positions"] == 1.0 and lora["clear_positions"] >= 0.9 * lora["n_positions"]
    # ... and it is not the base model (the adapter was applied).
    with peft_model.disable_adapter():
        plain = compare_logits(peft_model.base_model.model, tokenizer, gguf, probe)
    assert plain["max_abs_diff"] > 100 * lora["max_abs_diff"] and plain["top1_agreement"] < 0.9
