"""Your code for `phase3_components/src/gradient_clipping.py`.

Exercises: clip_grad_norm.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run clip_grad_norm`
(each exercise's name works).
The course's version is `phase3_components/src/gradient_clipping.py`: read it after you have tried.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def global_grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients concatenated into one vector (parameters without grad are skipped)."""
    raise NotImplementedError("global_grad_norm is yours to write (exercise clip_grad_norm)")


def clip_grad_norm(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = True,
) -> torch.Tensor:
    """Scale all gradients in place so their global norm is at most max_norm; return the norm before.

    parameters: tensors (e.g. model.parameters()); max_norm > 0; norm_type 2.0 (default), 1.0, inf, ..."""
    raise NotImplementedError("clip_grad_norm is yours to write (exercise clip_grad_norm)")
