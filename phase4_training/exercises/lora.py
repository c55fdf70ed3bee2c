"""Your code for `phase4_training/src/lora.py`.

Exercises: lora.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run lora`
(each exercise's name works).
The course's version is `phase4_training/src/lora.py`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from phase4_training.src.lora import LoRALinear


class LoRALinearMethods:
    """Methods of `LoRALinear`: `self` is a LoRALinear (its __init__ sets what you read)."""

    def delta_weight(self) -> torch.Tensor:
        """The update dW = (alpha / r) * B A, shaped like the base weight [out, in]."""
        raise NotImplementedError("LoRALinear.delta_weight is yours to write (exercise lora)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("LoRALinear.forward is yours to write (exercise lora)")

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + dW. Afterwards forward() is a single plain matmul."""
        raise NotImplementedError("LoRALinear.merge is yours to write (exercise lora)")

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - dW: restores the base weights (up to float rounding)."""
        raise NotImplementedError("LoRALinear.unmerge is yours to write (exercise lora)")
