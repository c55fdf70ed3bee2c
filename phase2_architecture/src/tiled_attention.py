"""Online softmax and tiled attention: the algorithm behind FlashAttention, in plain PyTorch.

Ordinary attention forms the whole score matrix S = q kᵀ / sqrt(d), [T, T] per head, then its
softmax, then P v. At T = 32k that is 4 GB per head in float32: memory, not arithmetic, is the limit.
FlashAttention (Dao et al. 2022; FlashAttention-2, 2023) computes the SAME output block by block,
never holding more than one [block_q, block_k] tile of scores, thanks to the online softmax.

Online softmax (Milakov & Gimelshein 2018). softmax needs the row maximum m (for stability) and
the row sum l = sum_j exp(s_j - m). Both can be kept as running values over blocks of the row:

    after a new block with scores s_b:   m' = max(m, max(s_b))
                                         l' = l * exp(m - m') + sum exp(s_b - m')

The factor exp(m - m') rescales everything summed so far to the new maximum: exactly what it would
have been had m' been known from the start. Attention's output o = sum_j softmax(s)_j v_j is a
sum of the same kind, so it gets the same treatment: keep an unnormalised accumulator

    acc' = acc * exp(m - m') + exp(s_b - m') @ v_b          and at the end   o = acc / l

Nothing is approximated: every rescaling is an exact identity (exp(a - m) * exp(m - m') =
exp(a - m')), so the result equals standard attention up to floating-point rounding.

    tiled_attention(q, k, v, causal, block_q, block_k) -> (out, logsumexp)   == F.scaled_dot_product_attention
    online_logsumexp(x, block) -> logsumexp over the last axis in one pass over blocks

The log-sum-exp m + log l of each row is also returned: FlashAttention stores it (T numbers per
head instead of T x T) to recompute the probabilities in the backward pass. Here the backward is
plain autograd, which keeps every tile for the gradient; the memory saving is the forward's.
"""

from __future__ import annotations

import math

import torch

from phase1_foundation.src.validation import check_int


def online_logsumexp(x: torch.Tensor, block: int) -> torch.Tensor:
    """log sum exp(x) over the last axis, reading x in blocks of `block` with a running max and sum."""
    check_int("block", block, minimum=1)
    m = torch.full(x.shape[:-1], -math.inf, dtype=x.dtype, device=x.device)  # running max
    l = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)  # running sum of exp(x - m)
    for start in range(0, x.shape[-1], block):
        chunk = x[..., start : start + block]  # [..., b]
        m_new = torch.maximum(m, chunk.amax(dim=-1))
        l = l * torch.exp(m - m_new) + torch.exp(chunk - m_new[..., None]).sum(dim=-1)
        m = m_new
    return m + torch.log(l)


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    block_q: int = 64,
    block_k: int = 64,
    stats: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ / sqrt(d)) v computed tile by tile; q [..., Tq, d], k [..., Tk, d], v [..., Tk, dv].

    Returns out [..., Tq, dv] and the row log-sum-exp of the scaled scores [..., Tq]. With
    causal=True (needs Tq == Tk) query i attends keys j <= i, and key tiles entirely in the future
    of a query tile are skipped. If a dict `stats` is given, stats["largest_score_tile"] receives
    the element count of the largest score tile formed (per batch and head).
    """
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"need q [..., Tq, d], k [..., Tk, d], v [..., Tk, dv]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}."
        )
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}.")
    Tq, Tk = q.shape[-2], k.shape[-2]
    if causal and Tq != Tk:
        raise ValueError(f"causal tiled attention needs Tq == Tk, got {Tq} and {Tk}.")
    scale = 1.0 / math.sqrt(q.shape[-1])
    largest_tile = 0
    outs, lses = [], []
    for q_start in range(0, Tq, block_q):
        qi = q[..., q_start : q_start + block_q, :] * scale  # [..., bq, d]
        bq = qi.shape[-2]
        m = torch.full((*qi.shape[:-1], 1), -math.inf, dtype=q.dtype, device=q.device)  # [..., bq, 1]
        l = torch.zeros_like(m)  # [..., bq, 1] running sum of exp(s - m)
        acc = torch.zeros((*qi.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)  # [..., bq, dv]
        k_end = min(Tk, q_start + bq) if causal else Tk  # causal: later keys are all in the future
        for k_start in range(0, k_end, block_k):
            kj = k[..., k_start : k_start + block_k, :]  # [..., bk, d]
            vj = v[..., k_start : k_start + block_k, :]  # [..., bk, dv]
            s = qi @ kj.transpose(-2, -1)  # [..., bq, bk] the only scores that exist at any time
            largest_tile = max(largest_tile, s.shape[-2] * s.shape[-1])
            if causal:
                query_pos = torch.arange(q_start, q_start + bq, device=q.device)[:, None]  # [bq, 1]
                key_pos = torch.arange(k_start, k_start + kj.shape[-2], device=q.device)[None, :]  # [1, bk]
                s = s.masked_fill(key_pos > query_pos, -math.inf)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))  # [..., bq, 1] finite: key 0 is seen first
            correction = torch.exp(m - m_new)  # [..., bq, 1] rescale what was summed under the old max
            p = torch.exp(s - m_new)  # [..., bq, bk] unnormalised probabilities, <= 1
            l = l * correction + p.sum(dim=-1, keepdim=True)
            acc = acc * correction + p @ vj  # [..., bq, dv]
            m = m_new
        outs.append(acc / l)  # normalise once, at the end
        lses.append((m + torch.log(l)).squeeze(-1))  # [..., bq]
    if stats is not None:
        stats["largest_score_tile"] = largest_tile
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)
