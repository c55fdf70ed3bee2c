"""Transformer blocks: pre-norm / post-norm residual blocks, the encoder block, the decoder block.

A block = attention (tokens exchange information) + feed-forward (each token thinks alone), each
wrapped in a residual connection and a normalisation. Where the norm sits matters:

    post-norm (original 2017 transformer, BERT):   x = Norm(x + Attn(x));   x = Norm(x + FFN(x))
    pre-norm  (GPT-2 onwards, Llama):              x = x + Attn(Norm(x));   x = x + FFN(Norm(x))

In pre-norm the residual stream `x` is a plain sum of every sub-layer's output, so the gradient
flows from the loss to the first layer through an identity path; post-norm puts a normalisation
on that path at every layer, which makes deep post-norm stacks hard to train without learning-
rate warmup. `notebooks/2.1_positional_encodings_and_norms.ipynb` plots the difference.

The attention is Phase 1's `MultiHeadAttention`; the norms and FFNs come from this phase.
Blocks:
    TransformerBlock   ln1, attn, ln2, ffn          decoder-only (causal) by default; pre- or post-norm
    EncoderBlock       same, bidirectional           the encoder of the original transformer
    DecoderBlock       ln1, self_attn, ln2, cross_attn, ln3, ffn
                       causal self-attention, then attention over the encoder output ("memory")
"""

from __future__ import annotations

import torch
from torch import nn

from phase1_foundation.src.attention_mechanism import MultiHeadAttention
from phase2_architecture.src.feed_forward import make_feed_forward
from phase2_architecture.src.norms import make_norm
from phase2_architecture.src.rotary_attention import RotaryMultiHeadAttention


def key_padding_to_attention_mask(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, S] bool (True = real token) -> [B, 1, 1, S], broadcastable to attention weights [B, H, T, S]."""
    if key_mask is None:
        return None
    if key_mask.dtype != torch.bool or key_mask.dim() != 2:
        raise ValueError(
            f"key padding mask must be a bool tensor [B, S] with True for real tokens, "
            f"got dtype {key_mask.dtype} and shape {tuple(key_mask.shape)}."
        )
    if not key_mask.any(dim=-1).all():
        raise ValueError(
            "a sequence in the batch is all padding (its key mask has no True): nothing to attend to."
        )
    return key_mask[:, None, None, :]


class TransformerBlock(nn.Module):
    """Self-attention + feed-forward with residual connections.

    Args:
        d_model, n_head: width of the residual stream and number of attention heads.
        d_ff: hidden size of the FFN (default: 4 * d_model for GELU, 2/3 of that for SwiGLU).
        dropout: on the attention weights (inside Phase 1's attention) and on each sub-layer's output
            before it is added to the residual stream (`resid_drop` after attention, inside the FFN).
        bias: biases in linear layers and LayerNorm.
        norm: "layernorm" or "rmsnorm".  ffn: "gelu" or "swiglu".
        norm_first: True = pre-norm (GPT-2), False = post-norm (2017 transformer).
        causal: True = each token attends to itself and earlier tokens only (decoder-only LM).
        n_kv_head: key/value heads (grouped-query attention; None = n_head, 1 = multi-query).
        rope_block_size: if given, attention rotates queries and keys by RoPE for positions up to this.
        gelu_approximate: "none" (exact GELU) or "tanh" (GPT-2's approximation); GELU FFN only.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        *,
        d_ff: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        norm: str = "layernorm",
        ffn: str = "gelu",
        norm_first: bool = True,
        causal: bool = True,
        n_kv_head: int | None = None,
        rope_block_size: int | None = None,
        gelu_approximate: str = "none",
    ):
        super().__init__()
        self.norm_first = norm_first
        self.causal = causal
        self.ln1 = make_norm(norm, d_model, bias=bias)
        if rope_block_size is None:
            self.attn = MultiHeadAttention(d_model, n_head, bias, dropout, n_kv_head=n_kv_head)
        else:
            self.attn = RotaryMultiHeadAttention(
                d_model, n_head, rope_block_size, bias=bias, dropout=dropout, n_kv_head=n_kv_head
            )
        self.resid_drop = nn.Dropout(dropout)
        self.ln2 = make_norm(norm, d_model, bias=bias)
        self.ffn = make_feed_forward(
            ffn, d_model, d_ff, dropout=dropout, bias=bias, gelu_approximate=gelu_approximate
        )

    def _attend(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out, _ = self.attn(x, causal=self.causal, mask=mask)  # [B, T, C]
        return self.resid_drop(out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]; `mask`: optional bool, broadcastable to [B, H, T, T], True = attend."""
        if self.norm_first:
            x = x + self._attend(self.ln1(x), mask)  # pre-norm: the residual path is untouched
            x = x + self.ffn(self.ln2(x))
        else:
            x = self.ln1(x + self._attend(x, mask))  # post-norm: normalise after adding
            x = self.ln2(x + self.ffn(x))
        return x


class EncoderBlock(TransformerBlock):
    """A bidirectional block: every token attends to every (non-padding) token.

    Post-norm by default, as in the original transformer. `forward(x, key_mask=None)` takes the
    source padding mask [B, S] (True = real token).
    """

    def __init__(self, d_model: int, n_head: int, *, norm_first: bool = False, **kwargs):
        super().__init__(d_model, n_head, norm_first=norm_first, causal=False, **kwargs)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, key_padding_to_attention_mask(key_mask))


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention over the encoder output, feed-forward.

    forward(x [B, T, C], memory [B, S, C], memory_key_mask [B, S] or None) -> [B, T, C]
    Post-norm by default (original transformer); `norm_first=True` gives the pre-norm variant.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        *,
        d_ff: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        norm: str = "layernorm",
        ffn: str = "gelu",
        norm_first: bool = False,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.ln1 = make_norm(norm, d_model, bias=bias)
        self.self_attn = MultiHeadAttention(d_model, n_head, bias=bias, dropout=dropout)
        self.ln2 = make_norm(norm, d_model, bias=bias)
        self.cross_attn = MultiHeadAttention(d_model, n_head, bias=bias, dropout=dropout)
        self.ln3 = make_norm(norm, d_model, bias=bias)
        self.ffn = make_feed_forward(ffn, d_model, d_ff, dropout=dropout, bias=bias)
        self.resid_drop = nn.Dropout(dropout)

    def _self(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.self_attn(x, causal=True)  # [B, T, C], position t sees targets <= t
        return self.resid_drop(out)

    def _cross(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out, _ = self.cross_attn(x, context=memory, mask=mask)  # queries from x, keys/values from memory
        return self.resid_drop(out)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, memory_key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        mask = key_padding_to_attention_mask(memory_key_mask)  # [B, 1, 1, S] or None
        if self.norm_first:
            x = x + self._self(self.ln1(x))
            x = x + self._cross(self.ln2(x), memory, mask)
            x = x + self.ffn(self.ln3(x))
        else:
            x = self.ln1(x + self._self(x))
            x = self.ln2(x + self._cross(x, memory, mask))
            x = self.ln3(x + self.ffn(x))
        return x
