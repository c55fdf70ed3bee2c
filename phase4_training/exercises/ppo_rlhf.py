"""Your code for `phase4_training/src/ppo_rlhf.py`.

Exercises: gae, ppo_clip.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run gae`
(each exercise's name works).
The course's version is `phase4_training/src/ppo_rlhf.py`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over [B, N] rewards and values; returns (advantages, returns).

    Walks backwards: A_t = delta_t + gamma * lam * A_{t+1}, delta_t = r_t + gamma * V_{t+1} - V_t,
    with V_N = 0 (the episode ends after the last token). returns = A + V (the value head's target)."""
    raise NotImplementedError("gae_advantages is yours to write (exercise gae)")


def ppo_clipped_objective(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip_eps: float = 0.2
) -> torch.Tensor:
    """-mean(min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)): the PPO policy loss (to minimise)."""
    raise NotImplementedError("ppo_clipped_objective is yours to write (exercise ppo_clip)")
