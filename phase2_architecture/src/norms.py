"""Normalisation layers from scratch: LayerNorm and RMSNorm.

A deep stack of residual blocks keeps adding to the same vector ("the residual stream"). Without
normalisation the scale of that vector drifts with depth and training becomes unstable. Both
layers below rescale each token's feature vector independently (they never mix tokens or batch
elements, unlike BatchNorm), then apply a learned per-feature gain.

LayerNorm (Ba et al., 2016), over the last dimension of size C:

    mu      = mean(x)                          # [..., 1]
    var     = mean((x - mu)^2)                 # [..., 1]   biased variance (divide by C)
    y       = (x - mu) / sqrt(var + eps) * weight + bias

RMSNorm (Zhang & Sennrich, 2019), used by Llama, Mistral, ...: skip the centring and the bias,
divide by the root-mean-square only. One reduction instead of two, and it works as well:

    rms     = sqrt(mean(x^2) + eps)            # [..., 1]
    y       = x / rms * weight

Both are proven equal to `torch.nn.LayerNorm` / `torch.nn.RMSNorm` (outputs and gradients) in
`phase2_architecture/tests/test_norms.py`.
"""

from __future__ import annotations

import torch
from torch import nn


def _check_last_dim(x: torch.Tensor, dim: int, name: str) -> None:
    if x.shape[-1] != dim:
        raise ValueError(
            f"{name} was built for a last dimension of {dim}, but got input of shape {tuple(x.shape)}; "
            f"pass tensors shaped [..., {dim}] or build {name}({x.shape[-1]})."
        )


class LayerNorm(nn.Module):
    """Layer normalisation over the last dimension (same parameters and state_dict keys as nn.LayerNorm).

    Args:
        dim: size C of the last dimension.
        eps: added to the variance before the square root, for numerical safety.
        bias: learn an additive bias (GPT-2 does; some modern models drop it).
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        if dim <= 0:
            raise ValueError(f"LayerNorm dim must be a positive integer, got {dim}.")
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # [C] gain, starts as identity
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None  # [C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_last_dim(x, self.dim, "LayerNorm")
        mean = x.mean(dim=-1, keepdim=True)  # [..., 1]
        centred = x - mean  # [..., C]
        var = (centred * centred).mean(dim=-1, keepdim=True)  # [..., 1] biased variance
        x_hat = centred / torch.sqrt(var + self.eps)  # [..., C] zero mean, unit variance
        y = x_hat * self.weight  # [..., C]
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension (same math as nn.RMSNorm).

    Args:
        dim: size C of the last dimension.
        eps: added to the mean square before the square root.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        if dim <= 0:
            raise ValueError(f"RMSNorm dim must be a positive integer, got {dim}.")
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # [C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_last_dim(x, self.dim, "RMSNorm")
        mean_square = (x * x).mean(dim=-1, keepdim=True)  # [..., 1]
        x_hat = x * torch.rsqrt(mean_square + self.eps)  # [..., C] unit RMS
        return x_hat * self.weight

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


def make_norm(kind: str, dim: int, bias: bool = True) -> nn.Module:
    """Build a normalisation layer by name: "layernorm" or "rmsnorm"."""
    if kind == "layernorm":
        return LayerNorm(dim, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim)
    raise ValueError(f"Unknown norm {kind!r}; choose 'layernorm' or 'rmsnorm'.")
