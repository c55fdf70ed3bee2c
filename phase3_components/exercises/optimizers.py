"""Your code for `phase3_components/src/optimizers.py`.

Exercises: adamw.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run adamw`
(each exercise's name works).
The course's version is `phase3_components/src/optimizers.py`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from phase3_components.src.optimizers import Adam, AdamW


class AdamMethods:
    """Methods of `Adam`: `self` is a Adam (its __init__ sets what you read)."""

    @torch.no_grad()
    def step(self) -> None:
        raise NotImplementedError("Adam.step is yours to write (exercise adamw)")


class AdamWMethods:
    """Methods of `AdamW`: `self` is a AdamW (its __init__ sets what you read)."""

    def _decoupled_decay(self, p: torch.Tensor) -> None:
        raise NotImplementedError("AdamW._decoupled_decay is yours to write (exercise adamw)")
