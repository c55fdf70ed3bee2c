"""Your code for `phase3_components/src/bpe_tokenizer.py`.

Exercises: bpe_merges.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run bpe_merges`
(each exercise's name works).
The course's version is `phase3_components/src/bpe_tokenizer.py`: read it after you have tried.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def count_pairs(ids: Sequence[int]) -> Counter:
    """How often each adjacent pair occurs: [1, 2, 1, 2] -> {(1, 2): 2, (2, 1): 1}."""
    raise NotImplementedError("count_pairs is yours to write (exercise bpe_merges)")


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair` in `ids` (left to right) with `new_id`.

    merge_pair([1, 2, 2, 2, 3], (2, 2), 9) -> [1, 9, 2, 3]"""
    raise NotImplementedError("merge_pair is yours to write (exercise bpe_merges)")
