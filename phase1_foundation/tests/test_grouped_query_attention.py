"""Grouped-query and multi-query attention: equal to MHA with shared key/value heads, and to torch's
F.scaled_dot_product_attention(enable_gqa=True)."""

import pytest
import torch
import torch.nn.functional as F

from phase1_foundation.src.attention_mechanism import MultiHeadAttention, to_torch_multihead_attention


def _seeded(**kwargs) -> MultiHeadAttention:
    torch.manual_seed(0)
    return MultiHeadAttention(**kwargs).double()


def test_n_kv_heads_equal_to_n_heads_is_multi_head_attention():
    mha = _seeded(d_model=24, n_head=4)
    gqa = _seeded(d_model=24, n_head=4, n_kv_head=4)
    gqa.load_state_dict(mha.state_dict())  # same shapes: nothing changes
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    torch.testing.assert_close(gqa(x, causal=True)[0], mha(x, causal=True)[0], rtol=0, atol=0)
    ref = to_torch_multihead_attention(gqa)  # still interchangeable with torch's module
    torch.testing.assert_close(gqa(x)[0], ref(x, x, x, need_weights=False)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n_kv_head", [1, 2, 3])
def test_gqa_equals_mha_whose_key_value_heads_are_copied_across_each_group(n_kv_head):
    """A GQA module = an MHA whose k/v projection of head h is the GQA's head h // group_size."""
    H, Dh = 6, 4
    gqa = _seeded(d_model=H * Dh, n_head=H, n_kv_head=n_kv_head)
    mha = _seeded(d_model=H * Dh, n_head=H)
    group_size = H // n_kv_head
    with torch.no_grad():
        for name in ("q_proj", "out_proj"):
            getattr(mha, name).load_state_dict(getattr(gqa, name).state_dict())
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(n_kv_head, Dh, H * Dh)  # [H_kv, Dh, C]
            b = getattr(gqa, name).bias.view(n_kv_head, Dh)
            getattr(mha, name).weight.copy_(w.repeat_interleave(group_size, 0).reshape(H * Dh, H * Dh))
            getattr(mha, name).bias.copy_(b.repeat_interleave(group_size, 0).reshape(H * Dh))
    x = torch.randn(3, 9, H * Dh, dtype=torch.float64)
    for causal in (False, True):
        out_gqa, w_gqa = gqa(x, causal=causal)
        out_mha, w_mha = mha(x, causal=causal)
        torch.testing.assert_close(out_gqa, out_mha, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w_gqa, w_mha, rtol=1e-12, atol=1e-12)
    assert gqa.k_proj.weight.shape == (n_kv_head * Dh, H * Dh)  # H / H_kv times fewer k/v parameters


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_equals_torch_sdpa_with_enable_gqa(n_kv_head, causal):
    attn = _seeded(d_model=32, n_head=4, n_kv_head=n_kv_head)
    x = torch.randn(2, 11, 32, dtype=torch.float64, requires_grad=True)
    ours, _ = attn(x, causal=causal)
    q = attn.split_heads(attn.q_proj(x))  # [B, 4, T, 8]
    k = attn.split_kv_heads(attn.k_proj(x))  # [B, H_kv, T, 8]: NOT repeated; torch groups them itself
    v = attn.split_kv_heads(attn.v_proj(x))
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)  # [B, 4, T, 8]
    theirs = attn.out_proj(attn.merge_heads(theirs))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(ours)
    torch.testing.assert_close(
        torch.autograd.grad(ours, x, g, retain_graph=True)[0], torch.autograd.grad(theirs, x, g)[0]
    )


def test_gqa_cross_attention_and_bad_group_sizes():
    attn = _seeded(d_model=16, n_head=4, n_kv_head=2)
    x, context = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    out, weights = attn(x, context=context)
    assert out.shape == (2, 3, 16) and weights.shape == (2, 4, 3, 5)
    with pytest.raises(ValueError, match="divisible by n_kv_head"):
        MultiHeadAttention(16, 4, n_kv_head=3)
    with pytest.raises(ValueError, match="n_kv_head must be a positive"):
        MultiHeadAttention(16, 4, n_kv_head=0)
    with pytest.raises(ValueError, match="enable_gqa"):
        to_torch_multihead_attention(attn)
