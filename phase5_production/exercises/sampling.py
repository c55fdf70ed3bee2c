"""Your code for `phase5_production/src/sampling.py`.

Exercises: top_k, top_p.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run top_k`
(each exercise's name works).
The course's version is `phase5_production/src/sampling.py`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of every row [..., V]; set the others to -inf.

    Tokens tied with the k-th largest logit are all kept (as in nanoGPT), so a row may keep more
    than k entries only when there are exact ties. k >= V keeps every token (there are not more
    than k to choose from)."""
    raise NotImplementedError("top_k_filter is yours to write (exercise top_k)")


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability mass reaches p.

    Sort the probabilities in decreasing order, q_1 >= q_2 >= ... and keep token i while the mass
    of the tokens before it, q_1 + ... + q_{i-1}, is still below p. The most likely token is
    always kept (its mass-before is 0), so the result is never empty; p = 1 keeps every token."""
    raise NotImplementedError("top_p_filter is yours to write (exercise top_p)")
