"""The backward pass is the exact derivative of the printed loss: numerically and against torch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from phase1_foundation.src.backprop_from_scratch import (
    TinyNN,
    explicit_forward_backward,
    gradient_check,
    mse_loss,
    mse_loss_grad,
    numerical_gradients,
    relative_error,
)

ARCHITECTURES = [[2, 4, 1], [3, 5, 4, 2], [4, 8, 8, 8, 3]]


def random_problem(layers, seed, n=6):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, layers[0]))
    Y = rng.standard_normal((n, layers[-1]))
    net = TinyNN(layers, rng=rng)
    for name in net.params:  # larger random weights and non-zero biases exercise every term
        net.params[name][...] = rng.standard_normal(net.params[name].shape) * 0.7
    return net, X, Y


@pytest.mark.parametrize("layers", ARCHITECTURES)
@pytest.mark.parametrize("seed", [0, 1])
def test_analytic_gradients_match_central_differences(layers, seed):
    net, X, Y = random_problem(layers, seed)
    net.forward(X)
    grads = {k: v.copy() for k, v in net.backward(Y).items()}
    errors = gradient_check(net.params, grads, lambda p: net.loss(net.forward(X), Y))
    assert set(errors) == set(net.params)  # every parameter was checked
    for name, err in errors.items():
        assert err < 1e-6, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("layers", ARCHITECTURES)
def test_backward_equals_torch_autograd(layers):
    """Same numbers through torch: F.mse_loss (mean) and autograd give the reference gradients."""
    net, X, Y = random_problem(layers, seed=2, n=9)
    loss = net.loss(net.forward(X), Y)
    grads = net.backward(Y)
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in net.params.items()}
    a = torch.tensor(X)
    for l in range(1, len(layers)):
        z = a @ tparams[f"W{l}"] + tparams[f"b{l}"]
        a = z if l == len(layers) - 1 else torch.tanh(z)
    tloss = F.mse_loss(a, torch.tensor(Y))
    tloss.backward()
    assert loss == pytest.approx(tloss.item(), rel=1e-12)
    for name, p in tparams.items():
        np.testing.assert_allclose(grads[f"d{name}"], p.grad.numpy(), rtol=1e-10, atol=1e-13)


def test_gradients_do_not_depend_on_duplicating_the_batch():
    """Stacking the batch twice leaves a mean loss and its gradients unchanged.

    A backward pass that divides by the batch size twice would halve every gradient here.
    """
    net, X, Y = random_problem([3, 5, 2], seed=3, n=5)
    net.forward(X)
    grads = {k: v.copy() for k, v in net.backward(Y).items()}
    net.forward(np.vstack([X, X]))
    grads_doubled = net.backward(np.vstack([Y, Y]))
    for k in grads:
        np.testing.assert_allclose(grads_doubled[k], grads[k], rtol=1e-12, atol=1e-15)


def test_double_division_bug_would_be_caught():
    """The check is sharp: the same gradients divided by N once more fail it by a wide margin."""
    net, X, Y = random_problem([2, 4, 1], seed=4, n=8)
    net.forward(X)
    buggy = {k: v / X.shape[0] for k, v in net.backward(Y).items()}
    errors = gradient_check(net.params, buggy, lambda p: net.loss(net.forward(X), Y))
    assert min(errors.values()) > 0.5  # (1 - 1/8) / (1 + 1/8) = 0.78


def test_explicit_version_passes_gradient_check():
    rng = np.random.default_rng(5)
    X, Y = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    params = {
        "W1": rng.standard_normal((3, 4)),
        "b1": rng.standard_normal((1, 4)),
        "W2": rng.standard_normal((4, 2)),
        "b2": rng.standard_normal((1, 2)),
    }
    _, grads, _ = explicit_forward_backward(X, Y, params)
    errors = gradient_check(params, grads, lambda p: explicit_forward_backward(X, Y, p)[0])
    assert max(errors.values()) < 1e-6


def test_numerical_gradients_on_a_known_function():
    """For L = sum(a * w²) + b·c the gradient is 2 a w, c, b: the checker itself is right."""
    rng = np.random.default_rng(6)
    a = rng.standard_normal((3, 2))
    params = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(4), "c": rng.standard_normal(4)}
    before = {k: v.copy() for k, v in params.items()}
    numeric = numerical_gradients(params, lambda p: float(np.sum(a * p["w"] ** 2) + p["b"] @ p["c"]))
    np.testing.assert_allclose(numeric["w"], 2 * a * params["w"], rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(numeric["b"], params["c"], rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(numeric["c"], params["b"], rtol=1e-8, atol=1e-9)
    for k in params:  # parameters restored exactly
        np.testing.assert_array_equal(params[k], before[k])


def test_mse_grad_is_derivative_of_mse():
    rng = np.random.default_rng(7)
    y_hat, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    numeric = numerical_gradients({"y_hat": y_hat}, lambda p: mse_loss(p["y_hat"], y))["y_hat"]
    np.testing.assert_allclose(mse_loss_grad(y_hat, y), numeric, rtol=1e-8, atol=1e-11)
    assert mse_loss(y_hat, y) == pytest.approx(np.mean((y_hat - y) ** 2))


def test_relative_error_and_checker_errors():
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_error(np.ones(3), -np.ones(3)) == pytest.approx(1.0)
    params = {"w": np.ones(2)}
    with pytest.raises(KeyError, match="no analytic gradient for parameter 'w'"):
        gradient_check(params, {"v": np.ones(2)}, lambda p: float(p["w"].sum()))
    with pytest.raises(ValueError, match="has shape"):
        gradient_check(params, {"dw": np.ones(3)}, lambda p: float(p["w"].sum()))
    with pytest.raises(TypeError, match="float NumPy array"):
        numerical_gradients({"w": np.ones(2, dtype=int)}, lambda p: 0.0)
