"""Backpropagation from scratch in NumPy: a small tanh network learns XOR (and OR).

The network (L layers, sizes layers = [n_0, n_1, ..., n_L]):

    A0 = X                                   # [N, n_0]   a batch of N inputs
    Zl = A(l-1) @ Wl + bl                    # [N, n_l]   Wl [n_(l-1), n_l], bl [1, n_l]
    Al = tanh(Zl)        for hidden layers   # [N, n_l]
    AL = ZL              (linear output)     # [N, n_L] = Y_hat

The loss is the mean squared error over every element of the batch (what torch.nn.MSELoss
computes by default):

    L = 1/(N·K) · Σ_n Σ_k (Y_hat[n,k] - Y[n,k])²         with K = n_L outputs

Backward pass: the chain rule, layer by layer from the output, each step the exact derivative of
the forward step above it:

    dZL = dL/dY_hat = 2 (Y_hat - Y) / (N·K)  # [N, n_L]   the ONLY division by the batch size
    dWl = A(l-1)ᵀ @ dZl                      # [n_(l-1), n_l]  sums over the batch: no 1/N here
    dbl = Σ_n dZl[n]                         # [1, n_l]
    dA(l-1) = dZl @ Wlᵀ                      # [N, n_(l-1)]
    dZ(l-1) = dA(l-1) * (1 - A(l-1)²)        # tanh'(z) = 1 - tanh(z)²

The mean's 1/(N·K) enters once, in dZL; the matrix products then *sum* the per-example
contributions. Dividing dWl by N again (as the public project this course is modelled on does)
would give gradients N times too small for the loss that is printed — the gradient check and the
torch comparison in tests/ catch exactly that.

Run `python phase1_foundation/src/backprop_from_scratch.py` to train on XOR and OR.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

XOR_X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # [4, 2]
XOR_Y = np.array([[0.0], [1.0], [1.0], [0.0]])  # [4, 1]
OR_Y = np.array([[0.0], [1.0], [1.0], [1.0]])  # [4, 1]


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------
def mse_loss(y_hat: np.ndarray, y: np.ndarray) -> float:
    """L = mean over batch and outputs of (y_hat - y)², a scalar."""
    y_hat, y = np.asarray(y_hat, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if y_hat.shape != y.shape:
        raise ValueError(f"predictions {y_hat.shape} and targets {y.shape} must have the same shape.")
    return float(np.mean((y_hat - y) ** 2))


def mse_loss_grad(y_hat: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dL/dy_hat = 2 (y_hat - y) / (N·K): the derivative of `mse_loss`, same shape as y_hat."""
    return 2.0 * (y_hat - y) / y_hat.size


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------
def _check_layers(layers) -> list[int]:
    layers = list(layers)
    if len(layers) < 2 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in layers):
        raise ValueError(
            f"layers must list at least two positive layer sizes [n_in, ..., n_out], got {layers!r}."
        )
    return [int(n) for n in layers]


def init_params(layers, rng: np.random.Generator | None = None, seed: int | None = None) -> dict:
    """W_l ~ randn(n_in, n_out) * 0.1 and b_l = 0 for every layer, as a dict {'W1', 'b1', ...}.

    Pass `rng` (a np.random.Generator) or `seed` for reproducible weights.
    """
    layers = _check_layers(layers)
    if rng is None:
        rng = np.random.default_rng(seed)
    params = {}
    for l in range(1, len(layers)):
        n_in, n_out = layers[l - 1], layers[l]
        params[f"W{l}"] = rng.standard_normal((n_in, n_out)) * 0.1  # [n_in, n_out]
        params[f"b{l}"] = np.zeros((1, n_out))  # [1, n_out], broadcast over the batch
    return params


def _check_finite(loss: float, epoch: int, lr: float) -> None:
    if not np.isfinite(loss):
        raise FloatingPointError(
            f"the loss diverged to {loss} at epoch {epoch}: the learning rate {lr} is too large "
            "for this network; lower it (e.g. halve it)."
        )


