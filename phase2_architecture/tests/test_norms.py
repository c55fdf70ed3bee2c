"""LayerNorm and RMSNorm from scratch == torch.nn.LayerNorm / torch.nn.RMSNorm (outputs and gradients)."""

import pytest
import torch
from torch import nn

from phase2_architecture.src.norms import LayerNorm, RMSNorm, make_norm


def _randomise(*modules):
    """Give the learned gain/bias random values so the comparison exercises them."""
    g = torch.Generator().manual_seed(1)
    params = [p for p in modules[0].parameters()]
    for i, p in enumerate(params):
        value = torch.randn(p.shape, generator=g)
        for m in modules:
            list(m.parameters())[i].data.copy_(value)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch_forward_and_backward(bias):
    torch.manual_seed(0)
    C = 24
    ours, ref = LayerNorm(C, bias=bias).double(), nn.LayerNorm(C, bias=bias).double()
    _randomise(ours, ref)
    x = (torch.randn(3, 7, C, dtype=torch.float64) * 5 + 2).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = ours(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-9)
    for p, p_ref in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-9)


def test_layernorm_state_dict_is_interchangeable_with_torch():
    ours, ref = LayerNorm(8), nn.LayerNorm(8)
    _randomise(ref)
    ours.load_state_dict(ref.state_dict())  # same keys and shapes
    x = torch.randn(4, 8)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


def test_layernorm_gradcheck():
    ln = LayerNorm(5).double()
    _randomise(ln)
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ln(t), (x,))


def test_rmsnorm_matches_torch_forward_and_backward():
    torch.manual_seed(0)
    C = 16
    ours, ref = RMSNorm(C, eps=1e-6).double(), nn.RMSNorm(C, eps=1e-6).double()
    _randomise(ours, ref)
    x = (torch.randn(2, 5, C, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = ours(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-9, atol=1e-9)


def test_normalised_statistics():
    x = torch.randn(10, 32) * 7 + 3
    y = LayerNorm(32)(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(10), atol=1e-3, rtol=0)
    r = RMSNorm(32)(x)
    torch.testing.assert_close(r.pow(2).mean(-1).sqrt(), torch.ones(10), atol=1e-4, rtol=0)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="last dimension of 8"):
        LayerNorm(8)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="last dimension of 8"):
        RMSNorm(8)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="Unknown norm"):
        make_norm("batchnorm", 8)
    with pytest.raises(ValueError, match="positive"):
        LayerNorm(0)
