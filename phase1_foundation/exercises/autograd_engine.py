"""Your code for `phase1_foundation/src/autograd_engine.py`.

Exercises: value_ops, value_backward.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run value_ops`
(each exercise's name works).
The course's version is `phase1_foundation/src/autograd_engine.py`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from phase1_foundation.src.autograd_engine import Value


class ValueMethods:
    """Methods of `Value`: `self` is a Value (its __init__ sets what you read)."""

    def __add__(self, other) -> Value:
        raise NotImplementedError("Value.__add__ is yours to write (exercise value_ops)")

    def __mul__(self, other) -> Value:
        raise NotImplementedError("Value.__mul__ is yours to write (exercise value_ops)")

    def __pow__(self, exponent) -> Value:
        raise NotImplementedError("Value.__pow__ is yours to write (exercise value_ops)")

    def tanh(self) -> Value:
        raise NotImplementedError("Value.tanh is yours to write (exercise value_ops)")

    def exp(self) -> Value:
        raise NotImplementedError("Value.exp is yours to write (exercise value_ops)")

    def log(self) -> Value:
        raise NotImplementedError("Value.log is yours to write (exercise value_ops)")

    def relu(self) -> Value:
        raise NotImplementedError("Value.relu is yours to write (exercise value_ops)")

    def topological_order(self) -> list[Value]:
        """Every Value this one depends on, each after all of its inputs (self comes last).

        An iterative depth-first search (a recursive one would hit Python's recursion limit on
        long chains such as a sum of a thousand terms)."""
        raise NotImplementedError("Value.topological_order is yours to write (exercise value_backward)")

    def backward(self) -> None:
        """Fill .grad of every Value in the graph with d(self)/d(value); self.grad starts at 1.

        Gradients accumulate: call `zero_grad` (or set .grad = 0) on the leaves before a new pass."""
        raise NotImplementedError("Value.backward is yours to write (exercise value_backward)")
