"""The LoRA loop end to end on CPU: loss goes down, only LoRA changes, resume is exact, adapters merge, 2 processes.

The loop tests use a tiny InternVL built here with a larger init scale and 224 px tiles: with the session fixture's
0.02 init the frozen tied embedding bounds every logit to about +-1.3, so no LoRA can lower the loss much, and 224 px
(64 image tokens) keeps 30 steps within seconds on 2 cores. Masking/collation is tested on the 448 px fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # trains


@pytest.fixture(scope="module")
def learnable_checkpoint(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    from facellm_edge.export.synthetic import SyntheticSpec, build_checkpoint

    out = tmp_path_factory.mktemp("train_ckpt")
    return build_checkpoint(out, qwen_tokenizer_dir, SyntheticSpec(image_size=224, initializer_range=0.2, seed=3))


def _cfg(ckpt: Path, faces, out: Path, **kw):
    from facellm_edge.train import TrainConfig

    data, images, _ = faces
    return TrainConfig(base=str(ckpt), data=data, images=images, out=out, **kw)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_30_steps_lower_the_loss_only_lora_changes_and_the_adapter_merges(learnable_checkpoint, face_dataset, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import InternVLForConditionalGeneration

    from facellm_edge.train import train

    out = tmp_path / "run"
    result = train(_cfg(learnable_checkpoint, face_dataset, out, max_steps=30, learning_rate=1e-2,
                        lr_scheduler="constant", save_every=0, seed=0, eval_fraction=0.25, eval_every=15, merge=True))
    assert result.global_step == 30
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all(r["tokens_per_s"] > 0 and r["lr"] == pytest.approx(1e-2) for r in rows)
    assert [r["step"] for r in rows if "eval_loss" in r] == [15, 30]
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.8 * first, (first, last)

    base = InternVLForConditionalGeneration.from_pretrained(learnable_checkpoint).state_dict()
    trained = result.model
    lora = {n: p for n, p in trained.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert all("language_model" in n for n in lora)  # vision tower / projector untouched by default
    assert all(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at zero: it moved
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): t
             for n, t in trained.state_dict().items() if "lora_" not in n}
    assert set(after) == set(base)
    assert all(torch.equal(after[k], base[k]) for k in base)

    # the adapter: PEFT format, LoRA tensors only, loads onto the whole InternVL and merges to the same logits
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16
    assert all("lora_" in k for k in _tensors(adapter / "adapter_model.safetensors"))
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 30
    peft_model = PeftModel.from_pretrained(InternVLForConditionalGeneration.from_pretrained(learnable_checkpoint),
                                           str(adapter)).eval()
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(learnable_checkpoint)
    from facellm_edge.train.collate import Encoder, collate
    from facellm_edge.train.data import load_samples

    enc = Encoder(processor, 2048)(load_samples(*face_dataset[:2], skip_bad=False)[0])
    batch = collate([enc], processor.tokenizer.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        want = peft_model(**batch).logits
        merged_here = peft_model.merge_and_unload()(**batch).logits
        merged_dir = InternVLForConditionalGeneration.from_pretrained(out / "merged").eval()(**batch).logits
    torch.testing.assert_close(merged_here, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged_dir, want, rtol=1e-4, atol=1e-4)
    assert (out / "merged" / "tokenizer.json").is_file() and (out / "merged" / "processor_config.json").is_file()
    base_logits = InternVLForConditionalGeneration.from_pretrained(learnable_checkpoint).eval()(**batch).logits
    assert not torch.allclose(base_logits, want, atol=1e-3)


def test_resume_is_exact(learnable_checkpoint, face_dataset, tmp_path):
    import torch

    from facellm_edge.train import train

    kw = dict(max_steps=6, save_every=3, learning_rate=5e-3, seed=1, grad_accum=2)
    a = train(_cfg(learnable_checkpoint, face_dataset, tmp_path / "a", **kw))
    b1 = train(_cfg(learnable_checkpoint, face_dataset, tmp_path / "b", stop_after=3, **kw))
    assert b1.global_step == 3 and not b1.finished and b1.adapter is None and not (tmp_path / "b" / "adapter").exists()
    b = train(_cfg(learnable_checkpoint, face_dataset, tmp_path / "b", resume=True, **kw))
    assert a.global_step == b.global_step == 6
    ca, cb = tmp_path / "a" / "checkpoints" / "step-6", tmp_path / "b" / "checkpoints" / "step-6"
    oa = torch.load(ca / "optimizer.bin", weights_only=False)
    ob = torch.load(cb / "optimizer.bin", weights_only=False)
    assert oa["state"].keys() == ob["state"].keys() and oa["state"]
    for k in oa["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa["state"][k][name], ob["state"][k][name]), (k, name)
    wa = _tensors(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    wb = _tensors(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["loss"] for r in _metrics(tmp_path / "a")] == [r["loss"] for r in _metrics(tmp_path / "b")]
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-3", "step-6"]


def test_output_conflicts_and_bad_base_are_typed_errors(learnable_checkpoint, face_dataset, tmp_path, capsys):
    from transformers import Qwen2Config

    from facellm_edge.cli import main
    from facellm_edge.errors import CheckpointError, OutputError, UsageError
    from facellm_edge.train import train

    data, images, _ = face_dataset
    args = ["train", "--base", str(learnable_checkpoint), "--data", str(data), "--images", str(images)]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "train_config.json").write_text("{}")
    assert main([*args, "--out", str(busy)]) == OutputError.exit_code
    assert "already holds a training run: pass --resume" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "fresh"), "--resume"]) == OutputError.exit_code
    assert "holds no training run" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "x"), "--lora-rank", "0"]) == UsageError.exit_code
    assert "--lora-rank" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "fresh").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "train_config.json").write_text(_cfg(learnable_checkpoint, face_dataset, other, lora_rank=8).to_json())
    with pytest.raises(UsageError, match="--resume with different options.*lora_rank: run has 8, now 16"):
        train(_cfg(learnable_checkpoint, face_dataset, other, resume=True))

    qwen = tmp_path / "qwen"
    Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, architectures=["Qwen2ForCausalLM"]
                ).save_pretrained(qwen)
    with pytest.raises(CheckpointError, match="Qwen2ForCausalLM.*not InternVLForConditionalGeneration"):
        train(_cfg(qwen, face_dataset, tmp_path / "q"))
    with pytest.raises(UsageError, match="bitsandbytes|CUDA"):
        train(_cfg(learnable_checkpoint, face_dataset, tmp_path / "q4", load_in_4bit=True))

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "faces/none.jpg", "conversations": []}) + "\n" + data.read_text())
    rc = main(["train", "--base", str(learnable_checkpoint), "--data", str(bad), "--images", str(images),
               "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 3 and "1 bad record(s)" in err and "line 1: no 'conversations' list" in err


def test_two_processes_with_torchrun(learnable_checkpoint, face_dataset, tmp_path):
    """torchrun (gloo on CPU; `accelerate launch --cpu` needs mpirun for several CPU processes) runs the same
    module entry point in 2 ranks; accelerate sees a MULTI_CPU group of 2 and writes one adapter."""
    data, images, _ = face_dataset
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "facellm_edge.train", "-v",
           "--base", str(learnable_checkpoint), "--data", str(data), "--images", str(images), "--out", str(out),
           "--max-steps", "2", "--save-every", "1", "--learning-rate", "1e-3", "--eval-fraction", "0.25"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("adapter:") == 1 and "stopped" not in proc.stdout
    assert "2 process(es)" in proc.stderr
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16
    assert all("lora_" in k for k in _tensors(out / "adapter" / "adapter_model.safetensors"))
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert "eval_loss" in rows[-1] and 0 < rows[-1]["eval_loss"] < 100  # 1 held-out record, gathered once
    step1 = out / "checkpoints" / "step-1"
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors"} <= {p.name for p in step1.iterdir()}
    assert not list((out / "checkpoints").glob(".*tmp"))
