"""Your code for `phase2_architecture/src/norms.py`.

Exercises: layernorm, rmsnorm.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run layernorm`
(each exercise's name works).
The course's version is `phase2_architecture/src/norms.py`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from phase2_architecture.src.norms import LayerNorm, RMSNorm


class LayerNormMethods:
    """Methods of `LayerNorm`: `self` is a LayerNorm (its __init__ sets what you read)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("LayerNorm.forward is yours to write (exercise layernorm)")


class RMSNormMethods:
    """Methods of `RMSNorm`: `self` is a RMSNorm (its __init__ sets what you read)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("RMSNorm.forward is yours to write (exercise rmsnorm)")
