"""The LoRA training loop on ``accelerate``: device placement, DDP/FSDP, gradient accumulation, checkpoints.

``train(cfg)`` validates everything up front (base architecture, data, output dir), trains, and writes
``out/adapter/`` (PEFT adapter of the whole InternVL), ``out/metrics.jsonl``, ``out/train_config.json`` and, with
``merge``, ``out/merged/``. Resuming restores weights, optimizer, scheduler, RNG and loop state and skips the
micro-batches already consumed in the current epoch, so a resumed run follows the same trajectory.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facellm_edge.io import atomic_directory
from facellm_edge.errors import UsageError, require
from facellm_edge.train import rundir as ckpt
from facellm_edge.train.collate import EncodedDataset, Encoder, PadCollator
from facellm_edge.train.config import TrainConfig
from facellm_edge.train.data import load_samples, split_eval
from facellm_edge.export.checkpoint import load_processor
from facellm_edge.llm.system_prompt import resolve_system
from facellm_edge.train.model import check_base, load_model, merge_adapter, save_adapter, wrap_lora

log = logging.getLogger(__name__)

OOM_HINT = ("CUDA out of memory: lower --batch-size (and raise --grad-accum to keep the effective batch), enable "
            "--gradient-checkpointing, use --load-in-4bit, or lower --max-length")


@dataclass(frozen=True)
class TrainResult:
    out: Path
    global_step: int
    finished: bool  # False when stopped early (--stop-after): continue with --resume
    adapter: Path | None  # written by the main process when finished
    merged: Path | None
    last_loss: float | None
    model: Any = field(default=None, repr=False, compare=False)  # the trained PeftModel (unwrapped), main process


class EpochSampler:
    """A seeded permutation per epoch. Deliberately no ``set_epoch``: accelerate must not drive the epoch, the
    loop does (so resume lands on the right permutation)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _precision(cfg: TrainConfig, cuda: bool) -> str:
    if cfg.precision == "auto":
        if cuda:
            return "bf16"
        log.warning("no CUDA device: training in fp32 on CPU (FaceLLM's recipe is bf16 on CUDA; "
                    "pass --precision bf16 to use bf16 on CPU)")
        return "fp32"
    return cfg.precision


def _accelerator(cfg: TrainConfig, precision: str, cuda: bool) -> Any:
    accelerate = require("accelerate", "train")
    kwargs: dict[str, Any] = {}
    if cfg.fsdp:
        from accelerate.utils import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["Qwen2DecoderLayer", "InternVLVisionLayer"],
            use_orig_params=True, sync_module_states=True, state_dict_type="SHARDED_STATE_DICT",
        )
    # cpu=True without CUDA: accelerate then treats torchrun/mpirun ranks as a gloo MULTI_CPU group.
    return accelerate.Accelerator(gradient_accumulation_steps=cfg.grad_accum, cpu=not cuda,
                                  mixed_precision="bf16" if precision == "bf16" else "no", **kwargs)


