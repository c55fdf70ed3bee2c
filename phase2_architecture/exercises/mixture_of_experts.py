"""Your code for `phase2_architecture/src/mixture_of_experts.py`.

Exercises: moe_router, moe_dispatch, load_balancing.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run moe_router`
(each exercise's name works).
The course's version is `phase2_architecture/src/mixture_of_experts.py`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def route_top_k(gate_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_logits [N, E] -> (weights [N, k], indices [N, k]): top-k experts, softmax among their logits.

    Softmaxing only the selected logits makes each token's weights sum to 1 whatever k is (Mixtral);
    the router still learns through the relative size of the k chosen logits."""
    raise NotImplementedError("route_top_k is yours to write (exercise moe_router)")


def sort_pairs_by_expert(indices: torch.Tensor, keep: torch.Tensor, n_expert: int):
    """indices, keep [N, k] -> (order [M], token_of_pair [M], counts [E]) for the M kept pairs.

    Pair p = slot * N + token (slot-major). One stable argsort groups the pairs by expert, so
    expert e's pairs are the contiguous slice counts[:e].sum() : counts[:e+1].sum()."""
    raise NotImplementedError("sort_pairs_by_expert is yours to write (exercise moe_dispatch)")


def moe_ffn_sorted(x, gate_weight, gate_bias, w1, b1, w2, b2, top_k, capacity=None):
    """The same y as `moe_ffn_loop_reference`: one sort, per-expert matmuls on slices, one scatter-add."""
    raise NotImplementedError("moe_ffn_sorted is yours to write (exercise moe_dispatch)")


def load_balancing_loss(router_probs: torch.Tensor, expert_counts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's balancing loss  E * sum_i f_i * P_i  (Fedus et al. 2021, eq. 4).

    router_probs [N, E]: softmax of the gate logits over ALL experts (differentiable).
    expert_counts [E]: (token, slot) pairs routed to each expert (a count: no gradient).
    f_i = counts_i / sum(counts), the fraction of the assignments expert i got; P_i = mean_n probs[n, i].
    The gradient flows through P only: it lowers the probability of the experts that are over-used.
    Both f and P sum to 1, so the loss is 1 when both are uniform and E when one expert gets all.
    Taking counts (not indices) makes the data-parallel version the same function: sum the
    counts over the ranks (all_reduce) first."""
    raise NotImplementedError("load_balancing_loss is yours to write (exercise load_balancing)")
