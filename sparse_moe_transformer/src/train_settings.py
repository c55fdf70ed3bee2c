"""The settings of a training run (everything that is not the model; stored in every checkpoint) and the
learning rate of each step.

    TrainSettings   batch, accumulation, schedule, optimizer, precision, intervals; the defaults are the
                    recipe (Muon for the hidden matrices + AdamW, warmup-stable-decay); a preset's
                    training values (train.py's PRESETS) fill in the rest, and every one has its flag
    lr_at           warmup, then constant and a linear cool-down (wsd), or a cosine, to min_lr
"""

from __future__ import annotations

from dataclasses import dataclass

from phase1_foundation.src.validation import check_int, check_number
from phase3_components.src.hardware import PRECISIONS
from phase3_components.src.lr_schedules import linear_decay_lr, linear_warmup_lr, warmup_cosine_lr

# train_args of the first checkpoints, under today's names.
SETTINGS_RENAMES = {"lr": "max_lr", "grad_accum": "grad_accum_steps", "block_size": "seq_len"}
# What a checkpoint that has no such entry trained with: these fields came with the recipe.
SAVED_BEFORE_RECIPE = {"lr_schedule": "cosine", "optimizer": "adamw"}


@dataclass
class TrainSettings:
    """Everything about a training run that is not the model (stored in every checkpoint)."""

    batch_size: int  # sequences per micro-batch per rank
    grad_accum_steps: int  # micro-batches per optimizer step
    seq_len: int  # tokens per training sequence (<= config.block_size)
    max_steps: int  # optimizer steps; the schedule ends here
    max_lr: float  # peak learning rate
    min_lr: float  # the learning rate at the end of the schedule
    warmup_steps: int
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    eval_interval: int = 100  # optimizer steps between evaluations (0 = only at the end)
    eval_batches: int = 20  # validation batches per evaluation (0 = the whole validation split)
    log_interval: int = 10  # optimizer steps between metrics.jsonl records
    save_interval: int = 100  # optimizer steps between latest.pt saves (0 = evaluations and end only)
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    activation_checkpointing: bool = False
    compile: bool = False
    sample_tokens: int = 48  # tokens of the sample printed at each evaluation (0 = none)
    world_size: int = 1  # ranks the run was launched with (global batch = batch * accum * world)
    expert_parallel: int = 1  # E: ranks that share one copy of the experts (expert_parallel.py)
    # The recipe: warmup-stable-decay and Muon (checkpoints from before these fields: SAVED_BEFORE_RECIPE)
    lr_schedule: str = "wsd"  # "wsd": warmup, constant, linear cool-down; "cosine": warmup + cosine
    cooldown_frac: float = 0.4  # wsd: the last fraction of max_steps that decays linearly to min_lr
    optimizer: str = "muon"  # "muon": Muon for attention and expert matrices, AdamW for the rest; "adamw"
    muon_lr: float = 0.02  # Muon's peak lr (follows the schedule: muon_lr * lr_at(step) / max_lr)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0  # Muon's decoupled decay, times Muon's lr
    ns_dtype: str = "auto"  # Newton-Schulz dtype: auto (the fastest here: hardware.py) | fp32 | bf16 | fp16

    def __post_init__(self):
        for name in ("batch_size", "grad_accum_steps", "seq_len", "max_steps", "log_interval"):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name), minimum=1)
        for name in ("warmup_steps", "eval_interval", "eval_batches", "save_interval", "sample_tokens"):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name), minimum=0)
        check_int("--expert-parallel", self.expert_parallel, minimum=1)
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"--warmup-steps ({self.warmup_steps}) exceeds --max-steps ({self.max_steps})")
        check_number("--max-lr", self.max_lr, above=0)
        check_number("--min-lr", self.min_lr, low=0, high=self.max_lr)
        check_number("--weight-decay", self.weight_decay, low=0)
        check_number("--grad-clip (0 = off)", self.grad_clip, low=0)
        for name in ("beta1", "beta2"):
            check_number(f"TrainSettings.{name}", getattr(self, name), low=0, below=1)
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown --precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.lr_schedule not in ("cosine", "wsd"):
            raise ValueError(f"unknown --lr-schedule {self.lr_schedule!r}: choose cosine or wsd")
        check_number("--cooldown-frac", self.cooldown_frac, low=0, high=1)
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"unknown --optimizer {self.optimizer!r}: choose adamw or muon")
        check_number("--muon-lr", self.muon_lr, above=0)
        check_number("--muon-momentum", self.muon_momentum, low=0, below=1)
        check_number("--muon-weight-decay", self.muon_weight_decay, low=0)
        if self.ns_dtype not in PRECISIONS:
            raise ValueError(f"unknown --ns-dtype {self.ns_dtype!r}: choose one of {', '.join(PRECISIONS)}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum_steps * self.seq_len * self.world_size

    @classmethod
    def from_saved(cls, saved: dict) -> dict:
        """A checkpoint's train_args under today's names, with the values a checkpoint from before a
        field existed trained with."""
        return {
            **SAVED_BEFORE_RECIPE,
            **{SETTINGS_RENAMES.get(key, key): value for key, value in saved.items()},
        }


def lr_at(step: int, s: TrainSettings) -> float:
    """The learning rate of optimizer step `step` (0-based): warmup, then cosine to min_lr; or
    (lr_schedule "wsd") warmup, max_lr until the last cooldown_frac of the steps, then linear to min_lr."""
    if s.lr_schedule == "wsd":
        cooldown = round(s.cooldown_frac * s.max_steps)
        if step < s.warmup_steps:
            return linear_warmup_lr(step, max_lr=s.max_lr, warmup_steps=s.warmup_steps)
        if step < s.max_steps - cooldown:
            return s.max_lr
        done = step - (s.max_steps - cooldown)  # steps into the cool-down
        return linear_decay_lr(done, max_lr=s.max_lr, min_lr=s.min_lr, total_steps=max(cooldown, 1))
    return warmup_cosine_lr(
        step, max_lr=s.max_lr, min_lr=s.min_lr, warmup_steps=s.warmup_steps, total_steps=s.max_steps
    )
