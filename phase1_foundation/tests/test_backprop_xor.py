"""TinyNN and the explicit-matrix network learn XOR (and OR) and agree with each other step by step."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from phase1_foundation.src.backprop_from_scratch import (
    OR_Y,
    XOR_X,
    XOR_Y,
    TinyNN,
    explicit_forward_backward,
    init_params,
    train_explicit,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tinynn_learns_xor(seed):
    net = TinyNN([2, 8, 1], seed=seed)
    losses = net.train(XOR_X, XOR_Y, epochs=2000, lr=0.2, print_every=None)
    assert losses[0] > 0.2  # it starts out wrong (a constant guess scores 0.25)
    assert losses[-1] < 1e-3
    y_hat = net.predict(XOR_X)
    np.testing.assert_array_equal((y_hat > 0.5).astype(float), XOR_Y)  # the truth table


def test_tinynn_learns_or_with_two_hidden_layers():
    net = TinyNN([2, 6, 6, 1], seed=0)
    losses = net.train(XOR_X, OR_Y, epochs=2000, lr=0.1, print_every=None)
    assert losses[-1] < 1e-3
    np.testing.assert_array_equal((net.predict(XOR_X) > 0.5).astype(float), OR_Y)


def test_explicit_version_learns_xor():
    params, losses = train_explicit(XOR_X, XOR_Y, hidden=8, epochs=2000, lr=0.2, seed=0)
    assert losses[-1] < 1e-3
    _, _, y_hat = explicit_forward_backward(XOR_X, XOR_Y, params)
    np.testing.assert_array_equal((y_hat > 0.5).astype(float), XOR_Y)


def test_explicit_and_class_versions_agree():
    """Same init -> same loss, gradients and trained weights (the class loop = the written-out steps)."""
    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((7, 3)), rng.standard_normal((7, 2))
    net = TinyNN([3, 5, 2], seed=4)
    params = {k: v.copy() for k, v in init_params([3, 5, 2], seed=4).items()}
    for k in params:
        np.testing.assert_array_equal(params[k], net.params[k])
    loss_explicit, grads_explicit, y_hat_explicit = explicit_forward_backward(X, Y, params)
    y_hat = net.forward(X)
    grads = net.backward(Y)
    np.testing.assert_allclose(y_hat, y_hat_explicit, rtol=0, atol=1e-14)
    assert net.loss(y_hat, Y) == pytest.approx(loss_explicit, abs=1e-14)
    for k in grads:
        np.testing.assert_allclose(grads[k], grads_explicit[k], rtol=0, atol=1e-14)
    # after whole training runs the weights still agree
    net = TinyNN([2, 8, 1], seed=0)
    class_losses = net.train(XOR_X, XOR_Y, epochs=300, lr=0.2, print_every=None)
    trained, explicit_losses = train_explicit(XOR_X, XOR_Y, hidden=8, epochs=300, lr=0.2, seed=0)
    np.testing.assert_allclose(class_losses, explicit_losses, rtol=0, atol=1e-12)
    for k in trained:
        np.testing.assert_allclose(net.params[k], trained[k], rtol=0, atol=1e-12)


def test_init_matches_spec_and_seed_reproduces():
    a, b, c = TinyNN([2, 4, 3], seed=5), TinyNN([2, 4, 3], seed=5), TinyNN([2, 4, 3], seed=6)
    assert set(a.params) == {"W1", "b1", "W2", "b2"}
    assert a.params["W1"].shape == (2, 4) and a.params["b1"].shape == (1, 4)
    assert a.params["W2"].shape == (4, 3) and a.params["b2"].shape == (1, 3)
    np.testing.assert_array_equal(a.params["W1"], b.params["W1"])
    assert not np.array_equal(a.params["W1"], c.params["W1"])
    expected_w1 = np.random.default_rng(5).standard_normal((2, 4)) * 0.1
    np.testing.assert_array_equal(a.params["W1"], expected_w1)
    assert np.all(a.params["b1"] == 0)
    big = TinyNN([50, 400, 1], seed=0).params["W1"]
    assert abs(big.std() - 0.1) < 0.005  # randn * 0.1


def test_cache_and_grads_are_named_per_layer():
    net = TinyNN([2, 3, 3, 1], seed=0)
    net.forward(XOR_X)
    assert set(net.cache) == {"A0", "Z1", "A1", "Z2", "A2", "Z3", "A3"}
    np.testing.assert_array_equal(net.cache["A1"], np.tanh(net.cache["Z1"]))  # tanh hidden
    np.testing.assert_array_equal(net.cache["A3"], net.cache["Z3"])  # linear output
    net.backward(XOR_Y)
    assert set(net.grads) == {"dW1", "db1", "dW2", "db2", "dW3", "db3"}


def test_training_prints_epoch_and_loss(capsys):
    TinyNN([2, 4, 1], seed=0).train(XOR_X, XOR_Y, epochs=21, lr=0.1, print_every=10)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(",")[0] for line in lines] == ["Epoch 0", "Epoch 10", "Epoch 20"]
    assert all(", Loss: " in line for line in lines)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="at least two positive layer sizes"):
        TinyNN([2])
    with pytest.raises(ValueError, match="at least two positive layer sizes"):
        TinyNN([2, 0, 1])
    net = TinyNN([2, 4, 1], seed=0)
    with pytest.raises(ValueError, match=r"X must have shape \[N, 2\]"):
        net.forward(np.zeros((4, 3)))
    with pytest.raises(RuntimeError, match="call forward"):
        TinyNN([2, 4, 1]).backward(XOR_Y)
    with pytest.raises(ValueError, match="same shape"):
        net.loss(np.zeros((4, 1)), np.zeros(4))
    with np.errstate(over="ignore", invalid="ignore"), pytest.raises(FloatingPointError, match="too large"):
        TinyNN([2, 8, 1], seed=0).train(XOR_X, XOR_Y, epochs=200, lr=100.0, print_every=None)


def test_script_runs_and_prints_training_and_predictions():
    script = Path(__file__).resolve().parents[1] / "src" / "backprop_from_scratch.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Epoch 0, Loss: " in result.stdout and "Epoch 1999, Loss: " in result.stdout
    assert "XOR predictions:" in result.stdout and "OR predictions:" in result.stdout
    assert "target" in result.stdout and "relative error" in result.stdout
