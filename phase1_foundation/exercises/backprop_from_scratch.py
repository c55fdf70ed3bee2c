"""Your code for `phase1_foundation/src/backprop_from_scratch.py`.

Exercises: tanh_backward, gradient_check.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run tanh_backward`
(each exercise's name works).
The course's version is `phase1_foundation/src/backprop_from_scratch.py`: read it after you have tried.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from phase1_foundation.src.backprop_from_scratch import TinyNN


def numerical_gradients(params: dict, loss_fn: Callable[[dict], float], eps: float = 1e-05) -> dict:
    """Central differences: dL/dθ_i ≈ (L(θ + eps·e_i) - L(θ - eps·e_i)) / (2·eps), for every entry.

    `loss_fn(params)` must compute the loss from the arrays in `params`; they are perturbed in
    place one entry at a time and restored afterwards. Returns {name: gradient array}."""
    raise NotImplementedError("numerical_gradients is yours to write (exercise gradient_check)")


class TinyNNMethods:
    """Methods of `TinyNN`: `self` is a TinyNN (its __init__ sets what you read)."""

    def backward(self, y: np.ndarray) -> dict:
        """Gradients of mse_loss(forward(X), y) w.r.t. every parameter, from the cached forward pass."""
        raise NotImplementedError("TinyNN.backward is yours to write (exercise tanh_backward)")
