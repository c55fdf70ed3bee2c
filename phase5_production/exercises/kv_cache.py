"""Your code for `phase5_production/src/kv_cache.py`.

Exercises: kv_cache.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run kv_cache`
(each exercise's name works).
The course's version is `phase5_production/src/kv_cache.py`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from phase5_production.src.kv_cache import KVCache


class KVCacheMethods:
    """Methods of `KVCache`: `self` is a KVCache (its __init__ sets what you read)."""

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new keys/values [B, H_kv, T_new, Dh] of `layer`; return all [B, H_kv, T_total, Dh]."""
        raise NotImplementedError("KVCache.append is yours to write (exercise kv_cache)")
