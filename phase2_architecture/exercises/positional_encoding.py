"""Your code for `phase2_architecture/src/positional_encoding.py`.

Exercises: rope.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run rope`
(each exercise's name works).
The course's version is `phase2_architecture/src/positional_encoding.py`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each feature pair (x[2i], x[2i+1]) of x [..., T, Dh] by the angle whose cos/sin are [T, Dh/2].

    [y0]   [cos  -sin] [x0]
    [y1] = [sin   cos] [x1]        (a 2-D rotation; complex multiplication by e^{j angle})"""
    raise NotImplementedError("apply_rope is yours to write (exercise rope)")
