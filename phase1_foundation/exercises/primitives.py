"""Your code for `phase1_foundation/src/primitives.py`.

Exercises: softmax, cross_entropy.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run softmax`
(each exercise's name works).
The course's version is `phase1_foundation/src/primitives.py`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x - max) / sum exp(x - max): the same values, and no overflow (every exponent is <= 0)."""
    raise NotImplementedError("softmax is yours to write (exercise softmax)")


def logsumexp(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """log sum_i exp(x_i) = m + log sum_i exp(x_i - m), m = max(x): finite for any finite x."""
    raise NotImplementedError("logsumexp is yours to write (exercise softmax)")


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log softmax(x) = x - logsumexp(x), without ever forming a probability that could underflow."""
    raise NotImplementedError("log_softmax is yours to write (exercise softmax)")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean negative log-probability of the targets: logits [N, V], targets [N] -> scalar.

    -log p(t) = -(logits[t] - logsumexp(logits)) = logsumexp(logits) - logits[t]. Positions whose
    target is `ignore_index` are left out of the mean (padding), as in F.cross_entropy."""
    raise NotImplementedError("cross_entropy is yours to write (exercise cross_entropy)")
