"""A compact training toolkit for language models: evaluation, a training loop, checkpoints.

A model here is anything called as `model(x, y) -> (logits, loss)` (the GPT of `gpt.py`), and
data comes from a `get_batch(split) -> (x, y)` function returning LongTensors [B, T] for the
split "train" or "val". Phase 4 builds its full training loop on these pieces.

    estimate_loss(model, get_batch, eval_batches)         mean loss over a few batches per split
    train_model(model, get_batch, steps=..., lr=...)    AdamW + warmup/cosine LR + grad clipping
    save_checkpoint(path, model, optimizer, step, ...)  atomic: a crash never leaves a broken file
    read_checkpoint_file(path)                          the one reader: weights_only=True, onto the CPU
    load_checkpoint(path, model, optimizer)             read_checkpoint_file, then restore model/optimizer
    check_finite_weights(state_dict, path)              NaN / inf weights are refused at load
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from phase1_foundation.src.primitives import Linear
from phase1_foundation.src.validation import check_int, check_number
from phase2_architecture.src.atomic_files import atomic_write

GetBatch = Callable[[str], "tuple[torch.Tensor, torch.Tensor]"]


@torch.no_grad()
def estimate_loss(
    model: nn.Module, get_batch: GetBatch, eval_batches: int, splits: tuple[str, ...] = ("train", "val")
) -> dict[str, float]:
    """Average loss over `eval_batches` batches of each split, in eval mode (no dropout).

    A single batch's loss is noisy; averaging a few gives a curve you can compare between runs.
    The model's train/eval mode is restored afterwards.
    """
    check_int("eval_batches", eval_batches, minimum=1)
    was_training = model.training
    model.eval()
    try:
        out = {}
        for split in splits:
            losses = torch.zeros(eval_batches)
            for i in range(eval_batches):
                x, y = get_batch(split)
                _, loss = model(x, y)
                losses[i] = loss.item()
            out[split] = losses.mean().item()
    finally:
        model.train(was_training)
    return out


def warmup_cosine(step: int, lr: float, min_lr: float, warmup_steps: int, steps: int) -> float:
    """The learning rate at optimizer step `step` (counted from 0): linear warmup, then half a cosine.

        step <  W        lr * (step + 1) / W                                   (0 -> lr)
        W <= step <= S   min_lr + (lr - min_lr) * (1 + cos(pi * (step - W) / (S - W))) / 2   (lr -> min_lr)

    Warmup keeps Adam's first, noisy updates small; the cosine takes smaller steps as the loss
    settles. Phase 3 teaches schedules in full (`lr_schedules.warmup_cosine_lr`, tested equal to this).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if steps == warmup_steps:
        return min_lr
    progress = min(step - warmup_steps, steps - warmup_steps) / (steps - warmup_steps)  # 0 -> 1
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def weight_decay_groups(
    model: nn.Module, weight_decay: float, exclude: Iterable[nn.Parameter] = ()
) -> list[dict]:
    """AdamW's two parameter groups, by one rule: weight decay on the matmul weights, none on the rest.

    Decayed: the weight of every `nn.Linear` (and of Phase 1's `Linear`), and every parameter with >= 3
    dimensions (a stack of per-expert matrices [E, C, F]): the matrices an input is multiplied by.
    Not decayed: biases of any shape (a stack of expert biases [E, F] is 2-D), norm gains, and embedding
    tables. Decay pulls a parameter towards 0, a sensible prior for a matrix (smaller weights, smoother
    function) but not for a gain (its neutral value is 1) or an offset. An embedding row gets a gradient only
    in batches that hold its token, while AdamW shrinks every row at every step, so decay would pull rare
    tokens' vectors to 0 between their appearances. A table tied to the output head is that head's matmul
    weight, with a gradient for every row at every step: it is decayed. Raw matrices that no `Linear` holds
    (LoRA's A and B) count as "the rest": fine-tuning here runs without weight decay.

    `exclude`: parameters another optimizer updates (Muon's hidden matrices); they are in neither group.
    Only parameters with requires_grad are listed; each appears once even when tied.
    """
    check_number("weight_decay", weight_decay, low=0)
    matmul_weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, Linear))}
    excluded = {id(p) for p in exclude}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in excluded]
    decay = [p for p in params if id(p) in matmul_weights or p.dim() >= 3]
    no_decay = [p for p in params if not (id(p) in matmul_weights or p.dim() >= 3)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(
    model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    """AdamW over `weight_decay_groups(model, weight_decay)`: decay on the matmul weights only."""
    return torch.optim.AdamW(weight_decay_groups(model, weight_decay), lr=lr, betas=betas)


def train_model(
    model: nn.Module,
    get_batch: GetBatch,
    *,
    steps: int,
    lr: float,
    min_lr: float | None = None,
    warmup_steps: int = 0,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    grad_clip: float = 1.0,
    eval_interval: int = 0,
    eval_batches: int = 10,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train for `steps` optimizer steps and return the history, one dict per step.

    Each step: lr from the schedule (linear warmup for `warmup_steps`, cosine decay to `min_lr`
    at `steps`; `min_lr=None` means a constant lr after warmup), forward, backward, clip the global
    gradient norm to `grad_clip` (0 = no clipping), AdamW step. A given `optimizer` (e.g. restored
    from a checkpoint) is used instead of a fresh `make_adamw`; the schedule sets its learning rate at
    every step.

    History entries: {"step", "lr", "loss" (this batch), "grad_norm", "time_s"} and, every
    `eval_interval` steps and at the last step (0 = only at the last), {"train_loss", "val_loss"} from
    `estimate_loss`. Off is 0, as in Phase 4's TrainingConfig and on the MoE's command line.
    """
    check_int("steps", steps, minimum=1)
    check_number("lr", lr, above=0)
    if min_lr is not None and not 0 <= min_lr <= lr:
        raise ValueError(f"min_lr must be in [0, lr={lr}], got {min_lr}.")
    if not 0 <= warmup_steps <= steps:
        raise ValueError(f"warmup_steps must be in [0, steps={steps}], got {warmup_steps}.")
    check_int("eval_interval (0 = only at the last step)", eval_interval, minimum=0)
    check_number("grad_clip (0 = no clipping)", grad_clip, low=0)

    if optimizer is None:
        optimizer = make_adamw(model, lr, weight_decay, betas)
    final_lr = lr if min_lr is None else min_lr
    history: list[dict] = []
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), disable=not progress, desc="training")
    for step in bar:
        step_lr = warmup_cosine(step, lr, final_lr, warmup_steps, steps)
        for group in optimizer.param_groups:
            group["lr"] = step_lr

        x, y = get_batch("train")
        _, loss = model(x, y)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"loss became {loss.item()} at step {step}; lower the learning rate or enable grad_clip."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).item()
        else:
            grad_norm = math.sqrt(
                sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None)
            )
        optimizer.step()

        record = {
            "step": step,
            "lr": step_lr,
            "loss": loss.item(),
            "grad_norm": grad_norm,
            "time_s": time.perf_counter() - start,
        }
        if (eval_interval and step % eval_interval == 0) or step == steps - 1:
            losses = estimate_loss(model, get_batch, eval_batches)
            record["train_loss"], record["val_loss"] = losses["train"], losses["val"]
            bar.set_postfix(train=f"{losses['train']:.3f}", val=f"{losses['val']:.3f}")
        history.append(record)
    return history


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

_SAFE_SCALARS = (type(None), bool, int, float, str)


def _check_safe(value, where: str) -> None:
    """Raise TypeError unless `value` can be read back by torch.load(weights_only=True)."""
    if isinstance(value, _SAFE_SCALARS) or isinstance(value, torch.Tensor):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_safe(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_safe(key, f"{where} key {key!r}")
            _check_safe(item, f"{where}[{key!r}]")
        return
    hint = (
        " (for a dataclass such as GPTConfig, pass dataclasses.asdict(config))"
        if hasattr(value, "__dataclass_fields__")
        else ""
    )
    raise TypeError(
        f"checkpoint entry {where} is a {type(value).__name__}, which torch.load(weights_only=True) "
        f"cannot read back; store plain numbers, strings, lists, dicts or tensors{hint}."
    )


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    **extra,
) -> None:
    """Write model (and optimizer) state, the step and any `extra` entries to `path`, atomically.

    Through `atomic_write`: the data goes to a temporary file in the same folder, is flushed to
    disk, then renamed over `path` with os.replace (atomic on POSIX and Windows). If anything fails
    half-way, the previous checkpoint at `path` is untouched and the temporary file is removed.
    """
    _check_safe(extra, "extra")
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
        **extra,
    }
    with atomic_write(path) as f:
        torch.save(payload, f)


class NonFiniteWeightsError(ValueError):
    """A checkpoint whose weights hold NaN or infinite values."""


def check_finite_weights(state_dict: dict, path: str | os.PathLike) -> None:
    """Raise NonFiniteWeightsError naming the file and the first tensor with a NaN or an inf.

    A checksum only proves the bytes are the ones written; weights that diverged before the save (or a
    file written without a checksum) would load and produce garbage, so every loader checks this."""
    for name, tensor in state_dict.items():
        floating = isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
        if floating and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteWeightsError(
                f"checkpoint {os.fspath(path)!r}: tensor {name!r} holds {bad} NaN/inf value(s) of "
                f"{tensor.numel()}; the weights are unusable: load an earlier checkpoint or train again"
            )


def read_checkpoint_file(
    path: str | os.PathLike, remedy: str = "write it again with save_checkpoint"
) -> dict:
    """The checkpoint dict stored at `path`, read safely: every checkpoint reader of the project uses this.

    torch.load with weights_only=True (no code from the file runs) and map_location="cpu" (a GPU
    never holds a second copy of the weights). FileNotFoundError for a missing file; ValueError, one
    line ending in `remedy`, for an empty, truncated, corrupt or foreign file, or one holding no dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}; check the path or train first.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # empty or truncated file, random bytes, a pickle with forbidden objects, ...
        reason = (str(err).strip().splitlines() or ["no details"])[0][:200]
        empty = " (it is empty)" if os.path.getsize(path) == 0 else ""
        raise ValueError(
            f"{path!r} is not a readable checkpoint{empty}: the file is corrupt or truncated, or not a "
            f"torch file ({type(err).__name__}: {reason}); {remedy}."
        ) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path!r} holds a {type(checkpoint).__name__}, not a checkpoint dict; {remedy}.")
    return checkpoint


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict:
    """Restore `model` (and `optimizer`) from `path`; return the whole checkpoint dict (step, extras).

    Read by `read_checkpoint_file`; the state is then copied into the model's own tensors, wherever
    they live. Raises FileNotFoundError for a missing file, ValueError for a corrupt or truncated file,
    one that does not match the model, or one whose weights hold NaN/inf (NonFiniteWeightsError).
    """
    path = os.fspath(path)
    checkpoint = read_checkpoint_file(path)
    if "model" not in checkpoint:
        raise ValueError(f"{path!r} holds no 'model' state; it was not written by save_checkpoint.")
    check_finite_weights(checkpoint["model"], path)  # before the model's own weights are touched
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {path!r} does not match this model (different configuration?): {err}"
        ) from err
    if optimizer is not None:
        if checkpoint.get("optimizer") is None:
            raise ValueError(f"checkpoint {path!r} has no optimizer state; load it without an optimizer.")
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError) as err:
            raise ValueError(f"optimizer state in {path!r} does not match this optimizer: {err}") from err
    return checkpoint
