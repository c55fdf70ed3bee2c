"""Your code for `phase3_components/src/lr_schedules.py`.

Exercises: warmup_cosine.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run warmup_cosine`
(each exercise's name works).
The course's version is `phase3_components/src/lr_schedules.py`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def warmup_cosine_lr(
    step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """Linear warmup for `warmup_steps`, cosine decay to min_lr at `total_steps`, min_lr afterwards.

    warmup_steps = 0 means no warmup (pure cosine decay from step 0)."""
    raise NotImplementedError("warmup_cosine_lr is yours to write (exercise warmup_cosine)")
