"""Your code for `phase4_training/src/dpo.py`.

Exercises: dpo_loss.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run dpo_loss`
(each exercise's name works).
The course's version is `phase4_training/src/dpo.py`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss for a batch of pairs (every argument [B] sequence log-probs) and its diagnostics."""
    raise NotImplementedError("dpo_loss is yours to write (exercise dpo_loss)")
