"""Perplexity: how surprised a language model is by held-out text.

For a text of N scored tokens, the model assigns each token t_i a probability given the tokens
before it. The mean negative log-likelihood (NLL, in nats) and the perplexity are

    NLL = -(1/N) * sum_i log p(t_i | t_<i)          the cross-entropy loss, averaged over tokens
    PPL = exp(NLL)                                    "as unsure as a uniform choice among PPL tokens"

A model that knows nothing about a vocabulary of V tokens has PPL = V; a perfect model has 1.
Only real tokens count: targets equal to -100 (padding, unscored positions) are left out of both
the sum and N — averaging per batch and then over batches would weight short batches wrongly.

    perplexity_from_batches(model, batches)     batches of (x [B, T], y [B, T]) with -100 = ignore
    perplexity(model, token_ids, block_size)    a long token stream cut into windows of block_size

`perplexity` scores every token of the stream (except the first, which has no context) exactly
once, in consecutive non-overlapping windows; each window starts a fresh context, so tokens at
the start of a window see less history than they would in a sliding evaluation.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from phase1_foundation.src.validation import check_int


@torch.no_grad()
def total_nll(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """(sum of -log p(y | x) over targets != -100, number of such targets) for one batch."""
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(
            f"x and y must both be [B, T] with the same shape, got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    logits, _ = model(x)  # [B, T, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp16/bf16 -> fp32, fp64 stays
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum"
    )  # sum over real tokens
    return nll.item(), int((y != -100).sum())


@torch.no_grad()
def perplexity_from_batches(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, float]:
    """{"nll": mean NLL per real token (nats), "perplexity": exp(nll), "tokens": N} over all batches."""
    was_training = model.training
    model.eval()
    try:
        nll_sum, count = 0.0, 0
        for x, y in batches:
            batch_nll, batch_count = total_nll(model, x, y)
            nll_sum += batch_nll
            count += batch_count
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(
            "no scored tokens (every target is -100 or there were no batches); nothing to evaluate."
        )
    nll = nll_sum / count
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": count}


def stream_to_windows(
    token_ids, block_size: int, batch_size: int = 8
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut a token stream into batches of non-overlapping windows (x, y), y = x shifted by one.

    The last, shorter window is padded with -100 targets (and token 0 inputs that are never
    scored), so every token after the first is scored exactly once.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()  # [N]
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to score one prediction, got {ids.numel()}.")
    check_int("block_size", block_size, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    xs, ys = [], []
    for start in range(0, ids.numel() - 1, block_size):
        chunk = ids[start : start + block_size + 1]  # up to block_size + 1 tokens
        x = torch.zeros(block_size, dtype=torch.long)
        y = torch.full((block_size,), -100, dtype=torch.long)
        n = chunk.numel() - 1  # predictions in this window
        x[:n] = chunk[:-1]
        y[:n] = chunk[1:]
        xs.append(x)
        ys.append(y)
    return [
        (torch.stack(xs[i : i + batch_size]), torch.stack(ys[i : i + batch_size]))  # [b, T] each
        for i in range(0, len(xs), batch_size)
    ]


def perplexity(model: nn.Module, token_ids, block_size: int | None = None, batch_size: int = 8) -> dict:
    """Perplexity of `model` on a held-out token stream (see the module docstring)."""
    if block_size is None:
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError("pass block_size: the model has no .config.block_size to read it from.")
        block_size = config.block_size
    return perplexity_from_batches(model, stream_to_windows(token_ids, block_size, batch_size))
