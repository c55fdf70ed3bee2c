"""Your code for `phase4_training/src/reward_model.py`.

Exercises: bradley_terry.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run bradley_terry`
(each exercise's name works).
The course's version is `phase4_training/src/reward_model.py`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged over the batch (logsigmoid: stable for any margin)."""
    raise NotImplementedError("bradley_terry_loss is yours to write (exercise bradley_terry)")
