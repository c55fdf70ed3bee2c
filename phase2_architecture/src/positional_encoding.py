"""Three ways to tell a transformer where each token is: sinusoidal, learned, rotary (RoPE).

Attention by itself is permutation-equivariant: shuffle the tokens and the outputs shuffle the
same way. Word order has to be put in explicitly.

1. Sinusoidal (Vaswani et al., 2017, "Attention is all you need"), added to the embeddings:

       PE[pos, 2i]   = sin(pos / base^(2i / C))
       PE[pos, 2i+1] = cos(pos / base^(2i / C))          base = 10000

   Each pair of features is a clock ticking at its own frequency, from one turn every 2*pi tokens
   (i = 0) to one turn every 2*pi*base tokens. No parameters; defined for any position.

2. Learned (GPT-2): a trainable table `nn.Embedding(block_size, C)`, one vector per position,
   added to the embeddings. Simple and effective, but it knows nothing beyond block_size.

3. Rotary (Su et al., 2021, RoFormer; used by Llama): nothing is added to the embeddings. Instead
   the query and key of each head are *rotated* by an angle proportional to their position. View
   each feature pair (x[2i], x[2i+1]) as a complex number z_i; then

       rope(z, pos)_i = z_i * exp(1j * pos * theta_i),    theta_i = base^(-2i / Dh)

   Rotations preserve length, and the score between a query at position m and a key at position n

       Re( sum_i q_i e^{j m theta_i} * conj(k_i e^{j n theta_i}) )
     = Re( sum_i q_i conj(k_i) e^{j (m - n) theta_i} )

   depends on the positions only through m - n: attention sees *relative* positions. The attention
   layer that applies it lives in `rotary_attention.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from phase1_foundation.src.validation import check_int

# ---------------------------------------------------------------------------------------------
# 1. Sinusoidal
# ---------------------------------------------------------------------------------------------


def sinusoidal_encoding(block_size: int, d_model: int, base: float = 10000.0) -> torch.Tensor:
    """The table PE[pos, :] of "Attention is all you need", shape [block_size, d_model] (d_model even)."""
    check_int("block_size", block_size, minimum=1)
    if d_model <= 0 or d_model % 2 != 0:
        raise ValueError(f"d_model must be a positive even integer (sin/cos pairs), got {d_model}.")
    positions = torch.arange(block_size, dtype=torch.float32)[:, None]  # [T, 1]
    two_i = torch.arange(0, d_model, 2, dtype=torch.float32)  # [C/2] = 0, 2, 4, ...
    inv_freq = base ** (-two_i / d_model)  # [C/2] = 1 / base^(2i/C)
    angles = positions * inv_freq[None, :]  # [T, C/2]
    pe = torch.zeros(block_size, d_model)
    pe[:, 0::2] = torch.sin(angles)  # even features
    pe[:, 1::2] = torch.cos(angles)  # odd features
    return pe


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal table to token embeddings: x [B, T, C] -> x + PE[:T]."""

    def __init__(self, block_size: int, d_model: int, base: float = 10000.0):
        super().__init__()
        self.block_size = block_size
        # A buffer: moves with .to(device), is not trained; not saved (it is recomputed from the formula).
        self.register_buffer("pe", sinusoidal_encoding(block_size, d_model, base), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[-2]
        if T > self.block_size:
            raise ValueError(
                f"sequence length {T} exceeds block_size {self.block_size} of the positional encoding; "
                "build it with a larger block_size or feed shorter sequences."
            )
        return x + self.pe[:T].to(x.dtype)  # [B, T, C] + [T, C]


# ---------------------------------------------------------------------------------------------
# 2. Learned
# ---------------------------------------------------------------------------------------------


class LearnedPositionalEmbedding(nn.Embedding):
    """A trainable position table: an `nn.Embedding(block_size, d_model)` plus a length check.

    It *is* an nn.Embedding (GPT's `pos_emb`), so `pos_emb(torch.arange(T))` works as usual;
    `positions(T)` returns the first T rows after checking T <= block_size.
    """

    def __init__(self, block_size: int, d_model: int):
        super().__init__(block_size, d_model)

    def positions(self, T: int, offset: int = 0) -> torch.Tensor:
        """Embeddings of positions offset .. offset+T-1, shape [T, C]."""
        if offset < 0 or offset + T > self.num_embeddings:
            raise ValueError(
                f"positions {offset}..{offset + T - 1} are outside the learned table of "
                f"{self.num_embeddings} positions; feed at most {self.num_embeddings} tokens "
                "(crop the context) or build the model with a larger block_size."
            )
        pos = torch.arange(offset, offset + T, device=self.weight.device)  # [T]
        return self(pos)  # [T, C]


# ---------------------------------------------------------------------------------------------
# 3. Rotary (RoPE)
# ---------------------------------------------------------------------------------------------


def rope_angles(block_size: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles pos * theta_i, each [block_size, head_dim / 2]."""
    if head_dim <= 0 or head_dim % 2 != 0:
        raise ValueError(
            f"RoPE rotates feature pairs: head_dim must be a positive even integer, got {head_dim}."
        )
    check_int("block_size", block_size, minimum=1)
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # [Dh/2]
    positions = torch.arange(block_size, dtype=torch.float32)  # [T]
    angles = positions[:, None] * theta[None, :]  # [T, Dh/2]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each feature pair (x[2i], x[2i+1]) of x [..., T, Dh] by the angle whose cos/sin are [T, Dh/2].

    [y0]   [cos  -sin] [x0]
    [y1] = [sin   cos] [x1]        (a 2-D rotation; complex multiplication by e^{j angle})
    """
    if x.shape[-1] % 2 != 0:
        raise ValueError(f"RoPE needs an even last dimension, got shape {tuple(x.shape)}.")
    if cos.shape != (x.shape[-2], x.shape[-1] // 2) or sin.shape != cos.shape:
        raise ValueError(
            f"cos/sin must be [T, Dh/2] = [{x.shape[-2]}, {x.shape[-1] // 2}] for x of shape "
            f"{tuple(x.shape)}, got {tuple(cos.shape)} and {tuple(sin.shape)}."
        )
    x0 = x[..., 0::2]  # [..., T, Dh/2] real parts
    x1 = x[..., 1::2]  # [..., T, Dh/2] imaginary parts
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    # Interleave back: [..., T, Dh/2, 2] -> [..., T, Dh]
    return torch.stack((y0, y1), dim=-1).flatten(-2)


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE rotations for positions 0 .. block_size-1 of a head of size head_dim.

    `forward(x, offset=0)` rotates x [..., T, Dh] as if its tokens sat at positions offset .. offset+T-1.
    """

    def __init__(self, head_dim: int, block_size: int, base: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.block_size = block_size
        cos, sin = rope_angles(block_size, head_dim, base)
        self.register_buffer("cos", cos, persistent=False)  # [block_size, Dh/2]
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        T = x.shape[-2]
        if offset < 0 or offset + T > self.block_size:
            raise ValueError(
                f"positions {offset}..{offset + T - 1} exceed the {self.block_size} precomputed RoPE "
                "positions; build RotaryEmbedding with a larger block_size."
            )
        return apply_rope(x, self.cos[offset : offset + T], self.sin[offset : offset + T])
