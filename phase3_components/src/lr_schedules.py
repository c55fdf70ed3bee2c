"""Learning-rate schedules as plain functions of the step number.

A schedule is just `lr = f(step)`; the training loop calls it before every optimizer step and
writes the value into the optimizer (`set_learning_rate`). Keeping schedules as pure functions
makes them trivial to plot and to test.

    linear_warmup_lr   0 -> max_lr over `warmup_steps`: Adam's second-moment estimate is noisy
                       for the first steps, and a small lr keeps early updates from blowing up.
    cosine_decay_lr    max_lr -> min_lr along half a cosine: fast learning early, small careful
                       steps at the end (equal to torch's CosineAnnealingLR).
    linear_decay_lr    max_lr -> min_lr in a straight line (equal to torch's LinearLR).
    warmup_cosine_lr   linear warmup, then cosine decay, then min_lr: the GPT-2/3, nanoGPT and
                       Chinchilla recipe.

Step convention: `step` counts optimizer steps from 0. Warmup uses (step + 1) / warmup_steps, so
the first update already has a non-zero lr and step warmup_steps - 1 reaches max_lr exactly
(this equals torch's LinearLR(start_factor=1/warmup_steps, total_iters=warmup_steps - 1)).

    warmup_cosine_lr(step):
        step <  W         max_lr * (step + 1) / W
        W <= step <= S    min_lr + (max_lr - min_lr) * (1 + cos(pi * (step - W) / (S - W))) / 2
        step >  S         min_lr
"""

from __future__ import annotations

import math

from phase1_foundation.src.validation import check_int, check_number


def _check_step_and_lrs(step: int, max_lr: float, min_lr: float) -> None:
    """Every schedule's shared arguments: a step count and two learning rates with min_lr <= max_lr."""
    check_int("step", step, minimum=0)
    check_number("max_lr", max_lr, low=0)
    check_number("min_lr", min_lr, low=0)
    if min_lr > max_lr:
        raise ValueError(f"min_lr ({min_lr}) is larger than max_lr ({max_lr}): swap them or lower min_lr")


def _check_warmup_within(warmup_steps: int, total_steps: int) -> None:
    """A warmup followed by a decay: 0 <= warmup_steps <= total_steps."""
    check_int("warmup_steps", warmup_steps, minimum=0)
    check_int("total_steps", total_steps, minimum=0)
    if total_steps < warmup_steps:
        raise ValueError(
            f"total_steps ({total_steps}) is smaller than warmup_steps ({warmup_steps}): "
            "the decay must end after the warmup; raise total_steps or lower warmup_steps"
        )


def linear_warmup_lr(step: int, *, max_lr: float, warmup_steps: int) -> float:
    """max_lr * (step + 1) / warmup_steps while step < warmup_steps, then max_lr."""
    _check_step_and_lrs(step, max_lr, 0.0)
    check_int("warmup_steps", warmup_steps, minimum=1)
    if step >= warmup_steps:
        return max_lr
    return max_lr * (step + 1) / warmup_steps


def cosine_decay_lr(step: int, *, max_lr: float, min_lr: float, total_steps: int) -> float:
    """Half a cosine from max_lr (step 0) to min_lr (step total_steps); min_lr afterwards.

    lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * step / total_steps)) / 2
    """
    _check_step_and_lrs(step, max_lr, min_lr)
    check_int("total_steps", total_steps, minimum=1)
    if step >= total_steps:
        return min_lr
    progress = step / total_steps  # 0 -> 1
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_decay_lr(step: int, *, max_lr: float, min_lr: float, total_steps: int) -> float:
    """A straight line from max_lr (step 0) to min_lr (step total_steps); min_lr afterwards."""
    _check_step_and_lrs(step, max_lr, min_lr)
    check_int("total_steps", total_steps, minimum=1)
    progress = min(step, total_steps) / total_steps
    return max_lr + (min_lr - max_lr) * progress


def warmup_cosine_lr(
    step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """Linear warmup for `warmup_steps`, cosine decay to min_lr at `total_steps`, min_lr afterwards.

    warmup_steps = 0 means no warmup (pure cosine decay from step 0).
    """
    _check_step_and_lrs(step, max_lr, min_lr)
    _check_warmup_within(warmup_steps, total_steps)
    if step < warmup_steps:
        return linear_warmup_lr(step, max_lr=max_lr, warmup_steps=warmup_steps)
    if step >= total_steps:
        return min_lr
    return cosine_decay_lr(
        step - warmup_steps, max_lr=max_lr, min_lr=min_lr, total_steps=total_steps - warmup_steps
    )


def warmup_linear_decay_lr(
    step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """Linear warmup, then a straight line down to min_lr at total_steps (the BERT recipe)."""
    _check_step_and_lrs(step, max_lr, min_lr)
    _check_warmup_within(warmup_steps, total_steps)
    if step < warmup_steps:
        return linear_warmup_lr(step, max_lr=max_lr, warmup_steps=warmup_steps)
    if step >= total_steps:
        return min_lr
    return linear_decay_lr(
        step - warmup_steps, max_lr=max_lr, min_lr=min_lr, total_steps=total_steps - warmup_steps
    )


def set_learning_rate(optimizer, lr: float) -> None:
    """Write `lr` into an optimizer: a torch.optim optimizer (every param group) or one of ours (.lr)."""
    check_number("lr", lr, low=0)
    if hasattr(optimizer, "param_groups"):
        for group in optimizer.param_groups:
            group["lr"] = lr
    elif hasattr(optimizer, "lr"):
        optimizer.lr = lr
    else:
        raise TypeError(f"{type(optimizer).__name__} has neither param_groups nor lr: pass an optimizer")
