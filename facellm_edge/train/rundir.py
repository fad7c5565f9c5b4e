"""The run directory: refuse to clobber a run, find/resume the last checkpoint, save checkpoints atomically.

Checkpoints are ``accelerator.save_state`` folders holding only the trainable (LoRA / projector) weights plus the
optimizer, scheduler, RNG and loop state. Each is written to ``checkpoints/.step-K.tmp`` by all processes and
moved to ``checkpoints/step-K`` by the main process once every process has finished writing.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facellm_edge.io import OutputKind, atomic_write_text, clean_stale_temps, files_under, replace_directory
from facellm_edge.errors import CheckpointError, OutputError, UsageError
from facellm_edge.train.config import TrainConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class LoopState:
    """Loop counters saved in every checkpoint (``accelerator.register_for_checkpointing``)."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (per process)

    def state_dict(self) -> dict[str, int]:
        return {"global_step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.global_step, self.epoch, self.batch_in_epoch = d["global_step"], d["epoch"], d["batch_in_epoch"]


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    d = Path(out) / CHECKPOINTS
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def check_out(cfg: TrainConfig) -> Path | None:
    """Validate ``cfg.out`` against ``cfg.resume``; return the checkpoint to resume from (None: start fresh)."""
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a directory")
    saved_cfg = out / CONFIG_FILE
    if not cfg.resume:
        if out.is_dir() and any(out.iterdir()):
            what = "a training run" if saved_cfg.exists() else "files"
            raise OutputError(f"--out {out} already holds {what}: pass --resume to continue it, or choose an "
                              "empty or new --out")
        return None
    if not saved_cfg.is_file():
        raise OutputError(f"--resume: {out} holds no training run ({CONFIG_FILE} missing); drop --resume to "
                          "start one there")
    try:
        saved = TrainConfig.from_json(saved_cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError) as exc:
        raise OutputError(f"--resume: cannot read {saved_cfg}: {exc}") from exc
    diff = cfg.resume_mismatches(saved)
    if diff:
        raise UsageError(f"--resume with different options than the run in {out} ({'; '.join(diff)}): use the "
                         "same options, or a new --out")
    found = checkpoints(out)
    if not found:
        log.warning("--resume: %s has no checkpoint yet; starting from step 0", out)
        return None
    return found[-1][1]


def in_training_run(dest: Path) -> set[str] | None:
    """Recogniser for ``adapter/`` and ``merged/`` written by versions without the output marker: they are ours
    when they sit in a training run folder (``check_out`` never starts a run in a folder holding anything)."""
    return set(files_under(dest)) if (Path(dest).parent / CONFIG_FILE).is_file() else None


ADAPTER = OutputKind("a LoRA adapter", recognise=in_training_run)
MERGED = OutputKind("a merged checkpoint", recognise=in_training_run)


def write_config(cfg: TrainConfig) -> None:
    cfg.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.out / CONFIG_FILE, cfg.to_json())


def truncate_metrics(out: Path, step: int) -> None:
    """On resume, drop metric rows logged after the checkpoint's step (they will be logged again)."""
    path = Path(out) / METRICS_FILE
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


def install_trainable_only_hooks(accelerator: Any) -> None:
    """Make ``save_state``/``load_state`` store only parameters that require grad (LoRA, projector)."""

    def trainable_names(model: Any) -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    def save_hook(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
        for model, state in zip(models, weights):
            keep = trainable_names(model)
            for k in [k for k in state if k not in keep]:
                del state[k]

    def load_hook(models: list[Any], input_dir: str) -> None:
        from safetensors import safe_open

        for i, model in enumerate(models):
            f = Path(input_dir) / (f"model_{i}.safetensors" if i else "model.safetensors")
            if not f.is_file():
                raise CheckpointError(f"checkpoint {input_dir} has no {f.name}: it is incomplete")
            with safe_open(str(f), framework="pt") as h:
                missing = trainable_names(model) - set(h.keys())
            if missing:
                raise CheckpointError(f"checkpoint {input_dir} lacks {len(missing)} trainable tensors (e.g. "
                                      f"{sorted(missing)[0]}): it was written with other LoRA options")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator: Any, out: Path, step: int) -> Path:
    """``accelerator.save_state`` into a temporary folder, moved to ``checkpoints/step-K`` when complete.

    The temporary folder has one name every process knows (they all write into it), unlike
    :func:`~facellm_edge.io.atomic_directory`'s per-process one; the swap into place is io's
    :func:`~facellm_edge.io.replace_directory`. The main process removes it if its own write fails; one left by a
    killed run is removed when that step is saved again (a resumed run saves the same steps)."""
    root = Path(out) / CHECKPOINTS
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(final)  # a swap cut short by a killed run: its set-aside step-K is put back or removed
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_directory(tmp, final)
        log.info("checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final
