"""The hand-written attention equals PyTorch's, is causal when asked, and rejects bad input clearly."""

import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from phase1_foundation.src.attention_mechanism import (
    MultiHeadAttention,
    causal_mask,
    main,
    plot_attention_weights,
    scaled_dot_product_attention,
    to_torch_multihead_attention,
)

ATOL = 1e-5
SHAPES = [(1, 1, 4, 1), (2, 5, 8, 2), (3, 7, 12, 3), (2, 16, 32, 8)]  # (B, T, C, H)


def random_mha(C, H, seed, bias=True):
    """An MHA whose biases are random too (nn.Linear's are, nn.MultiheadAttention's start at 0)."""
    torch.manual_seed(seed)
    return MultiHeadAttention(C, H, bias=bias).eval()


def test_causal_mask_is_lower_triangular():
    m = causal_mask(4)
    assert m.dtype == torch.bool and m.shape == (4, 4)
    for i in range(4):
        for j in range(4):
            assert bool(m[i, j]) == (j <= i)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 1, 7, 16), (4, 2, 9, 8)])
def test_scaled_dot_product_attention_matches_torch(shape, causal):
    torch.manual_seed(1)
    q, k, v = torch.randn(3, *shape).unbind(0)
    T = shape[-2]
    out, weights = scaled_dot_product_attention(q, k, v, causal_mask(T) if causal else None)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(shape[:-1]), atol=1e-6, rtol=0)
    if causal:
        assert torch.all(weights.masked_select(~causal_mask(T)) == 0)


def test_scaled_dot_product_attention_cross_shapes_and_padding_mask():
    torch.manual_seed(2)
    q = torch.randn(2, 3, 4, 8)  # Tq = 4
    k = torch.randn(2, 3, 6, 8)  # Tk = 6
    v = torch.randn(2, 3, 6, 5)  # dv = 5 differs from d
    keep = torch.rand(2, 1, 1, 6) > 0.4
    keep[..., 0] = True  # every row keeps at least one key
    out, weights = scaled_dot_product_attention(q, k, v, keep)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # torch's bool mask: True = attend
    assert out.shape == (2, 3, 4, 5) and weights.shape == (2, 3, 4, 6)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    assert torch.all(weights.masked_select(~keep.expand_as(weights)) == 0)


def test_scaling_by_sqrt_d_is_used():
    """Without the 1/sqrt(d) the weights would differ: compare with a direct formula."""
    torch.manual_seed(3)
    q, k, v = torch.randn(3, 5, 16).unbind(0)
    _, weights = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(weights, torch.softmax(q @ k.T / 4.0, dim=-1))
    assert not torch.allclose(weights, torch.softmax(q @ k.T, dim=-1), atol=1e-3)


@pytest.mark.parametrize("B,T,C,H", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_mha_equals_torch_multihead_attention(B, T, C, H, causal):
    mha = random_mha(C, H, seed=B * 100 + T)
    ref = to_torch_multihead_attention(mha).eval()
    x = torch.randn(B, T, C)
    out, weights = mha(x, causal=causal)
    attn_mask = ~causal_mask(T) if causal else None  # torch: True = blocked
    ref_out, ref_w = ref(x, x, x, attn_mask=attn_mask, average_attn_weights=False)
    assert out.shape == (B, T, C) and weights.shape == (B, H, T, T)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(weights, ref_w, atol=ATOL, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, T), atol=1e-6, rtol=0)


