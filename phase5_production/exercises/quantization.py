"""Your code for `phase5_production/src/quantization.py`.

Exercises: int8_quantization.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run int8_quantization`
(each exercise's name works).
The course's version is `phase5_production/src/quantization.py`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def quantize_per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] float -> (q int8 [out, in], scale float32 [out]) with W ~= q * scale[:, None].

    A row of zeros gets scale 1.0 (any scale reproduces it exactly with q = 0)."""
    raise NotImplementedError("quantize_per_channel_int8 is yours to write (exercise int8_quantization)")
