"""Position-wise feed-forward networks: GELU, the GELU FFN (GPT-2) and the SwiGLU FFN (Llama).

Attention moves information *between* tokens; the feed-forward network (FFN) then processes each
token on its own, with the same weights at every position. It holds most of a transformer's
parameters (2/3 of each block) and is where much of the "knowledge" is stored.

GELU (Hendrycks & Gimpel, 2016) weighs its input by the probability that a standard normal
variable is below it:

    gelu(x)      = x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))                        (exact)
    gelu_tanh(x) = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))             (GPT-2's approximation)

GELU FFN (GPT-2):   y = W_down · gelu(W_up · x + b_up) + b_down,   hidden size H = 4·C

SwiGLU FFN (Shazeer, 2020; used by PaLM and Llama): a gated linear unit with the Swish/SiLU gate

    y = W_down · ( silu(W_gate · x) ⊙ (W_up · x) ),    silu(z) = z * sigmoid(z)

It has three weight matrices instead of two. To keep the parameter count equal to a GELU FFN
with H = 4C (2 · 4C · C = 8C²), the hidden size is shrunk to H = 2/3 · 4C (3 · 8C/3 · C = 8C²),
then rounded up to a multiple of `multiple_of` (64 in Llama) so matrix shapes are hardware-friendly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from phase1_foundation.src.primitives import silu  # x * sigmoid(x), written in Phase 1
from phase1_foundation.src.validation import check_int


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU activation; `approximate="none"` is the exact erf form, `"tanh"` GPT-2's approximation."""
    if approximate == "none":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
        return 0.5 * x * (1.0 + torch.tanh(inner))
    raise ValueError(f"Unknown GELU approximation {approximate!r}; use 'none' (exact) or 'tanh'.")


class GELU(nn.Module):
    """Module wrapper around `gelu` (same `approximate` argument as torch.nn.GELU)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"Unknown GELU approximation {approximate!r}; use 'none' (exact) or 'tanh'.")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class GELUFeedForward(nn.Module):
    """The GPT-2 feed-forward network: Linear(C -> H), GELU, Linear(H -> C), dropout.

    `down_proj` writes into the residual stream (GPT init scales it by 1/sqrt(2 * n_layer)).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        approximate: str = "none",
    ):
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff
        check_int("d_model", d_model, minimum=1)
        check_int("d_ff", d_ff, minimum=1)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.act = GELU(approximate)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.up_proj(x))  # [B, T, H]
        return self.dropout(self.down_proj(h))  # [B, T, C]


def swiglu_hidden_size(d_model: int, multiple_of: int = 64) -> int:
    """Llama's hidden size: 2/3 of 4*d_model (parameters of a 4x GELU FFN), rounded up to `multiple_of`."""
    check_int("d_model", d_model, minimum=1)
    check_int("multiple_of", multiple_of, minimum=1)
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class SwiGLUFeedForward(nn.Module):
    """SwiGLU feed-forward network: down_proj(silu(gate_proj(x)) * up_proj(x)), dropout.

    Args:
        d_model: width C of the residual stream.
        d_ff: hidden size H; default `swiglu_hidden_size(d_model, multiple_of)`.
        bias: Llama uses no biases; kept as an option so it can match a GELU FFN's configuration.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        multiple_of: int = 64,
    ):
        super().__init__()
        d_ff = swiglu_hidden_size(d_model, multiple_of) if d_ff is None else d_ff
        check_int("d_model", d_model, minimum=1)
        check_int("d_ff", d_ff, minimum=1)
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = silu(self.gate_proj(x))  # [B, T, H] in (-0.28, inf): how much of each feature to let through
        value = self.up_proj(x)  # [B, T, H]
        return self.dropout(self.down_proj(gate * value))  # [B, T, C]


def make_feed_forward(
    kind: str,
    d_model: int,
    d_ff: int | None = None,
    dropout: float = 0.0,
    bias: bool = True,
    gelu_approximate: str = "none",
) -> nn.Module:
    """Build an FFN by name: "gelu" (default hidden 4C) or "swiglu" (default 2/3 * 4C, rounded to 64).

    `gelu_approximate` ("none" exact, "tanh" GPT-2's) applies to the GELU FFN only.
    """
    if kind == "gelu":
        return GELUFeedForward(d_model, d_ff, dropout=dropout, bias=bias, approximate=gelu_approximate)
    if kind == "swiglu":
        return SwiGLUFeedForward(d_model, d_ff, dropout=dropout, bias=bias)
    raise ValueError(f"Unknown feed-forward {kind!r}; choose 'gelu' or 'swiglu'.")
