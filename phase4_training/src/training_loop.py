"""A complete training loop for the Phase 2 GPT: the techniques every real LLM run uses.

One optimizer step (`train_step`):

    lr = warmup_cosine_lr(step)                                 Phase 3's schedule, written into AdamW
    for each of k micro-batches:                                gradient accumulation
        with autocast(dtype):  loss = model(x, y) / k           mixed precision (bf16 / fp16 / fp32)
        scaler.scale(loss).backward()                           gradients ADD UP in .grad
    scaler.unscale_(optimizer)                                  fp16 only: undo the loss scaling
    norm = clip_grad_norm(params, max_norm)                     Phase 3's global-norm clipping
    scaler.step(optimizer); scaler.update()                     AdamW (Phase 2's make_adamw groups)

Why each piece:
- Gradient accumulation: the gradient of a mean over k*b examples is the mean of the k gradients
  over b examples each. Dividing each micro-batch loss by k and summing the backward passes gives
  the big-batch gradient exactly (up to float rounding) with the memory of a small batch.
- Mixed precision: matmuls in bf16/fp16 run 2-16x faster on GPUs and halve activation memory;
  the weights and optimizer state stay fp32 ("master weights"). fp16 has a narrow exponent range,
  so small gradients underflow to 0: the GradScaler multiplies the loss by a large factor before
  backward and divides the gradients again before the step (skipping steps whose gradients
  overflowed). bf16 has fp32's range and needs no scaler. CPUs run fp32 by default; bf16 autocast
  can be forced on a CPU to see its effect on the loss.
- Clipping: one unlucky batch with a huge gradient cannot throw the weights far away.
- Warmup + cosine: small steps while Adam's moment estimates are noisy, then a slow decay.
- Evaluation every `eval_interval` steps and after the last one with Phase 2's `estimate_loss` (train and
  val splits).

Off is 0 for every setting, as on the MoE's command line: grad_clip=0 clips nothing, eval_interval=0
evaluates only at the end, save_interval=0 saves only at the end.
- Checkpoint and resume: Phase 2's atomic `save_checkpoint` / safe `load_checkpoint`, extended with
  what an exact restart needs — the optimizer state (Adam's moments), the step (the schedule is
  a pure function of it), the GradScaler state, the random-number generators (dropout masks and
  batch sampling continue exactly where they stopped) and the history so far.

Data comes from `get_batch(split) -> (x, y)` (LongTensors [B, T]) as in Phase 2. Resume reproduces
the uninterrupted run exactly when get_batch draws its randomness from the global generators
(torch, numpy, random) — the ones the checkpoint stores.

Run `python phase4_training/src/training_loop.py` for a short demo on the synthetic stories.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from phase1_foundation.src.validation import check_int, check_number
from phase2_architecture.src.training_utils import estimate_loss, load_checkpoint, make_adamw, save_checkpoint
from phase3_components.src.gradient_clipping import clip_grad_norm, global_grad_norm
from phase3_components.src.hardware import PRECISIONS, choose_precision
from phase3_components.src.lr_schedules import set_learning_rate, warmup_cosine_lr

GetBatch = Callable[[str], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class TrainingConfig:
    """Everything that defines a run (saved in every checkpoint)."""

    max_steps: int  # optimizer steps
    max_lr: float = 1e-3
    min_lr: float | None = None  # end of the cosine; None = max_lr / 10
    warmup_steps: int = 0
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    precision: str = "auto"  # "auto" (bf16/fp16 on CUDA, fp32 on CPU), "fp32", "bf16", "fp16"
    eval_interval: int = 0  # evaluate every this many steps (and at the end); 0 = only at the end
    eval_batches: int = 10  # batches per split in each evaluation
    checkpoint_path: str | None = None
    save_interval: int = 0  # save every this many steps (and at the end); 0 = only at the end

    def __post_init__(self):
        for name in ("max_steps", "grad_accum_steps", "eval_batches"):
            value = getattr(self, name)
            check_int(f"TrainingConfig.{name}", value, minimum=1)
        for name in ("warmup_steps", "eval_interval", "save_interval"):
            value = getattr(self, name)
            check_int(f"TrainingConfig.{name}", value, minimum=0)
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        check_number("TrainingConfig.max_lr", self.max_lr, above=0)
        if self.min_lr is not None and not 0 <= self.min_lr <= self.max_lr:
            raise ValueError(f"min_lr must be in [0, max_lr={self.max_lr}], got {self.min_lr}")
        check_number("TrainingConfig.grad_clip (0 = no clipping)", self.grad_clip, low=0)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.save_interval and self.checkpoint_path is None:
            raise ValueError("save_interval is set but checkpoint_path is None: give a path to save to")

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to min_lr at max_steps (Phase 3's warmup_cosine_lr)."""
        min_lr = self.max_lr / 10 if self.min_lr is None else self.min_lr
        return warmup_cosine_lr(
            step,
            max_lr=self.max_lr,
            min_lr=min_lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.max_steps,
        )


