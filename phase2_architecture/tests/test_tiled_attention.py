"""Online softmax and tiled (FlashAttention-style) attention equal torch's results exactly."""

import pytest
import torch
import torch.nn.functional as F

from phase2_architecture.src.tiled_attention import online_logsumexp, tiled_attention


def _qkv(B=2, H=3, Tq=37, Tk=37, d=16, dv=8, seed=0, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, d, generator=g, dtype=dtype) * scale
    k = torch.randn(B, H, Tk, d, generator=g, dtype=dtype) * scale
    v = torch.randn(B, H, Tk, dv, generator=g, dtype=dtype)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
def test_online_logsumexp_equals_torch_even_for_huge_values(block):
    x = torch.randn(5, 130, dtype=torch.float64) * 300  # naive exp would overflow
    torch.testing.assert_close(online_logsumexp(x, block), torch.logsumexp(x, dim=-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_q,block_k", [(8, 8), (5, 16), (16, 3), (64, 64), (1, 1)])
def test_tiled_attention_equals_sdpa_forward_logsumexp_and_gradients(causal, block_q, block_k):
    q, k, v = _qkv(scale=3.0)  # large scores: the running max matters
    out, lse = tiled_attention(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    scores = q @ k.transpose(-2, -1) / 4.0  # d = 16
    if causal:
        scores = scores.masked_fill(torch.ones(37, 37, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), g)
    theirs = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_cross_attention_with_different_lengths_and_float32():
    q, k, v = _qkv(Tq=10, Tk=53, dtype=torch.float32)
    out, _ = tiled_attention(q, k, v, block_q=4, block_k=16)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_the_score_matrix_is_never_materialised():
    q, k, v = _qkv(B=1, H=1, Tq=256, Tk=256)
    stats = {}
    tiled_attention(q, k, v, causal=True, block_q=32, block_k=16, stats=stats)
    assert stats["largest_score_tile"] == 32 * 16  # vs 256 * 256 for the full matrix


def test_bad_shapes_raise():
    q, k, v = _qkv(Tq=4, Tk=6)
    with pytest.raises(ValueError, match="Tq == Tk"):
        tiled_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="need q"):
        tiled_attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match="positive"):
        tiled_attention(q, k, v, block_k=0)
