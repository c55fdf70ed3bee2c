"""RoPE attention == an independent reference (complex rotation + torch's scaled_dot_product_attention),
is causal, and its output does not change when every position is shifted by the same offset."""

import pytest
import torch
import torch.nn.functional as F

from phase1_foundation.src.attention_mechanism import MultiHeadAttention
from phase2_architecture.src.rotary_attention import RotaryMultiHeadAttention

B, T, C, H = 2, 10, 32, 4


def reference(attn, x, causal, offset=0):
    """RoPE attention written independently: complex-number rotation and torch's fused attention."""
    Dh = C // H

    def heads(t):  # [B, T, C] -> [B, H, T, Dh]
        return t.view(B, -1, H, Dh).transpose(1, 2)

    q, k, v = (heads(F.linear(x, p.weight, p.bias)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    pos = torch.arange(offset, offset + x.shape[1], dtype=torch.float64)[:, None]
    theta = 10000 ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    rotation = torch.polar(
        torch.ones(x.shape[1], Dh // 2, dtype=torch.float64), pos * theta
    )  # e^{j pos theta}

    def rotate(t):
        z = torch.view_as_complex(t.reshape(*t.shape[:-1], Dh // 2, 2).contiguous())
        return torch.view_as_real(z * rotation).flatten(-2)

    out = F.scaled_dot_product_attention(rotate(q), rotate(k), v, is_causal=causal)
    out = out.transpose(1, 2).reshape(B, -1, C)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


@pytest.mark.parametrize("causal", [True, False])
def test_matches_independent_reference(causal):
    torch.manual_seed(0)
    attn = RotaryMultiHeadAttention(C, H, block_size=64).double().eval()
    assert isinstance(attn, MultiHeadAttention)  # reuses phase 1's projections and attention
    x = torch.randn(B, T, C, dtype=torch.float64)
    out, weights = attn(x, causal=causal, offset=3)
    torch.testing.assert_close(
        out, reference(attn, x, causal, offset=3), rtol=1e-6, atol=1e-6
    )  # RoPE tables are float32
    assert weights.shape == (B, H, T, T)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, T, dtype=torch.float64))


def test_output_is_invariant_to_a_common_position_shift():
    """Scores depend on i - j only, so moving the whole sequence changes nothing."""
    torch.manual_seed(0)
    attn = RotaryMultiHeadAttention(C, H, block_size=128).double().eval()
    x = torch.randn(B, T, C, dtype=torch.float64)
    base, _ = attn(x, causal=True, offset=0)
    for offset in (1, 17, 100):
        shifted, _ = attn(x, causal=True, offset=offset)
        torch.testing.assert_close(shifted, base, rtol=1e-6, atol=1e-6)
    # plain attention (no positions) also is; but RoPE is not permutation-invariant like it:
    perm = torch.randperm(T)
    rope_perm, _ = attn(x[:, perm])
    rope_out, _ = attn(x)
    assert (rope_perm - rope_out[:, perm]).abs().max() > 1e-3


def test_causal():
    torch.manual_seed(0)
    attn = RotaryMultiHeadAttention(C, H, block_size=64).eval()
    x = torch.randn(B, T, C)
    y = x.clone()
    y[:, 6:] = torch.randn(B, T - 6, C)
    a, _ = attn(x, causal=True)
    b, _ = attn(y, causal=True)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_errors():
    attn = RotaryMultiHeadAttention(C, H, block_size=8)
    with pytest.raises(ValueError, match="self-attention only"):
        attn(torch.randn(1, 4, C), context=torch.randn(1, 5, C))
    with pytest.raises(ValueError, match="larger block_size"):
        attn(torch.randn(1, 9, C))