# ---------------------------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------------------------


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for `precision` on this device; None means plain fp32 (no autocast).

    The choice is Phase 3's hardware.choose_precision, the one place that asks the machine: auto is fp32 on
    CPUs, bf16 on GPUs with native bf16 (compute capability >= 8.0), and below that fp16 with a GradScaler
    only where fp16 matmuls are measured faster than fp32. fp16 and bf16 can be asked for anywhere: CPU
    autocast supports both, and torch.amp.GradScaler("cpu") scales fp16 losses there too.
    """
    return choose_precision(precision, device).autocast_dtype


def autocast_context(device_type: str, amp_dtype: torch.dtype | None):
    """`with autocast_context(...)`: matmuls in amp_dtype, reductions (softmax, loss) in fp32."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=amp_dtype)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    get_batch: GetBatch,
    *,
    grad_accum_steps: int = 1,
    grad_clip: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Accumulate gradients over `grad_accum_steps` micro-batches, clip (grad_clip 0 = not), step.

    `loss` is the mean of the micro-batch losses (= the big-batch loss when every micro-batch
    scores the same number of tokens); `grad_norm` is the global gradient norm before clipping.
    The (clipped) gradients are left in .grad so they can be inspected.
    """
    check_number("grad_clip (0 = no clipping)", grad_clip, low=0)
    device = model_device(model)
    scaler = scaler if scaler is not None else torch.amp.GradScaler(device.type, enabled=False)
    optimizer.zero_grad(set_to_none=True)
    total_loss = 0.0
    for _ in range(grad_accum_steps):
        x, y = get_batch("train")  # [B, T] each
        x, y = x.to(device), y.to(device)
        with autocast_context(device.type, amp_dtype):
            _, loss = model(x, y)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value}; lower the learning rate or enable grad_clip")
        total_loss += loss_value / grad_accum_steps
        # Divide by k: the sum of k backward passes is then the gradient of the mean loss.
        scaler.scale(loss / grad_accum_steps).backward()
    scaler.unscale_(optimizer)  # fp16: true gradients again before measuring / clipping them
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        grad_norm = clip_grad_norm(params, grad_clip, error_if_nonfinite=not scaler.is_enabled())
    else:
        grad_norm = global_grad_norm(params)
    scaler.step(optimizer)  # skipped by the scaler if an fp16 gradient overflowed
    scaler.update()
    return {"loss": total_loss, "grad_norm": float(grad_norm)}


# ---------------------------------------------------------------------------------------------
# Random-number state (what makes resume exact)
# ---------------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """The global torch / CUDA / numpy / random states, in types torch.load(weights_only=True) reads."""
    np_name, np_keys, np_pos, np_has_gauss, np_cached_gauss = np.random.get_state()
    py_version, py_internal, py_gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_cached_gauss],
        "python": [py_version, list(py_internal), py_gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_name, np_keys, np_pos, np_has_gauss, np_cached_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_cached_gauss))
    py_version, py_internal, py_gauss_next = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _due(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def evaluate(model: nn.Module, get_batch: GetBatch, eval_batches: int, amp_dtype: torch.dtype | None) -> dict:
    """Phase 2's estimate_loss (eval mode, mean over eval_batches batches per split), under autocast."""
    device = model_device(model)

    def get_batch_on_device(split):
        x, y = get_batch(split)
        return x.to(device), y.to(device)

    with autocast_context(device.type, amp_dtype):
        return estimate_loss(model, get_batch_on_device, eval_batches)


