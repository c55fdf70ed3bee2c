"""Linear, Embedding, softmax, log-softmax, logsumexp, cross-entropy and SiLU equal torch's."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from phase1_foundation.src.primitives import (
    Embedding,
    Linear,
    cross_entropy,
    log_softmax,
    logsumexp,
    naive_softmax,
    sigmoid,
    silu,
    softmax,
)


def test_linear_equals_nn_linear_in_values_gradients_and_state_dict():
    torch.manual_seed(0)
    ours, theirs = Linear(7, 5), nn.Linear(7, 5)
    theirs.load_state_dict(ours.state_dict())  # same keys and shapes
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    ours.double(), theirs.double()
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y_ours)
    grads_ours = torch.autograd.grad(y_ours, [x, ours.weight, ours.bias], g)
    grads_theirs = torch.autograd.grad(y_theirs, [x, theirs.weight, theirs.bias], g)
    for a, b in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    no_bias = Linear(7, 5, bias=False)
    assert no_bias.bias is None and set(no_bias.state_dict()) == {"weight"}
    with pytest.raises(ValueError, match=r"\[\.\.\., 7\]"):
        ours(torch.randn(2, 6, dtype=torch.float64))


def test_linear_init_has_torch_bounds():
    layer = Linear(400, 300)
    bound = 1 / math.sqrt(400)
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.95 * bound
    assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform's std


def test_embedding_equals_nn_embedding_and_accumulates_gradients_of_repeated_ids():
    torch.manual_seed(0)
    ours = Embedding(10, 4)
    theirs = nn.Embedding(10, 4)
    theirs.load_state_dict(ours.state_dict())
    idx = torch.tensor([[1, 3, 3], [9, 0, 3]])
    torch.testing.assert_close(ours(idx), theirs(idx), rtol=0, atol=0)
    g = torch.randn(2, 3, 4)
    (ours(idx) * g).sum().backward()
    (theirs(idx) * g).sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.weight.grad[3], g[0, 1] + g[0, 2] + g[1, 2])  # row 3 used three times
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        ours(torch.tensor([10]))
    with pytest.raises(TypeError, match="integer"):
        ours(torch.tensor([1.0]))


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_softmax_log_softmax_logsumexp_equal_torch_even_for_huge_logits(scale):
    x = torch.randn(6, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * scale
    x.requires_grad_()
    for ours, theirs in [
        (softmax, torch.softmax),
        (log_softmax, torch.log_softmax),
        (logsumexp, torch.logsumexp),
    ]:
        for dim in (0, -1):
            a, b = ours(x, dim=dim), theirs(x, dim=dim)
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            g = torch.randn_like(a)
            torch.testing.assert_close(
                torch.autograd.grad(a, x, g)[0], torch.autograd.grad(b, x, g)[0], rtol=1e-10, atol=1e-12
            )


def test_naive_softmax_overflows_where_the_stable_one_does_not():
    logits = torch.tensor([1000.0, 999.0, 990.0])  # float32: exp(1000) = inf
    assert torch.isnan(naive_softmax(logits)).any()
    stable = softmax(logits)
    assert torch.isfinite(stable).all()
    torch.testing.assert_close(stable, torch.softmax(logits, -1))
    small = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(naive_softmax(small), softmax(small))  # equal where it does not overflow
    # log(softmax) underflows to -inf for a tiny probability; log_softmax stays exact
    far = torch.tensor([0.0, -200.0])
    assert torch.log(softmax(far))[1] == -math.inf
    assert log_softmax(far)[1].item() == pytest.approx(-200.0)


def test_cross_entropy_equals_torch_with_ignore_index_and_large_logits():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(20, 9, generator=g, dtype=torch.float64) * 50).requires_grad_()
    targets = torch.randint(0, 9, (20,), generator=g)
    targets[[2, 5, 11]] = -100
    ours, theirs = cross_entropy(logits, targets), F.cross_entropy(logits, targets)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(ours, logits)[0], torch.autograd.grad(theirs, logits)[0], rtol=1e-10, atol=1e-14
    )
    uniform = torch.zeros(4, 7)
    assert cross_entropy(uniform, torch.tensor([0, 1, 2, 3])).item() == pytest.approx(math.log(7))
    with pytest.raises(ValueError, match="flatten"):
        cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="nothing to average"):
        cross_entropy(torch.zeros(2, 3), torch.tensor([-100, -100]))
    with pytest.raises(ValueError, match="targets must be in"):
        cross_entropy(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_sigmoid_and_silu_equal_torch_and_stay_finite():
    extremes = torch.tensor([-1000.0, 1000.0, 0.0], dtype=torch.float64)
    x = torch.cat([torch.randn(100, dtype=torch.float64) * 5, extremes]).requires_grad_()
    for ours, theirs in [(sigmoid, torch.sigmoid), (silu, F.silu)]:
        a, b = ours(x), theirs(x)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            torch.autograd.grad(a.sum(), x)[0], torch.autograd.grad(b.sum(), x)[0], rtol=1e-10, atol=1e-12
        )
