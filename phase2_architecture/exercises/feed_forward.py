"""Your code for `phase2_architecture/src/feed_forward.py`.

Exercises: swiglu.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run swiglu`
(each exercise's name works).
The course's version is `phase2_architecture/src/feed_forward.py`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from phase2_architecture.src.feed_forward import SwiGLUFeedForward


class SwiGLUFeedForwardMethods:
    """Methods of `SwiGLUFeedForward`: `self` is a SwiGLUFeedForward (its __init__ sets what you read)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("SwiGLUFeedForward.forward is yours to write (exercise swiglu)")
