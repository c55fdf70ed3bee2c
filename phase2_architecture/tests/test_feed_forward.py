"""GELU (both forms) == torch; the GELU FFN and SwiGLU FFN against explicit reference formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from phase2_architecture.src.feed_forward import (
    GELU,
    GELUFeedForward,
    SwiGLUFeedForward,
    gelu,
    make_feed_forward,
    silu,
    swiglu_hidden_size,
)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_torch(approximate):
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = gelu(x, approximate), F.gelu(x_ref, approximate=approximate)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(GELU(approximate)(x_ref.detach()), y_ref.detach())


def test_gelu_forms_differ_slightly_and_silu_matches_torch():
    x = torch.randn(1000, dtype=torch.float64) * 3
    diff = (gelu(x, "none") - gelu(x, "tanh")).abs().max()
    assert 0 < diff < 1e-3  # an approximation, not the same function
    torch.testing.assert_close(silu(x), F.silu(x))


def test_gelu_ffn_is_linear_gelu_linear():
    torch.manual_seed(0)
    ffn = GELUFeedForward(12, dropout=0.0)
    assert ffn.up_proj.weight.shape == (48, 12)  # hidden = 4 * d_model
    x = torch.randn(2, 5, 12)
    expected = F.linear(
        F.gelu(F.linear(x, ffn.up_proj.weight, ffn.up_proj.bias)), ffn.down_proj.weight, ffn.down_proj.bias
    )
    torch.testing.assert_close(ffn(x), expected)


def test_swiglu_matches_reference_formula_and_grads():
    torch.manual_seed(0)
    C, H = 16, 40
    ffn = SwiGLUFeedForward(C, H).double()
    x = torch.randn(3, 4, C, dtype=torch.float64, requires_grad=True)
    W1, W3, W2 = ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight
    # Shazeer (2020): FFN_SwiGLU(x) = (Swish_1(x W) ⊗ x V) W2
    expected = ((x @ W1.T) * torch.sigmoid(x @ W1.T) * (x @ W3.T)) @ W2.T
    torch.testing.assert_close(ffn(x), expected)
    assert torch.autograd.gradcheck(lambda t: ffn(t), (x[:1, :2].detach().requires_grad_(True),))


def test_swiglu_hidden_size_keeps_parameter_count_of_4x_gelu():
    for C in (64, 192, 768, 4096):
        H = swiglu_hidden_size(C)
        assert H % 64 == 0 and H >= 8 * C / 3
        swiglu_params = 3 * C * H
        gelu_params = 2 * C * 4 * C
        assert abs(swiglu_params - gelu_params) / gelu_params < 3 * 64 / (8 * C / 3) + 1e-9
    assert swiglu_hidden_size(4096, multiple_of=256) == 11008  # Llama-7B's hidden size
    assert math.isclose(swiglu_hidden_size(768, multiple_of=1), 2048)


def test_bad_arguments():
    with pytest.raises(ValueError, match="approximation"):
        gelu(torch.zeros(1), "fast")
    with pytest.raises(ValueError, match="approximation"):
        GELU("sigmoid")
    with pytest.raises(ValueError, match="Unknown feed-forward"):
        make_feed_forward("relu", 8)
    with pytest.raises(ValueError, match="d_ff must be a positive integer, got 0"):
        GELUFeedForward(8, d_ff=0)
    with pytest.raises(ValueError, match="multiple_of must be a positive integer, got 0"):
        swiglu_hidden_size(8, multiple_of=0)
