"""Your code for `phase1_foundation/src/attention_mechanism.py`.

Exercises: causal_mask, attention.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run causal_mask`
(each exercise's name works).
The course's version is `phase1_foundation/src/attention_mechanism.py`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def causal_mask(T: int, device=None) -> torch.Tensor:
    """Boolean [T, T] mask, True where query i may attend key j, i.e. j <= i (lower triangle).

    Row i says which positions token i is allowed to look at: itself and everything before it,
    never the future. That is what makes a language model's prediction at position i depend
    only on tokens 0..i."""
    raise NotImplementedError("causal_mask is yours to write (exercise causal_mask)")


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ / sqrt(d), masked) @ v, written out step by step.

    Args:
        q: queries [..., Tq, d].
        k: keys    [..., Tk, d].
        v: values  [..., Tk, dv].
        mask: optional bool tensor broadcastable to [..., Tq, Tk]; True = may attend.

    Returns:
        out [..., Tq, dv] and the attention weights [..., Tq, Tk] (each row sums to 1).

    Raises:
        ValueError if a query row is fully masked: its softmax would be 0/0 = NaN. Every query
        must be allowed to see at least one key (a causal mask always allows the diagonal)."""
    raise NotImplementedError("scaled_dot_product_attention is yours to write (exercise attention)")