def train(
    model: nn.Module,
    get_batch: GetBatch,
    config: TrainingConfig,
    *,
    resume: bool = False,
    progress: bool = False,
) -> dict[str, list[dict]]:
    """Train `model` for `config.max_steps` optimizer steps; returns {"train": [...], "eval": [...]}.

    train records: {"step", "lr", "loss", "grad_norm"} per optimizer step.
    eval records:  {"step", "train", "val"} every `eval_interval` steps and after the last step.
    resume=True continues from `config.checkpoint_path` (model, optimizer, scaler, step, RNGs, history).
    """
    device = model_device(model)
    amp_dtype = resolve_precision(config.precision, device)
    optimizer = make_adamw(model, config.max_lr, config.weight_decay, (config.beta1, config.beta2))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    history: dict[str, list[dict]] = {"train": [], "eval": []}
    start_step = 0
    if resume:
        if config.checkpoint_path is None or not os.path.isfile(config.checkpoint_path):
            raise FileNotFoundError(
                f"resume=True but there is no checkpoint at {config.checkpoint_path!r}; "
                "train without resume first, or point checkpoint_path at an existing file"
            )
        checkpoint = load_checkpoint(config.checkpoint_path, model, optimizer)
        scaler.load_state_dict(checkpoint["scaler"])
        history = checkpoint["history"]
        start_step = checkpoint["step"]
        restore_rng_state(checkpoint["rng"])

    model.train()
    for step in tqdm(range(start_step, config.max_steps), disable=not progress, desc="training"):
        if _due(step, config.eval_interval):
            losses = evaluate(model, get_batch, config.eval_batches, amp_dtype)
            history["eval"].append({"step": step, **losses})
        lr = config.lr_at(step)
        set_learning_rate(optimizer, lr)
        metrics = train_step(
            model,
            optimizer,
            get_batch,
            grad_accum_steps=config.grad_accum_steps,
            grad_clip=config.grad_clip,
            scaler=scaler,
            amp_dtype=amp_dtype,
        )
        history["train"].append({"step": step, "lr": lr, **metrics})
        done = step + 1
        if config.checkpoint_path and (_due(done, config.save_interval) or done == config.max_steps):
            save_training_checkpoint(config, model, optimizer, scaler, done, history)

    if not history["eval"] or history["eval"][-1]["step"] != config.max_steps:  # the end is always evaluated
        history["eval"].append(
            {"step": config.max_steps, **evaluate(model, get_batch, config.eval_batches, amp_dtype)}
        )
    return history


def save_training_checkpoint(
    config: TrainingConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    step: int,
    history: dict,
) -> None:
    """Phase 2's atomic checkpoint plus everything an exact resume needs."""
    save_checkpoint(
        config.checkpoint_path,
        model,
        optimizer,
        step,
        scaler=scaler.state_dict(),
        rng=capture_rng_state(),
        history=history,
        training_config=asdict(config),
    )


if __name__ == "__main__":
    from phase2_architecture.src.gpt import GPT, GPTConfig
    from phase3_components.src.char_tokenizer import CharTokenizer
    from phase3_components.src.synthetic_stories import generate_stories
    from phase3_components.src.text_data import get_random_batch, train_val_split

    torch.manual_seed(0)
    text = "\n\n".join(generate_stories(400, seed=0))
    tokenizer = CharTokenizer.from_text(text)
    train_tokens, val_tokens = train_val_split(np.array(tokenizer.encode(text)), val_fraction=0.1)
    block_size = 64
    get_batch = lambda split: get_random_batch(
        train_tokens if split == "train" else val_tokens, 16, block_size
    )
    model = GPT(
        GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=2, n_head=4, d_model=64)
    )
    config = TrainingConfig(max_steps=150, max_lr=3e-3, warmup_steps=15, grad_accum_steps=2, eval_interval=50)
    history = train(model, get_batch, config, progress=True)
    for record in history["eval"]:
        print(f"step {record['step']:>4}  train loss {record['train']:.3f}  val loss {record['val']:.3f}")
    prompt = torch.tensor([tokenizer.encode("Once upon a time")])
    print(tokenizer.decode(model.generate(prompt, 120, temperature=0.8)[0].tolist()))
