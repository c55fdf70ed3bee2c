"""Attention, written out by hand in PyTorch, next to the framework versions.

Scaled dot-product attention (Vaswani et al., 2017) lets every query position read a weighted
average of the value vectors, with weights given by how well its query matches each key:

    scores  = q @ kᵀ / sqrt(d)            # [..., Tq, Tk]  similarity of query i with key j
    scores  = scores where allowed else -inf
    weights = softmax(scores, dim=-1)     # [..., Tq, Tk]  each row sums to 1
    out     = weights @ v                 # [..., Tq, dv]  a mix of the values

Why divide by sqrt(d)? If the entries of q and k are independent with mean 0 and variance 1, the
dot product q·k is a sum of d such products, so its variance is d. Dividing by sqrt(d) brings it
back to variance 1, which keeps the softmax out of its saturated region (where one weight is ~1,
the rest ~0, and the gradients vanish).

Multi-head attention runs H attentions in parallel on C / H-dimensional slices ("heads") of
learned projections of the input, then concatenates the heads and mixes them with a last
projection:

    q, k, v = x Wq, ctx Wk, ctx Wv                 # [B, T, C], [B, Tk, C], [B, Tk, C]
    split into heads                               # [B, H, T, Dh] with Dh = C / H
    out_h   = attention(q_h, k_h, v_h)             # [B, H, T, Dh]
    out     = concat_h(out_h) Wo                   # [B, T, C]

Grouped-query attention (GQA, Ainslie et al. 2023; Llama 2 70B, Llama 3, Mistral) keeps all H query
heads but only H_kv < H key/value heads: each key/value head is shared by a group of H / H_kv
query heads. The K/V projections shrink by H / H_kv, and so does the KV cache of generation (Phase
5), which dominates memory at long contexts. H_kv = 1 is multi-query attention (MQA, Shazeer 2019);
H_kv = H is ordinary multi-head attention.

    k, v    = ctx Wk, ctx Wv                       # [B, Tk, H_kv * Dh]
    split   -> [B, H_kv, Tk, Dh]; repeat each head H / H_kv times -> [B, H, Tk, Dh]   (repeat_kv)

The functions below are the ones later phases import (see .github/copilot-instructions.md):
`causal_mask`, `scaled_dot_product_attention` and `MultiHeadAttention`. Masks are boolean with
True meaning "may attend" (the opposite of `torch.nn.MultiheadAttention`'s `attn_mask`, where True
means "blocked"); `to_torch_multihead_attention` copies our weights into the framework module so
the two can be compared side by side.

Run `python phase1_foundation/src/attention_mechanism.py` for a small demonstration.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from phase1_foundation.src.validation import check_int, check_number


def causal_mask(T: int, device=None) -> torch.Tensor:
    """Boolean [T, T] mask, True where query i may attend key j, i.e. j <= i (lower triangle).

    Row i says which positions token i is allowed to look at: itself and everything before it,
    never the future. That is what makes a language model's prediction at position i depend
    only on tokens 0..i.
    """
    check_int("causal_mask's length T", T, minimum=1)
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()  # [T, T]


def _check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> None:
    """Raise a clear error for inputs that scaled_dot_product_attention cannot handle."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims [..., T, d], got shape {tuple(t.shape)}.")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same feature size d (q·k is a dot product): "
            f"q {tuple(q.shape)} vs k {tuple(k.shape)}."
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same number of positions Tk (one value per key): "
            f"k {tuple(k.shape)} vs v {tuple(v.shape)}."
        )
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(
                f"mask must be a bool tensor with True = may attend, got {got}. "
                "Convert an additive float mask with `mask = additive_mask == 0`."
            )
        scores_shape = (*torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]), q.shape[-2], k.shape[-2])
        try:
            torch.broadcast_shapes(mask.shape, scores_shape)
        except RuntimeError as err:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to the scores' shape "
                f"{scores_shape} ([..., Tq, Tk])."
            ) from err


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ / sqrt(d), masked) @ v, written out step by step.

    Args:
        q: queries [..., Tq, d].
        k: keys    [..., Tk, d].
        v: values  [..., Tk, dv].
        mask: optional bool tensor broadcastable to [..., Tq, Tk]; True = may attend.

    Returns:
        out [..., Tq, dv] and the attention weights [..., Tq, Tk] (each row sums to 1).

    Raises:
        ValueError if a query row is fully masked: its softmax would be 0/0 = NaN. Every query
        must be allowed to see at least one key (a causal mask always allows the diagonal).
    """
    _check_attention_inputs(q, k, v, mask)
    d = q.shape[-1]
    scores = q @ k.transpose(-2, -1)  # [..., Tq, Tk]  raw similarities q_i · k_j
    scores = scores / math.sqrt(d)  # [..., Tq, Tk]  variance ~1 instead of ~d
    if mask is not None:
        # A row with no allowed key would become softmax([-inf, ..., -inf]) = NaN; refuse it loudly.
        allowed_per_row = mask.any(dim=-1)  # [..., Tq] (broadcast dims of the mask only)
        if not bool(allowed_per_row.all()):
            raise ValueError(
                "mask blocks every key for at least one query row, so its softmax would be NaN. "
                "Give every query at least one key it may attend (e.g. let padding queries attend "
                "to themselves, then ignore their outputs)."
            )
        scores = scores.masked_fill(~mask, float("-inf"))  # [..., Tq, Tk]  blocked -> -inf -> weight 0
    weights = torch.softmax(scores, dim=-1)  # [..., Tq, Tk]  rows sum to 1
    out = weights @ v  # [..., Tq, dv] weighted average of the values
    return out, weights


class MultiHeadAttention(nn.Module):
    """Multi-head attention by hand: project, split heads, attend per head, merge, project.

    Self-attention when `context` is None (queries, keys and values all come from x);
    cross-attention otherwise (queries from x, keys and values from `context`, as in an
    encoder-decoder's decoder).

    Args:
        d_model: model width C; must be divisible by n_head.
        n_head: number of heads H; each head has Dh = C / H dimensions.
        bias: whether the four projections have biases.
        dropout: dropout probability on the attention weights, active in training mode only.
        n_kv_head: key/value heads H_kv (grouped-query attention); must divide n_head. None means
            n_head (multi-head attention); 1 is multi-query attention.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        bias: bool = True,
        dropout: float = 0.0,
        n_kv_head: int | None = None,
    ):
        super().__init__()
        check_int("d_model", d_model, minimum=1)
        check_int("n_head", n_head, minimum=1)
        if d_model % n_head != 0:
            raise ValueError(
                f"d_model={d_model} is not divisible by n_head={n_head}; each head gets "
                f"d_model / n_head dimensions, so choose n_head among the divisors "
                f"{[h for h in range(1, d_model + 1) if d_model % h == 0]}."
            )
        check_number("dropout", dropout, low=0, below=1)
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        check_int("n_kv_head", n_kv_head, minimum=1)  # (None means n_head)
        if n_head % n_kv_head != 0:
            raise ValueError(
                f"n_head={n_head} is not divisible by n_kv_head={n_kv_head}; every key/value head serves "
                f"an equal group of query heads, so choose n_kv_head among "
                f"{[h for h in range(1, n_head + 1) if n_head % h == 0]}."
            )
        self.d_model = d_model
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.head_dim = d_model // n_head
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_head * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [B, H, T, Dh]: head h owns channels h*Dh .. (h+1)*Dh - 1."""
        B, T, C = x.shape
        x = x.view(B, T, self.n_head, self.head_dim)  # [B, T, H, Dh]
        return x.transpose(1, 2)  # [B, H, T, Dh]

    def split_kv_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H_kv * Dh] -> [B, H_kv, T, Dh]: the key or value heads (= split_heads without GQA)."""
        B, T, _ = x.shape
        return x.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, H_kv, T, Dh]

    def repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H_kv, T, Dh] -> [B, H, T, Dh]: key/value head g serves query heads g*r .. g*r + r - 1."""
        group_size = self.n_head // self.n_kv_head  # r query heads per key/value head
        return x.repeat_interleave(group_size, dim=1) if group_size > 1 else x

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, T, Dh] -> [B, T, C]: concatenate the heads back side by side."""
        B, H, T, Dh = x.shape
        x = x.transpose(1, 2)  # [B, T, H, Dh]
        return x.reshape(B, T, H * Dh)  # [B, T, C]

    def _check_forward_inputs(self, x: torch.Tensor, context: torch.Tensor | None, causal: bool) -> None:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [B, T, {self.d_model}], got {tuple(x.shape)}.")
        if context is not None:
            if context.dim() != 3 or context.shape[-1] != self.d_model or context.shape[0] != x.shape[0]:
                raise ValueError(
                    f"context must have shape [B={x.shape[0]}, Tk, {self.d_model}], "
                    f"got {tuple(context.shape)}."
                )
            if causal and context.shape[1] != x.shape[1]:
                raise ValueError(
                    f"causal=True needs as many keys as queries, got Tq={x.shape[1]} and "
                    f"Tk={context.shape[1]}; pass an explicit boolean `mask` for cross-attention instead."
                )

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        causal: bool = False,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C] (and context [B, Tk, C]) -> (out [B, T, C], weights [B, H, T, Tk]).

        `mask` is a bool tensor broadcastable to [B, H, T, Tk] (True = may attend), e.g. a padding
        mask of shape [B, 1, 1, Tk]; with `causal=True` it is combined (AND) with the causal mask.
        The returned weights are the softmax probabilities before dropout (rows sum to 1).
        """
        self._check_forward_inputs(x, context, causal)
        source = x if context is None else context  # keys/values come from here
        q = self.split_heads(self.q_proj(x))  # [B, H, T, Dh]
        k = self.repeat_kv(self.split_kv_heads(self.k_proj(source)))  # [B, H_kv, Tk, Dh] -> [B, H, Tk, Dh]
        v = self.repeat_kv(self.split_kv_heads(self.v_proj(source)))  # [B, H_kv, Tk, Dh] -> [B, H, Tk, Dh]
        if causal:
            allowed = causal_mask(x.shape[1], device=x.device)  # [T, T]
            mask = allowed if mask is None else mask & allowed
        out, weights = scaled_dot_product_attention(q, k, v, mask)  # [B, H, T, Dh], [B, H, T, Tk]
        if self.training and self.attn_dropout.p > 0:
            # Dropout on the weights = randomly forget some of the keys; redo the weighted sum.
            out = self.attn_dropout(weights) @ v  # [B, H, T, Dh]
        out = self.out_proj(self.merge_heads(out))  # [B, T, C]
        return out, weights


def to_torch_multihead_attention(mha: MultiHeadAttention) -> nn.MultiheadAttention:
    """A `torch.nn.MultiheadAttention(batch_first=True)` holding exactly the weights of `mha`.

    PyTorch stores the three input projections stacked in one [3C, C] matrix `in_proj_weight`
    (rows: q, then k, then v). Note its masks are the other way round: `attn_mask=True` means
    *blocked*, so pass `~causal_mask(T)`.
    """
    if not isinstance(mha, MultiHeadAttention):
        raise TypeError(f"expected a phase-1 MultiHeadAttention, got {type(mha).__name__}.")
    if mha.n_kv_head != mha.n_head:
        raise ValueError(
            "nn.MultiheadAttention has no grouped-query attention; compare a GQA module with "
            "F.scaled_dot_product_attention(..., enable_gqa=True) instead."
        )
    bias = mha.q_proj.bias is not None
    ref = nn.MultiheadAttention(
        mha.d_model, mha.n_head, dropout=mha.attn_dropout.p, bias=bias, batch_first=True
    )
    ref = ref.to(device=mha.q_proj.weight.device, dtype=mha.q_proj.weight.dtype)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight]))
        ref.out_proj.weight.copy_(mha.out_proj.weight)
        if bias:
            ref.in_proj_bias.copy_(torch.cat([mha.q_proj.bias, mha.k_proj.bias, mha.v_proj.bias]))
            ref.out_proj.bias.copy_(mha.out_proj.bias)
    ref.train(mha.training)
    return ref


def plot_attention_weights(weights, query_labels=None, key_labels=None, title=None, ax=None):
    """Heatmap of a [Tq, Tk] attention matrix (row = query, column = key); returns the Figure.

    Accepts a torch tensor or a NumPy array. Pass `ax` to draw into an existing subplot.
    """
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().float().numpy()
    weights = np.asarray(weights)
    if weights.ndim != 2:
        raise ValueError(
            f"plot_attention_weights needs one [Tq, Tk] matrix, got shape {weights.shape}; "
            "select a batch element and head first, e.g. weights[0, h]."
        )
    Tq, Tk = weights.shape
    for name, labels, n in (("query_labels", query_labels, Tq), ("key_labels", key_labels, Tk)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{name} has {len(labels)} entries but the matrix has {n} along that axis.")
    if ax is None:
        import matplotlib.pyplot as plt  # here, not at the top: importing attention needs no plotting library

        fig, ax = plt.subplots(figsize=(1.0 + 0.45 * Tk, 0.8 + 0.45 * Tq))
    else:
        fig = ax.figure
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=max(1e-12, float(weights.max())))
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
    ax.set_xticks(range(Tk), key_labels if key_labels is not None else range(Tk), rotation=90)
    ax.set_yticks(range(Tq), query_labels if query_labels is not None else range(Tq))
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return fig


def main() -> None:
    """Compare the hand-written attention with PyTorch's on a random batch."""
    torch.manual_seed(0)
    B, T, C, H = 2, 6, 16, 4
    x = torch.randn(B, T, C)
    mha = MultiHeadAttention(C, H).eval()
    ref = to_torch_multihead_attention(mha).eval()
    out, weights = mha(x, causal=True)
    ref_out, ref_weights = ref(x, x, x, attn_mask=~causal_mask(T), average_attn_weights=False)
    print(f"input x: {tuple(x.shape)} -> output {tuple(out.shape)}, weights {tuple(weights.shape)}")
    print(f"max |ours - nn.MultiheadAttention| output:  {(out - ref_out).abs().max().item():.2e}")
    print(f"max |ours - nn.MultiheadAttention| weights: {(weights - ref_weights).abs().max().item():.2e}")
    q, k, v = torch.randn(3, B, H, T, C // H).unbind(0)
    ours, _ = scaled_dot_product_attention(q, k, v, causal_mask(T))
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    print(f"max |ours - F.scaled_dot_product_attention|: {(ours - theirs).abs().max().item():.2e}")
    print("causal weights of head 0, batch 0 (rows sum to 1, zeros above the diagonal):")
    print(np.array2string(weights[0, 0].detach().numpy(), precision=2, suppress_small=True))


if __name__ == "__main__":
    main()