# ----------------------------------------------------------------------------------------------
# The network as a class with a loop over layers
# ----------------------------------------------------------------------------------------------
class TinyNN:
    """A fully connected network: tanh hidden layers, linear output, MSE loss, plain gradient descent.

    Attributes:
        params: {'W1': [n_0, n_1], 'b1': [1, n_1], ...}
        cache:  values saved by `forward` for `backward`: {'A0': X, 'Z1', 'A1', ..., 'ZL', 'AL'}
        grads:  filled by `backward`: {'dW1', 'db1', ...}, same shapes as the parameters
    """

    def __init__(self, layers, seed: int | None = None, rng: np.random.Generator | None = None):
        self.layers = _check_layers(layers)
        self.n_layers = len(self.layers) - 1  # number of weight matrices
        self.params = init_params(self.layers, rng=rng, seed=seed)
        self.cache: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}

    def forward(self, X: np.ndarray) -> np.ndarray:
        """X [N, n_0] -> Y_hat [N, n_L]; stores every Zl and Al in self.cache."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.layers[0]:
            raise ValueError(f"X must have shape [N, {self.layers[0]}], got {X.shape}.")
        A = X
        self.cache = {"A0": X}
        for l in range(1, self.n_layers + 1):
            Z = A @ self.params[f"W{l}"] + self.params[f"b{l}"]  # [N, n_l]
            A = Z if l == self.n_layers else np.tanh(Z)  # linear output layer, tanh hidden layers
            self.cache[f"Z{l}"] = Z
            self.cache[f"A{l}"] = A
        return A

    def loss(self, y_hat: np.ndarray, y: np.ndarray) -> float:
        return mse_loss(y_hat, y)

    def backward(self, y: np.ndarray) -> dict:
        """Gradients of mse_loss(forward(X), y) w.r.t. every parameter, from the cached forward pass."""
        if not self.cache:
            raise RuntimeError("call forward(X) before backward(y): backward reuses the cached activations.")
        L = self.n_layers
        y_hat = self.cache[f"A{L}"]
        dZ = mse_loss_grad(y_hat, np.asarray(y, dtype=np.float64))  # [N, n_L], includes 1/(N·K)
        self.grads = {}
        for l in range(L, 0, -1):
            A_prev = self.cache[f"A{l - 1}"]  # [N, n_(l-1)]
            self.grads[f"dW{l}"] = A_prev.T @ dZ  # [n_(l-1), n_l], summed over the batch
            self.grads[f"db{l}"] = dZ.sum(axis=0, keepdims=True)  # [1, n_l]
            if l > 1:
                dA_prev = dZ @ self.params[f"W{l}"].T  # [N, n_(l-1)]
                dZ = dA_prev * (1.0 - A_prev**2)  # tanh'(Z) = 1 - tanh(Z)²
        return self.grads

    def step(self, lr: float) -> None:
        """Gradient descent: W <- W - lr * dW for every parameter."""
        for name in self.params:
            self.params[name] -= lr * self.grads[f"d{name}"]

    def train(self, X, y, epochs: int = 2000, lr: float = 0.2, print_every: int | None = 500) -> list[float]:
        """Full-batch gradient descent; prints `Epoch X, Loss: Y` every `print_every` epochs."""
        losses = []
        for epoch in range(epochs):
            loss = self.loss(self.forward(X), y)
            _check_finite(loss, epoch, lr)
            self.backward(y)
            self.step(lr)
            losses.append(loss)
            if print_every and (epoch % print_every == 0 or epoch == epochs - 1):
                print(f"Epoch {epoch}, Loss: {loss:.4e}")
        return losses

    def predict(self, X) -> np.ndarray:
        return self.forward(X)


# ----------------------------------------------------------------------------------------------
# The same one-hidden-layer network, every matrix step written out
# ----------------------------------------------------------------------------------------------
def explicit_forward_backward(X: np.ndarray, Y: np.ndarray, params: dict) -> tuple[float, dict, np.ndarray]:
    """One hidden layer [n_in, H, n_out], no loops: returns (loss, grads, Y_hat)."""
    W1, b1, W2, b2 = params["W1"], params["b1"], params["W2"], params["b2"]
    N, K = Y.shape
    # forward
    Z1 = X @ W1 + b1  # [N, H]
    A1 = np.tanh(Z1)  # [N, H]
    Z2 = A1 @ W2 + b2  # [N, K]
    Y_hat = Z2  # [N, K] linear output
    loss = np.sum((Y_hat - Y) ** 2) / (N * K)  # mean squared error
    # backward
    dZ2 = 2.0 * (Y_hat - Y) / (N * K)  # [N, K] dL/dY_hat, the one division by the batch size
    dW2 = A1.T @ dZ2  # [H, K]
    db2 = np.sum(dZ2, axis=0, keepdims=True)  # [1, K]
    dA1 = dZ2 @ W2.T  # [N, H]
    dZ1 = dA1 * (1.0 - A1**2)  # [N, H]   tanh' = 1 - tanh²
    dW1 = X.T @ dZ1  # [n_in, H]
    db1 = np.sum(dZ1, axis=0, keepdims=True)  # [1, H]
    grads = {"dW1": dW1, "db1": db1, "dW2": dW2, "db2": db2}
    return float(loss), grads, Y_hat


def train_explicit(
    X, Y, hidden: int = 8, epochs: int = 2000, lr: float = 0.2, seed: int | None = 0, print_every=None
) -> tuple[dict, list[float]]:
    """Train the explicit network; same init as TinyNN([n_in, hidden, n_out], seed=seed)."""
    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    params = init_params([X.shape[1], hidden, Y.shape[1]], seed=seed)
    losses = []
    for epoch in range(epochs):
        loss, grads, _ = explicit_forward_backward(X, Y, params)
        _check_finite(loss, epoch, lr)
        params["W1"] -= lr * grads["dW1"]
        params["b1"] -= lr * grads["db1"]
        params["W2"] -= lr * grads["dW2"]
        params["b2"] -= lr * grads["db2"]
        losses.append(loss)
        if print_every and (epoch % print_every == 0 or epoch == epochs - 1):
            print(f"Epoch {epoch}, Loss: {loss:.4e}")
    return params, losses


# ----------------------------------------------------------------------------------------------
# Numerical gradient check
# ----------------------------------------------------------------------------------------------
def numerical_gradients(params: dict, loss_fn: Callable[[dict], float], eps: float = 1e-5) -> dict:
    """Central differences: dL/dθ_i ≈ (L(θ + eps·e_i) - L(θ - eps·e_i)) / (2·eps), for every entry.

    `loss_fn(params)` must compute the loss from the arrays in `params`; they are perturbed in
    place one entry at a time and restored afterwards. Returns {name: gradient array}.
    """
    numeric = {}
    for name, theta in params.items():
        if not isinstance(theta, np.ndarray) or not np.issubdtype(theta.dtype, np.floating):
            raise TypeError(f"parameter {name!r} must be a float NumPy array, got {type(theta).__name__}.")
        grad = np.zeros_like(theta)
        for idx in np.ndindex(theta.shape):
            original = theta[idx]
            theta[idx] = original + eps
            loss_plus = loss_fn(params)
            theta[idx] = original - eps
            loss_minus = loss_fn(params)
            theta[idx] = original  # restore
            grad[idx] = (loss_plus - loss_minus) / (2.0 * eps)
        numeric[name] = grad
    return numeric


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / (||a|| + ||b||), 0 when both are zero."""
    denom = np.linalg.norm(a) + np.linalg.norm(b)
    return 0.0 if denom == 0 else float(np.linalg.norm(a - b) / denom)


