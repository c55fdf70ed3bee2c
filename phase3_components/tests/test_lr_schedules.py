"""Learning-rate schedules: equal to torch.optim.lr_scheduler where torch has them, and
hand-computed values at every boundary."""

import math

import pytest
import torch

from phase2_architecture.src.training_utils import warmup_cosine
from phase3_components.src.lr_schedules import (
    cosine_decay_lr,
    linear_decay_lr,
    linear_warmup_lr,
    set_learning_rate,
    warmup_cosine_lr,
    warmup_linear_decay_lr,
)
from phase3_components.src.optimizers import AdamW


def torch_lrs(make_scheduler, n_steps: int, max_lr: float) -> list[float]:
    """The lr torch's scheduler gives at steps 0..n_steps-1 (read before each optimizer step)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=max_lr)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(n_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


def test_cosine_decay_equals_torch_cosine_annealing():
    max_lr, min_lr, total = 3e-3, 1e-4, 50
    ref = torch_lrs(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total, eta_min=min_lr),
        total + 1,
        max_lr,
    )
    ours = [cosine_decay_lr(s, max_lr=max_lr, min_lr=min_lr, total_steps=total) for s in range(total + 1)]
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_linear_decay_equals_torch_linear_lr():
    max_lr, min_lr, total = 2e-3, 5e-4, 40
    ref = torch_lrs(
        lambda o: torch.optim.lr_scheduler.LinearLR(
            o, start_factor=1.0, end_factor=min_lr / max_lr, total_iters=total
        ),
        total + 10,
        max_lr,
    )
    ours = [linear_decay_lr(s, max_lr=max_lr, min_lr=min_lr, total_steps=total) for s in range(total + 10)]
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_linear_warmup_equals_torch_linear_lr():
    max_lr, warmup = 1e-3, 10
    ref = torch_lrs(
        lambda o: torch.optim.lr_scheduler.LinearLR(
            o, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1
        ),
        25,
        max_lr,
    )
    ours = [linear_warmup_lr(s, max_lr=max_lr, warmup_steps=warmup) for s in range(25)]
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_warmup_cosine_equals_torch_sequential_schedule():
    max_lr, min_lr, warmup, total = 6e-4, 6e-5, 10, 60
    ref = torch_lrs(
        lambda o: torch.optim.lr_scheduler.SequentialLR(
            o,
            schedulers=[
                torch.optim.lr_scheduler.LinearLR(
                    o, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1
                ),
                torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total - warmup, eta_min=min_lr),
            ],
            milestones=[warmup],
        ),
        total + 1,
        max_lr,
    )
    ours = [
        warmup_cosine_lr(s, max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup, total_steps=total)
        for s in range(total + 1)
    ]
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12)
    # and through LambdaLR, with our function as the multiplier
    ref_lambda = torch_lrs(
        lambda o: torch.optim.lr_scheduler.LambdaLR(
            o,
            lambda s: warmup_cosine_lr(
                s, max_lr=1.0, min_lr=min_lr / max_lr, warmup_steps=warmup, total_steps=total
            ),
        ),
        total + 1,
        max_lr,
    )
    assert ours == pytest.approx(ref_lambda, rel=1e-9, abs=1e-12)


def test_warmup_cosine_equals_the_phase2_training_loop_schedule():
    """Phase 2's train_model carries a small inline copy of this schedule; the two agree step for step."""
    for max_lr, min_lr, warmup, total in [(6e-4, 6e-5, 10, 60), (1.0, 0.0, 0, 7), (3e-3, 3e-3, 5, 5)]:
        ours = [
            warmup_cosine_lr(s, max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup, total_steps=total)
            for s in range(total)
        ]
        phase2 = [warmup_cosine(s, max_lr, min_lr, warmup, total) for s in range(total)]
        assert ours == pytest.approx(phase2, rel=1e-12, abs=0)


def test_warmup_cosine_boundary_values_by_hand():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    assert warmup_cosine_lr(0, **kw) == pytest.approx(0.25)  # (0 + 1) / 4: the first step already learns
    assert warmup_cosine_lr(3, **kw) == pytest.approx(1.0)  # warmup reaches max_lr at step W - 1
    assert warmup_cosine_lr(4, **kw) == pytest.approx(1.0)  # cosine starts at max_lr
    assert warmup_cosine_lr(9, **kw) == pytest.approx(0.55)  # halfway: (max + min) / 2
    assert warmup_cosine_lr(14, **kw) == pytest.approx(0.1)  # min_lr at total_steps
    assert warmup_cosine_lr(1000, **kw) == pytest.approx(0.1)  # and after
    assert warmup_cosine_lr(0, max_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=10) == 1.0  # no warmup
    # a fifth of the way through the cosine (step W + 2 of 10 decay steps)
    assert warmup_cosine_lr(6, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    quarter = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))  # = 0.1 + 0.9 * 0.8536
    assert cosine_decay_lr(25, max_lr=1.0, min_lr=0.1, total_steps=100) == pytest.approx(quarter)


def test_warmup_linear_decay_by_hand():
    kw = dict(max_lr=1.0, min_lr=0.0, warmup_steps=2, total_steps=12)
    values = [warmup_linear_decay_lr(s, **kw) for s in range(14)]
    expected = [0.5, 1.0] + [1.0 - k / 10 for k in range(10)] + [0.0, 0.0]
    assert values == pytest.approx(expected)


def test_schedules_are_monotone_where_they_should_be():
    kw = dict(max_lr=3e-4, min_lr=3e-5, warmup_steps=20, total_steps=200)
    lrs = [warmup_cosine_lr(s, **kw) for s in range(250)]
    assert all(a < b for a, b in zip(lrs[:19], lrs[1:20]))  # strictly rising during warmup
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:]))  # never rising afterwards
    assert min(lrs[20:]) == pytest.approx(3e-5) and max(lrs) == pytest.approx(3e-4)
    assert lrs[0] == pytest.approx(3e-4 / 20)  # warmup starts below min_lr, from max_lr / W


def test_bad_arguments():
    with pytest.raises(ValueError, match="min_lr"):
        warmup_cosine_lr(0, max_lr=0.1, min_lr=1.0, warmup_steps=1, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine_lr(0, max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=5)
    with pytest.raises(ValueError, match="step must be a non-negative integer, got -1"):
        warmup_cosine_lr(-1, max_lr=1.0, min_lr=0.1, warmup_steps=1, total_steps=10)
    with pytest.raises(ValueError, match="warmup_steps must be a positive integer, got 0"):
        linear_warmup_lr(0, max_lr=1.0, warmup_steps=0)
    with pytest.raises(ValueError, match="max_lr must be a finite number >= 0, got inf"):
        cosine_decay_lr(0, max_lr=float("inf"), min_lr=0.0, total_steps=10)
    with pytest.raises(ValueError, match="total_steps .3. is smaller than warmup_steps .5."):
        warmup_linear_decay_lr(0, max_lr=1.0, min_lr=0.0, warmup_steps=5, total_steps=3)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got -0.1"):
        set_learning_rate(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), -0.1)
    with pytest.raises(TypeError, match="param_groups"):
        set_learning_rate(object(), 0.1)


def test_set_learning_rate_on_both_kinds_of_optimizer():
    p = torch.zeros(2, requires_grad=True)
    ours, ref = AdamW([p], lr=1.0), torch.optim.AdamW([p], lr=1.0)
    set_learning_rate(ours, 0.25)
    set_learning_rate(ref, 0.25)
    assert ours.lr == 0.25 and ref.param_groups[0]["lr"] == 0.25
