"""``facellm-edge train``: LoRA fine-tuning. Options map 1:1 onto :class:`facellm_edge.train.config.TrainConfig`
(whose field defaults are the only defaults)."""

from __future__ import annotations

from pathlib import Path

import typer

from facellm_edge.commands.defaults import field_default
from facellm_edge.llm.system_prompt import HELP as SYSTEM_HELP
from facellm_edge.train.config import TrainConfig


def d(name: str) -> object:
    return field_default(TrainConfig, name)


def train_command(
    base: str = typer.Option(..., "--base", help="Base InternVL checkpoint: hub id (Idiap/FaceLLM-1B) or directory."),
    data: Path = typer.Option(..., "--data", help="ShareGPT records: JSON list or JSONL."),
    images: Path = typer.Option(..., "--images", help="Folder the records' 'image' paths are relative to."),
    out: Path = typer.Option(..., "--out", help="Run directory (adapter/, checkpoints/, metrics.jsonl)."),
    resume: bool = typer.Option(d("resume"), "--resume", help="Continue the run in --out from its last checkpoint."),
    skip_bad: bool = typer.Option(d("skip_bad"), "--skip-bad", help="Skip invalid records instead of failing."),
    lora_rank: int = typer.Option(d("lora_rank"), "--lora-rank", help="LoRA rank."),
    lora_alpha: int = typer.Option(d("lora_alpha"), "--lora-alpha", help="LoRA alpha."),
    lora_dropout: float = typer.Option(d("lora_dropout"), "--lora-dropout", help="LoRA dropout."),
    train_projector: bool = typer.Option(d("train_projector"), "--train-projector", help="Also train the projector."),
    lora_vision: bool = typer.Option(d("lora_vision"), "--lora-vision", help="Also put LoRA on the vision tower."),
    learning_rate: float = typer.Option(d("learning_rate"), "--learning-rate", "--lr", help="Peak learning rate."),
    lr_scheduler: str = typer.Option(d("lr_scheduler"), "--lr-scheduler", help="cosine | linear | constant."),
    warmup_steps: int = typer.Option(d("warmup_steps"), "--warmup-steps", help="Linear warm-up steps."),
    weight_decay: float = typer.Option(d("weight_decay"), "--weight-decay", help="AdamW weight decay."),
    epochs: int = typer.Option(d("epochs"), "--epochs", help="Passes over the training records."),
    max_steps: int = typer.Option(d("max_steps"), "--max-steps", help="Optimizer steps (0: from --epochs)."),
    batch_size: int = typer.Option(d("batch_size"), "--batch-size", help="Records per micro-batch per GPU."),
    grad_accum: int = typer.Option(d("grad_accum"), "--grad-accum", help="Micro-batches per optimizer step."),
    max_grad_norm: float = typer.Option(d("max_grad_norm"), "--max-grad-norm", help="Gradient clipping (0: off)."),
    max_length: int = typer.Option(d("max_length"), "--max-length", help="Max tokens per record (incl. image)."),
    precision: str = typer.Option(d("precision"), "--precision", help="auto (CUDA: bf16, CPU: fp32), bf16, fp32."),
    gradient_checkpointing: bool = typer.Option(d("gradient_checkpointing"), "--gradient-checkpointing",
                                                help="Recompute activations to save memory."),
    load_in_4bit: bool = typer.Option(d("load_in_4bit"), "--load-in-4bit", help="QLoRA: NF4 base (bitsandbytes)."),
    load_in_8bit: bool = typer.Option(d("load_in_8bit"), "--load-in-8bit", help="8-bit base (bitsandbytes)."),
    fsdp: bool = typer.Option(d("fsdp"), "--fsdp", help="Shard with FSDP (under accelerate launch / torchrun)."),
    seed: int = typer.Option(d("seed"), "--seed", help="Seed for LoRA init, data order and split."),
    eval_fraction: float = typer.Option(d("eval_fraction"), "--eval-fraction", help="Held-out fraction (eval loss)."),
    eval_every: int = typer.Option(d("eval_every"), "--eval-every", help="Eval every N steps (0: at the end)."),
    save_every: int = typer.Option(d("save_every"), "--save-every", help="Checkpoint every N steps (0: never)."),
    stop_after: int = typer.Option(d("stop_after"), "--stop-after",
                                   help="Stop (with a checkpoint) after N steps in this call (0: no)."),
    num_workers: int = typer.Option(d("num_workers"), "--num-workers", help="DataLoader worker processes."),
    merge: bool = typer.Option(d("merge"), "--merge", help="Also write out/merged (full merged checkpoint)."),
    system: str = typer.Option(d("system"), "--system", help=SYSTEM_HELP + " Opens every record that has no "
                               "system message of its own."),
) -> None:
    _check_inputs(data, images)
    from facellm_edge.train import train

    cfg = TrainConfig(
        base=base, data=data, images=images, out=out, resume=resume, skip_bad=skip_bad, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, train_projector=train_projector, lora_vision=lora_vision,
        learning_rate=learning_rate, lr_scheduler=lr_scheduler, warmup_steps=warmup_steps,
        weight_decay=weight_decay, epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
        max_grad_norm=max_grad_norm, max_length=max_length, precision=precision,
        gradient_checkpointing=gradient_checkpointing, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
        fsdp=fsdp, seed=seed, eval_fraction=eval_fraction, eval_every=eval_every, save_every=save_every,
        stop_after=stop_after, num_workers=num_workers, merge=merge, system=system,
    )
    result = train(cfg)
    if not result.finished:
        typer.echo(f"stopped at step {result.global_step}: continue with --resume")
    elif result.adapter is not None:  # main process only
        typer.echo(f"adapter: {result.adapter} (step {result.global_step})")
    if result.merged is not None:
        typer.echo(f"merged: {result.merged}")


def _check_inputs(data: Path, images: Path) -> None:
    """Missing input paths fail in a second, before torch is imported or the device is probed (and warned about)."""
    from facellm_edge.errors import InputError

    if not data.is_file():
        raise InputError(f"training data {data} not found: pass --data with a ShareGPT .json or .jsonl file")
    if not images.is_dir():
        raise InputError(f"image directory {images} not found: pass --images with the folder the records' "
                         "'image' paths are relative to")