def gradient_check(
    params: dict, analytic_grads: dict, loss_fn: Callable[[dict], float], eps: float = 1e-5
) -> dict[str, float]:
    """Relative error between analytic and numerical gradients for every parameter.

    `analytic_grads` may be keyed like the parameters ('W1') or with a 'd' prefix ('dW1').
    In float64, errors below ~1e-7 mean the backward pass is right; a wrong factor gives ~1e-1.
    """
    numeric = numerical_gradients(params, loss_fn, eps)
    errors = {}
    for name in params:
        key = name if name in analytic_grads else f"d{name}"
        if key not in analytic_grads:
            raise KeyError(
                f"no analytic gradient for parameter {name!r} (looked for {name!r} and 'd{name}')."
            )
        if analytic_grads[key].shape != params[name].shape:
            raise ValueError(
                f"gradient {key!r} has shape {analytic_grads[key].shape}, parameter has {params[name].shape}."
            )
        errors[name] = relative_error(analytic_grads[key], numeric[name])
    return errors


# ----------------------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------------------
def _print_predictions(title: str, X: np.ndarray, Y: np.ndarray, Y_hat: np.ndarray) -> None:
    print(f"{title} predictions:")
    for x, y, y_hat in zip(X, Y, Y_hat):
        rounded = int(round(y_hat[0]))
        print(f"  {x.astype(int).tolist()} -> {y_hat[0]: .4f} (rounded {rounded}, target {int(y[0])})")


def main() -> None:
    for name, Y in (("XOR", XOR_Y), ("OR", OR_Y)):
        print(f"=== {name}: TinyNN([2, 8, 1]), lr 0.2 ===")
        net = TinyNN([2, 8, 1], seed=0)
        net.train(XOR_X, Y, epochs=2000, lr=0.2, print_every=250)
        _print_predictions(name, XOR_X, Y, net.predict(XOR_X))
    print("=== XOR: the explicit-matrix version, same init ===")
    params, losses = train_explicit(XOR_X, XOR_Y, hidden=8, epochs=2000, lr=0.2, seed=0, print_every=500)
    _, _, Y_hat = explicit_forward_backward(XOR_X, XOR_Y, params)
    _print_predictions("XOR (explicit)", XOR_X, XOR_Y, Y_hat)
    print("=== gradient check on random data, TinyNN([3, 5, 4, 2]) ===")
    rng = np.random.default_rng(1)
    X, Y = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    net = TinyNN([3, 5, 4, 2], seed=1)
    net.forward(X)
    net.backward(Y)
    errors = gradient_check(net.params, net.grads, lambda p: net.loss(net.forward(X), Y))
    for name, err in errors.items():
        print(f"  {name}: relative error {err:.2e}")


if __name__ == "__main__":
    main()
