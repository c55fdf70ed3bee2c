"""Multi-head self-attention with rotary position embeddings (RoPE), built on Phase 1's attention.

Phase 1's `MultiHeadAttention` computes, per head, softmax(q kᵀ / sqrt(Dh)) v. RoPE changes one
thing: q and k are rotated by their positions *before* the dot product (see
`positional_encoding.py`), so the scores depend on relative positions only:

    q, k, v = split_heads(q_proj(x)), split_heads(k_proj(x)), split_heads(v_proj(x))   # [B, H, T, Dh]
    q, k    = rope(q, positions), rope(k, positions)                                 # rotate, same shapes
    out, w  = scaled_dot_product_attention(q, k, v, mask)                            # Phase 1
    out     = out_proj(merge_heads(out))                                             # [B, T, C]

Values are not rotated: position only decides *where* to look, not *what* is read. The subclass
reuses the parent's projections, split/merge and attention function; only the rotation is new.
"""

from __future__ import annotations

import torch

from phase1_foundation.src.attention_mechanism import (
    MultiHeadAttention,
    causal_mask,
    scaled_dot_product_attention,
)
from phase2_architecture.src.positional_encoding import RotaryEmbedding


class RotaryMultiHeadAttention(MultiHeadAttention):
    """Self-attention with RoPE on queries and keys.

    Args:
        d_model, n_head, bias, dropout: as Phase 1's MultiHeadAttention.
        block_size: number of positions with precomputed rotations.
        base: RoPE frequency base (10000 in RoFormer and Llama 1/2).
        n_kv_head: key/value heads for grouped-query attention (None = n_head), as in the parent.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        block_size: int,
        bias: bool = True,
        dropout: float = 0.0,
        base: float = 10000.0,
        n_kv_head: int | None = None,
    ):
        super().__init__(d_model, n_head, bias=bias, dropout=dropout, n_kv_head=n_kv_head)
        self.rope = RotaryEmbedding(d_model // n_head, block_size, base)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        offset: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> (out [B, T, C], weights [B, H, T, T]); tokens at positions offset .. offset+T-1."""
        if context is not None:
            raise ValueError(
                "RotaryMultiHeadAttention is self-attention only (queries and keys share one position axis); "
                "use phase 1's MultiHeadAttention for cross-attention."
            )
        self._check_forward_inputs(x, None, causal)
        T = x.shape[1]
        q = self.rope(self.split_heads(self.q_proj(x)), offset)  # [B, H, T, Dh] rotated by position
        k = self.rope(self.split_kv_heads(self.k_proj(x)), offset)  # [B, H_kv, T, Dh] rotated by position
        v = self.split_kv_heads(self.v_proj(x))  # [B, H_kv, T, Dh] not rotated
        k, v = self.repeat_kv(k), self.repeat_kv(v)  # [B, H, T, Dh] (grouped-query attention)
        if causal:
            allowed = causal_mask(T, device=x.device)  # [T, T]
            mask = allowed if mask is None else mask & allowed
        out, weights = scaled_dot_product_attention(q, k, v, mask)  # [B, H, T, Dh], [B, H, T, T]
        if self.training and self.attn_dropout.p > 0:
            out = self.attn_dropout(weights) @ v  # dropout on the weights, as in the parent class
        out = self.out_proj(self.merge_heads(out))  # [B, T, C]
        return out, weights
