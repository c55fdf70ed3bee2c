"""Your code for `phase3_components/src/muon.py`.

Exercises: newton_schulz.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run newton_schulz`
(each exercise's name works).
The course's version is `phase3_components/src/muon.py`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from phase3_components.src.muon import NS_COEFFICIENTS


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-07,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Approximately orthogonalise G [..., m, n], each [m, n] matrix on its own: U S Vᵀ -> U S' Vᵀ, S' ~ 1.

    Returned in `dtype`, the dtype the iteration runs in; None = the one this machine runs fastest
    (hardware.choose_newton_schulz_dtype: bf16 where it is native and measured faster, else fp32).
    The scaling to norm 1 happens in fp32 (or float64) BEFORE the cast: a gradient of size 1e-6 is
    below fp16's normal range, and cast first it would lose most of its bits."""
    raise NotImplementedError("newton_schulz is yours to write (exercise newton_schulz)")