@pytest.mark.parametrize("B,T,C,H", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_mha_equals_projections_plus_functional_sdpa(B, T, C, H, causal):
    """Independent path: our projections + F.scaled_dot_product_attention per head."""
    mha = random_mha(C, H, seed=7 + T)
    x = torch.randn(B, T, C)
    out, _ = mha(x, causal=causal)
    q = mha.q_proj(x).view(B, T, H, C // H).transpose(1, 2)
    k = mha.k_proj(x).view(B, T, H, C // H).transpose(1, 2)
    v = mha.v_proj(x).view(B, T, H, C // H).transpose(1, 2)
    heads = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, H, T, Dh]
    expected = mha.out_proj(heads.transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("Tq,Tk", [(3, 7), (8, 2), (5, 5)])
def test_cross_attention_equals_torch(Tq, Tk):
    B, C, H = 2, 12, 4
    mha = random_mha(C, H, seed=Tq * 10 + Tk)
    ref = to_torch_multihead_attention(mha).eval()
    x, ctx = torch.randn(B, Tq, C), torch.randn(B, Tk, C)
    keep = torch.rand(B, 1, 1, Tk) > 0.3
    keep[..., -1] = True
    out, weights = mha(x, context=ctx, mask=keep)
    ref_out, ref_w = ref(x, ctx, ctx, key_padding_mask=~keep[:, 0, 0], average_attn_weights=False)
    assert out.shape == (B, Tq, C) and weights.shape == (B, H, Tq, Tk)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(weights, ref_w, atol=ATOL, rtol=0)


def test_mha_without_bias_equals_torch():
    mha = random_mha(16, 4, seed=0, bias=False)
    ref = to_torch_multihead_attention(mha).eval()
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(mha(x)[0], ref(x, x, x)[0], atol=ATOL, rtol=0)


def test_mha_gradients_equal_torch():
    torch.manual_seed(4)
    mha = MultiHeadAttention(8, 2).double().eval()
    ref = to_torch_multihead_attention(mha).eval()
    x1 = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(2, 6, 8, dtype=torch.float64)
    (mha(x1, causal=True)[0] * g).sum().backward()
    (ref(x2, x2, x2, attn_mask=~causal_mask(6), need_weights=False)[0] * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-10, rtol=0)
    wq_grad = ref.in_proj_weight.grad[:8]
    torch.testing.assert_close(mha.q_proj.weight.grad, wq_grad, atol=1e-10, rtol=0)


def test_causal_mha_later_token_changes_no_earlier_output():
    B, T, C, H = 2, 8, 16, 4
    mha = random_mha(C, H, seed=5)
    x = torch.randn(B, T, C)
    t = 5
    x_changed = x.clone()
    x_changed[:, t] += torch.randn(B, C) * 3.0
    out, _ = mha(x, causal=True)
    out_changed, _ = mha(x_changed, causal=True)
    torch.testing.assert_close(out[:, :t], out_changed[:, :t], atol=0, rtol=0)  # past untouched, exactly
    assert (out[:, t:] - out_changed[:, t:]).abs().amax(dim=-1).min() > 1e-4  # every later position moves
    # Without the mask, the change leaks backwards: the test above is able to fail.
    assert not torch.allclose(mha(x)[0][:, :t], mha(x_changed)[0][:, :t], atol=1e-4)


def test_causal_gradient_of_earlier_output_ignores_later_inputs():
    mha = random_mha(8, 2, seed=6)
    x = torch.randn(1, 6, 8, requires_grad=True)
    out, _ = mha(x, causal=True)
    out[0, 2].sum().backward()
    assert torch.all(x.grad[0, 3:] == 0)
    assert torch.all(x.grad[0, :3].abs().sum(-1) > 0)


def test_dropout_on_weights_only_in_training():
    torch.manual_seed(8)
    mha = MultiHeadAttention(16, 4, dropout=0.5)
    x = torch.randn(2, 6, 16)
    mha.eval()
    a, _ = mha(x)
    b, _ = mha(x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    mha.train()
    c, w = mha(x)
    d, _ = mha(x)
    assert not torch.allclose(c, d)  # a different random mask each call
    assert not torch.allclose(a, c)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 6), atol=1e-6, rtol=0)  # returned before dropout


def test_split_and_merge_heads_are_inverse_and_slice_channels():
    mha = MultiHeadAttention(12, 3)
    x = torch.randn(2, 5, 12)
    heads = mha.split_heads(x)
    assert heads.shape == (2, 3, 5, 4)
    torch.testing.assert_close(heads[:, 1], x[..., 4:8], atol=0, rtol=0)  # head 1 = channels 4..7
    torch.testing.assert_close(mha.merge_heads(heads), x, atol=0, rtol=0)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible by n_head"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="n_head must be a positive integer"):
        MultiHeadAttention(8, 0)
    with pytest.raises(ValueError, match="dropout"):
        MultiHeadAttention(8, 2, dropout=1.0)
    mha = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, 8\]"):
        mha(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="context must have shape"):
        mha(torch.randn(2, 5, 8), context=torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match="causal=True needs as many keys"):
        mha(torch.randn(2, 5, 8), context=torch.randn(2, 4, 8), causal=True)
    q = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="same feature size"):
        scaled_dot_product_attention(q, torch.randn(2, 4, 6), torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="same number of positions"):
        scaled_dot_product_attention(q, torch.randn(2, 4, 8), torch.randn(2, 5, 8))
    with pytest.raises(TypeError, match="bool tensor"):
        scaled_dot_product_attention(q, q, q, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="does not broadcast"):
        scaled_dot_product_attention(q, q, q, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="length T must be a positive integer"):
        causal_mask(0)


def test_fully_masked_row_raises_instead_of_nan():
    q = torch.randn(1, 3, 4)
    mask = causal_mask(3).clone()
    mask[1] = False  # query 1 may see nothing
    with pytest.raises(ValueError, match="blocks every key"):
        scaled_dot_product_attention(q, q, q, mask)
    mha = MultiHeadAttention(4, 2)
    with pytest.raises(ValueError, match="blocks every key"):
        mha(torch.randn(1, 3, 4), mask=torch.zeros(1, 1, 1, 3, dtype=torch.bool))


def test_plot_attention_weights_returns_figure():
    _, weights = scaled_dot_product_attention(*torch.randn(3, 4, 6).unbind(0), causal_mask(4))
    fig = plot_attention_weights(weights, query_labels=list("abcd"), title="test")
    assert isinstance(fig, Figure)
    image = fig.axes[0].images[0]
    assert image.get_array().shape == (4, 4)
    assert fig.axes[0].get_title() == "test"
    plt.close(fig)
    with pytest.raises(ValueError, match="one \\[Tq, Tk\\] matrix"):
        plot_attention_weights(torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="query_labels has 2 entries"):
        plot_attention_weights(torch.rand(4, 4), query_labels=["a", "b"])


def test_demo_main_prints_agreement(capsys):
    main()
    out = capsys.readouterr().out
    assert "nn.MultiheadAttention" in out and "F.scaled_dot_product_attention" in out
