"""Log-probabilities of token sequences under a causal language model — what DPO and PPO optimise.

A language model gives p(x_t | x_<t) at every position. The log-probability of a completion y
given a prompt x is the sum over the completion's tokens only:

    log pi(y | x) = sum_{t = |x|}^{|x| + |y| - 1}  log p(s_t | s_<t),     s = x ++ y

Logits at position t predict token t + 1, so with logits [B, T, V] for ids [B, T]:

    token_log_probs[b, j] = log_softmax(logits[b, j])[ids[b, j + 1]]        j = 0 .. T-2   -> [B, T-1]

and target position j belongs to the completion when  prompt_length <= j + 1 < length  (right
padding beyond `length` and the prompt are masked out).

DPO and PPO compare these log-probabilities with those of a frozen *reference* model (the
starting point of fine-tuning); `frozen_reference` makes one.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


def token_log_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, j+1] | ids[:, :j+1]) for every j: [B, T, V] logits, [B, T] ids -> [B, T-1]."""
    if logits.shape[:2] != ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ids {tuple(ids.shape)} disagree on [B, T]")
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, T-1, V]; position j predicts j+1
    targets = ids[:, 1:].unsqueeze(-1)  # [B, T-1, 1]
    return log_probs.gather(-1, targets).squeeze(-1)  # [B, T-1]


def completion_mask(lengths: torch.Tensor, prompt_length: int | torch.Tensor, T: int) -> torch.Tensor:
    """Bool [B, T-1]: True where target position j (token j+1) is a real completion token."""
    target_pos = torch.arange(1, T, device=lengths.device)  # [T-1] index of the predicted token
    prompt_length = torch.as_tensor(prompt_length, device=lengths.device)
    if bool((torch.as_tensor(lengths) <= prompt_length).any()):
        raise ValueError("every sequence needs at least one completion token (length > prompt_length)")
    starts = prompt_length.reshape(-1, 1) if prompt_length.dim() else prompt_length  # [B, 1] or scalar
    return (target_pos >= starts) & (target_pos < lengths.reshape(-1, 1))  # [B, T-1]


def sequence_log_probs(
    model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor, prompt_length: int | torch.Tensor
) -> torch.Tensor:
    """Sum of the completion tokens' log-probabilities under `model`: [B, T] ids -> [B]."""
    logits, _ = model(ids)  # [B, T, V]
    per_token = token_log_probs(logits, ids)  # [B, T-1]
    mask = completion_mask(lengths, prompt_length, ids.shape[1])  # [B, T-1]
    return (per_token * mask).sum(dim=-1)  # [B]


def frozen_reference(policy: nn.Module) -> nn.Module:
    """A copy of the policy with no trainable parameters, in eval mode: the DPO / PPO reference."""
    reference = copy.deepcopy(policy)
    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def check_frozen(reference: nn.Module) -> None:
    if any(p.requires_grad for p in reference.parameters()):
        raise ValueError("the reference model must be frozen: build it with frozen_reference(policy)")
