"""The building blocks of every language model, written by hand: Linear, Embedding, softmax,
log-softmax, cross-entropy and SiLU (the pieces Stanford CS336's first assignment asks for).

Each is a few lines of tensor algebra; autograd differentiates them. Each is tested equal to
torch's version on random inputs (tests/test_primitives.py), and Phase 2's GPT gives the same
logits and loss when its torch modules are replaced by these.

    Linear          y = x W^T + b                 W [out, in], init U(-1/sqrt(in), 1/sqrt(in)) like torch
    Embedding       y = W[idx]                    a table lookup; W [V, C], init N(0, 1) like torch
    softmax         exp(x - max) / sum exp(x - max)
    log_softmax     x - logsumexp(x)
    logsumexp       m + log sum exp(x - m),  m = max(x)
    cross_entropy   mean over targets t of  logsumexp(logits) - logits[t]   (targets = -100 ignored)
    silu            x * sigmoid(x)

The log-sum-exp trick: exp(1000) is inf in float32 (the largest float32 is ~3.4e38 = e^88.7), so a
naive softmax of logits around 1000 returns inf / inf = NaN. Softmax does not change when a
constant is subtracted from every logit (the constant cancels between numerator and denominator),
so subtract the maximum first: every exponent is then <= 0, the largest term is exactly 1, and
nothing overflows. For the same reason log-softmax is computed as x - logsumexp(x), never as
log(softmax(x)) (a probability that underflows to 0 would give log 0 = -inf).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class Linear(nn.Module):
    """y = x W^T + b for x [..., in_features] -> [..., out_features]; state_dict keys as nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)  # torch's default: output variance ~ input variance / 3
        weight = torch.empty(out_features, in_features).uniform_(-bound, bound)  # [out, in]
        self.weight = nn.Parameter(weight)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))  # [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects [..., {self.in_features}] inputs, got {tuple(x.shape)}.")
        y = x @ self.weight.t()  # [..., out]
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        has_bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={has_bias}"


class Embedding(nn.Module):
    """idx [...] (ints in [0, V)) -> weight[idx] [..., C]: row i of the table is token i's vector."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.randn(num_embeddings, embedding_dim))  # [V, C]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"Embedding expects integer token ids, got {idx.dtype}.")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_embeddings):
            raise ValueError(
                f"token ids must be in [0, {self.num_embeddings}), "
                f"got min {int(idx.min())}, max {int(idx.max())}."
            )
        # Indexing is a gather; its gradient adds each output row's gradient into the row it came from.
        return self.weight[idx]  # [..., C]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


# ---------------------------------------------------------------------------------------------
# Softmax and friends
# ---------------------------------------------------------------------------------------------


def naive_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x) / sum exp(x), the formula as written: overflows to NaN once a logit exceeds ~88 (float32)."""
    e = torch.exp(x)
    return e / e.sum(dim=dim, keepdim=True)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x - max) / sum exp(x - max): the same values, and no overflow (every exponent is <= 0)."""
    m = x.amax(dim=dim, keepdim=True).detach()  # a constant shift: it cancels, so no gradient is needed
    e = torch.exp(x - m)  # in (0, 1], the largest is exactly 1
    return e / e.sum(dim=dim, keepdim=True)


def logsumexp(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """log sum_i exp(x_i) = m + log sum_i exp(x_i - m), m = max(x): finite for any finite x."""
    m = x.amax(dim=dim, keepdim=True).detach()
    out = m + torch.log(torch.exp(x - m).sum(dim=dim, keepdim=True))
    return out if keepdim else out.squeeze(dim)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log softmax(x) = x - logsumexp(x), without ever forming a probability that could underflow."""
    return x - logsumexp(x, dim=dim, keepdim=True)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean negative log-probability of the targets: logits [N, V], targets [N] -> scalar.

    -log p(t) = -(logits[t] - logsumexp(logits)) = logsumexp(logits) - logits[t]. Positions whose
    target is `ignore_index` are left out of the mean (padding), as in F.cross_entropy.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy expects logits [N, V] and targets [N], got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}; flatten batch and time first (logits.flatten(0, 1), targets.flatten())."
        )
    keep = targets != ignore_index  # [N]
    if not keep.any():
        raise ValueError(f"every target is ignore_index={ignore_index}: there is nothing to average.")
    logits, targets = logits[keep], targets[keep]  # [n, V], [n]
    if targets.min() < 0 or targets.max() >= logits.shape[1]:
        raise ValueError(f"targets must be in [0, {logits.shape[1]}) or {ignore_index}.")
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)  # [n]
    return (logsumexp(logits, dim=-1) - target_logit).mean()


# ---------------------------------------------------------------------------------------------
# Activation
# ---------------------------------------------------------------------------------------------


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """1 / (1 + exp(-x)), written so that no exponent is positive (no overflow for large |x|).

    x >= 0:  1 / (1 + exp(-x))        x < 0:  exp(x) / (1 + exp(x))   (the same value, rearranged)
    """
    e = torch.exp(torch.where(x >= 0, -x, x))  # exp(-|x|) in (0, 1], differentiable on each side of 0
    return torch.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU / Swish-1: x * sigmoid(x) (the gate of SwiGLU)."""
    return x * sigmoid(x)
