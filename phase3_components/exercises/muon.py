"""Your code for `phase3_components/src/muon.py`.

Exercises: newton_schulz.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m course_exercises run newton_schulz` (each exercise's name works).
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
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Approximately orthogonalise a matrix G [m, n]: U S Vᵀ -> U S' Vᵀ with S' ~ 1 (returned in `dtype`)."""
    raise NotImplementedError("newton_schulz is yours to write (exercise newton_schulz)")