def _write_metrics(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _answer_logits(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Logits [B, P, V] at the P positions that predict a labelled (answer) token in any row, and targets [B, P].

    Only those positions go through ``lm_head`` (``logits_to_keep`` as a 1-D index tensor, supported by every
    transformers 5 release): with a 150k vocabulary and ~260 image tokens per record this saves most of a step.
    """
    shifted = batch["labels"][:, 1:]
    positions = (shifted != -100).any(dim=0).nonzero().squeeze(1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"], logits_to_keep=positions).logits
    return logits, shifted[:, positions]


def answer_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Mean cross-entropy over the answer tokens (+ their end-of-turn) of the batch."""
    import torch

    logits, targets = _answer_logits(model, batch)
    if not bool((targets != -100).any()):  # every answer truncated away: contributes nothing
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def _evaluate(model: Any, loader: Any, accelerator: Any) -> float:
    """Token-weighted eval loss over the held-out records (each counted once across processes)."""
    import torch

    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in loader:
            logits, targets = _answer_logits(model, batch)
            ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                   ignore_index=-100, reduction="none").view(targets.shape)
            per_record = torch.stack([ce.sum(1).double(), (targets != -100).sum(1).double()], dim=1)
            total += accelerator.gather_for_metrics(per_record).sum(0).cpu()  # drops even_batches padding
    model.train()
    return float(total[0] / total[1].clamp(min=1))


def train(cfg: TrainConfig) -> TrainResult:
    torch = require("torch", "train")
    transformers = require("transformers", "train")
    check_base(cfg.base)
    resume_from = ckpt.check_out(cfg)
    cuda = torch.cuda.is_available()
    precision = _precision(cfg, cuda)
    accelerator = _accelerator(cfg, precision, cuda)
    try:
        return _run(cfg, accelerator, precision, cuda, resume_from)
    finally:
        # Forget this run's mixed precision / plugins (the process group stays) so a later train() in the same
        # process can use other options.
        require("accelerate", "train").state.AcceleratorState._reset_state()


def _run(cfg: TrainConfig, accelerator: Any, precision: str, cuda: bool, resume_from: Path | None) -> TrainResult:
    torch = require("torch", "train")
    transformers = require("transformers", "train")
    require("accelerate", "train").utils.set_seed(cfg.seed)

    processor = load_processor(cfg.base)  # also checkpoints without a video token (older InternVL3-hf)
    encoder = Encoder(processor, cfg.max_length, system=resolve_system(cfg.system))  # records without their own
    samples = load_samples(cfg.data, cfg.images, skip_bad=cfg.skip_bad, reserved=encoder.reserved)
    train_samples, eval_samples = split_eval(samples, cfg.eval_fraction, cfg.seed)
    log.info("%d training / %d held-out records, %d process(es), %s", len(train_samples), len(eval_samples),
             accelerator.num_processes, precision)

    accelerator.wait_for_everyone()  # every process validated the output dir before anything is written
    if accelerator.is_main_process:
        ckpt.write_config(cfg)
        if resume_from is None:
            (cfg.out / ckpt.METRICS_FILE).unlink(missing_ok=True)

    # bf16 weights + fp32 LoRA under autocast; FSDP (1) needs one dtype per flattened unit, so under FSDP the base
    # loads in fp32 and accelerate's FSDP mixed-precision policy computes in bf16.
    dtype = torch.bfloat16 if precision == "bf16" and cuda and not cfg.fsdp else torch.float32
    model = wrap_lora(load_model(cfg, dtype=dtype, device_index=accelerator.local_process_index if cuda else None),
                      cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # trainable weights (LoRA, a --train-projector copy) in fp32 under bf16 autocast
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    collator = PadCollator(encoder.pad_id)
    sampler = EpochSampler(len(train_samples), cfg.seed)
    train_dl = torch.utils.data.DataLoader(EncodedDataset(train_samples, encoder), batch_size=cfg.batch_size,
                                           sampler=sampler, collate_fn=collator, num_workers=cfg.num_workers)
    eval_dl = (torch.utils.data.DataLoader(EncodedDataset(eval_samples, encoder), batch_size=cfg.batch_size,
                                           shuffle=False, collate_fn=collator, num_workers=cfg.num_workers)
               if eval_samples else None)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    if eval_dl is not None:
        eval_dl = accelerator.prepare(eval_dl)

    steps_per_epoch = math.ceil(len(train_dl) / cfg.grad_accum)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    # Not prepared: accelerate would step it once per process; it steps once per optimizer step here.
    scheduler = transformers.get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                           num_training_steps=total_steps)
    state = ckpt.LoopState()
    accelerator.register_for_checkpointing(scheduler, state)
    ckpt.install_trainable_only_hooks(accelerator)
    if resume_from is not None:
        accelerator.load_state(str(resume_from), strict=False)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, state.global_step, state.epoch,
                 state.batch_in_epoch)
        if accelerator.is_main_process:
            ckpt.truncate_metrics(cfg.out, state.global_step)
    accelerator.wait_for_everyone()

    try:
        last_loss = _loop(cfg, accelerator, model, optimizer, scheduler, params, train_dl, eval_dl, sampler, state,
                          total_steps, cuda)
    except torch.cuda.OutOfMemoryError as exc:
        raise UsageError(OOM_HINT) from exc

    finished = state.global_step >= total_steps
    adapter = merged = None
    if finished:
        state_dict = accelerator.get_state_dict(model)  # collective under FSDP: every process calls it
        if accelerator.is_main_process:
            adapter = cfg.out / "adapter"
            with atomic_directory(adapter, force=True, kind=ckpt.ADAPTER) as tmp:
                save_adapter(accelerator.unwrap_model(model), state_dict, tmp)
            if cfg.merge:
                merged = cfg.out / "merged"
                with atomic_directory(merged, force=True, kind=ckpt.MERGED) as tmp:
                    merge_adapter(cfg.base, adapter, tmp)
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(cfg.out, state.global_step, finished, adapter, merged, last_loss,
                       accelerator.unwrap_model(model))


