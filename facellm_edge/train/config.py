"""The training configuration: one frozen dataclass, the one source of defaults.

Defaults follow FaceLLM's LoRA recipe: rank 16, alpha 32, dropout 0 on every linear layer of the language model
(q, k, v, o, gate, up, down), vision tower and projector frozen, lr 1e-5 with a cosine schedule, one epoch, bf16 on
CUDA, sequences up to 2048 tokens, gradient norm clipped at 1.0. The CLI options map 1:1 onto these fields.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facellm_edge.errors import UsageError
from facellm_edge.llm.system_prompt import DEFAULT as DEFAULT_SYSTEM, resolve_system
from facellm_edge.io import loads_json

PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULERS = ("cosine", "linear", "constant")
# Fields that may differ between a run and its --resume: they do not change what is being trained.
RESUME_FREE_FIELDS = frozenset({"resume", "stop_after", "num_workers", "merge"})


@dataclass(frozen=True)
class TrainConfig:
    base: str  # hub id (Idiap/FaceLLM-1B) or local InternVL checkpoint directory
    data: Path  # ShareGPT JSON (a list) or JSONL
    images: Path  # image paths in the records are resolved against this directory
    out: Path  # run directory: adapter/, checkpoints/, metrics.jsonl, train_config.json
    resume: bool = False
    skip_bad: bool = False
    # LoRA
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    train_projector: bool = False
    lora_vision: bool = False
    # optimisation
    learning_rate: float = 1e-5
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int = 0  # 0: epochs x steps per epoch
    batch_size: int = 1  # per process
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    max_length: int = 2048
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU (logged)
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    fsdp: bool = False
    seed: int = 42
    # evaluation, checkpoints, logging
    eval_fraction: float = 0.0
    eval_every: int = 0  # optimizer steps; 0: only at the end
    save_every: int = 500  # optimizer steps; 0: no intermediate checkpoints
    stop_after: int = 0  # stop (with a checkpoint) after this many steps in this invocation; 0: run to the end
    num_workers: int = 0
    merge: bool = False
    # the system message of records without their own: none | intern_vl | the text (facellm_edge.llm.system_prompt)
    system: str = DEFAULT_SYSTEM

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "images", Path(self.images))
        object.__setattr__(self, "out", Path(self.out))
        positive = ("lora_rank", "lora_alpha", "epochs", "batch_size", "grad_accum", "max_length")
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        non_negative = ("max_steps", "warmup_steps", "eval_every", "save_every", "stop_after", "num_workers")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if self.learning_rate <= 0:
            raise UsageError(f"--learning-rate must be > 0 (got {self.learning_rate})")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UsageError(f"--lora-dropout must be in [0, 1) (got {self.lora_dropout})")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UsageError(f"--eval-fraction must be in [0, 1) (got {self.eval_fraction})")
        if self.max_grad_norm < 0:
            raise UsageError(f"--max-grad-norm must be >= 0, 0 disables clipping (got {self.max_grad_norm})")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if self.lr_scheduler not in SCHEDULERS:
            raise UsageError(f"--lr-scheduler must be one of {', '.join(SCHEDULERS)} (got {self.lr_scheduler!r})")
        resolve_system(self.system)
        if self.load_in_4bit and self.load_in_8bit:
            raise UsageError("choose one of --load-in-4bit and --load-in-8bit")
        if (self.load_in_4bit or self.load_in_8bit) and self.merge:
            raise UsageError("--merge needs a full-precision base; train with --load-in-4bit/8bit, then merge "
                             "with `facellm-edge export --adapter` on the full base")

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in d.items()}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        d: dict[str, Any] = loads_json(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UsageError(f"train_config.json has unknown fields {unknown}: it was written by another version")
        return cls(**d)

    def resume_mismatches(self, saved: "TrainConfig") -> list[str]:
        """Fields (other than the resume-free ones) whose value differs from the run being resumed."""
        out = []
        for f in dataclasses.fields(self):
            if f.name in RESUME_FREE_FIELDS:
                continue
            a, b = getattr(self, f.name), getattr(saved, f.name)
            if isinstance(a, Path):
                a, b = a.resolve(), Path(b).resolve()
            if a != b:
                out.append(f"{f.name}: run has {getattr(saved, f.name)!r}, now {getattr(self, f.name)!r}")
        return out
