"""Your code for `phase2_architecture/src/tiled_attention.py`.

Exercises: online_softmax.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run online_softmax`
(each exercise's name works).
The course's version is `phase2_architecture/src/tiled_attention.py`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def online_logsumexp(x: torch.Tensor, block: int) -> torch.Tensor:
    """log sum exp(x) over the last axis, reading x in blocks of `block` with a running max and sum."""
    raise NotImplementedError("online_logsumexp is yours to write (exercise online_softmax)")