def _loop(cfg: TrainConfig, accelerator: Any, model: Any, optimizer: Any, scheduler: Any, params: list[Any],
          train_dl: Any, eval_dl: Any, sampler: EpochSampler, state: ckpt.LoopState, total_steps: int,
          cuda: bool) -> float | None:
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    metrics = cfg.out / ckpt.METRICS_FILE
    start_step = state.global_step
    last_loss: float | None = None
    acc = torch.zeros(3, device=accelerator.device, dtype=torch.float64)  # loss sum, micro-batches, tokens
    t0 = time.perf_counter()
    progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}"), disable=not accelerator.is_main_process)
    model.train()
    with progress:
        task = progress.add_task("train", total=total_steps, completed=state.global_step, info="")
        while state.global_step < total_steps:
            sampler.use_epoch(state.epoch)
            loader = (accelerator.skip_first_batches(train_dl, state.batch_in_epoch) if state.batch_in_epoch
                      else train_dl)
            for batch in loader:
                with accelerator.accumulate(model):
                    loss = answer_loss(model, batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                acc += torch.stack([loss.detach().double(), torch.ones((), device=acc.device, dtype=acc.dtype),
                                    batch["attention_mask"].sum().double()])
                state.batch_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                state.global_step += 1
                total = accelerator.reduce(acc, reduction="sum")
                elapsed = time.perf_counter() - t0
                last_loss = float(total[0] / total[1])
                row: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch, "loss": last_loss,
                                       "lr": scheduler.get_last_lr()[0], "tokens_per_s": float(total[2]) / elapsed}
                if cuda:
                    row["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                acc.zero_()
                t0 = time.perf_counter()
                if eval_dl is not None and (state.global_step == total_steps or
                                            (cfg.eval_every and state.global_step % cfg.eval_every == 0)):
                    row["eval_loss"] = _evaluate(model, eval_dl, accelerator)
                    t0 = time.perf_counter()
                if accelerator.is_main_process:
                    _write_metrics(metrics, row)
                progress.update(task, completed=state.global_step, info=f"loss {last_loss:.4f}")
                stop = cfg.stop_after and state.global_step - start_step >= cfg.stop_after
                end_of_epoch = state.batch_in_epoch >= len(train_dl)
                if end_of_epoch:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                if (cfg.save_every and state.global_step % cfg.save_every == 0) or (
                        stop and state.global_step < total_steps):
                    ckpt.save_checkpoint(accelerator, cfg.out, state.global_step)
                if stop or state.global_step >= total_steps or end_of_epoch:
                    break
            else:  # loader exhausted without a sync on the last batch (cannot happen: accelerate syncs at the end)
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if cfg.stop_after and state.global_step - start_step >= cfg.stop_after:
                break
    return last_loss
