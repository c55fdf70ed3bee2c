"""Optimizers from scratch: SGD, SGD with momentum, RMSProp, Adam and AdamW.

Each class holds a list of parameters and updates them in `step()` from their `.grad`, with the
same update rule (and the same hyper-parameter conventions) as `torch.optim`; the tests check
step-for-step equality. Notation, per parameter tensor p with gradient g at step t (t = 1, 2, ...):

SGD            p <- p - lr * g
SGD + momentum b <- mu * b + (1 - dampening) * g        (b = g at the first step)
               p <- p - lr * b                            (Nesterov: p <- p - lr * (g + mu * b))
RMSProp        s <- alpha * s + (1 - alpha) * g^2         (running mean of squared gradients)
               p <- p - lr * g / (sqrt(s) + eps)          (per-coordinate step size ~ 1 / RMS(g))
Adam           m <- b1 * m + (1 - b1) * g                 (first moment, "velocity")
               v <- b2 * v + (1 - b2) * g^2               (second moment)
               m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t)     (bias correction: m, v start at 0)
               p <- p - lr * m_hat / (sqrt(v_hat) + eps)
AdamW          p <- p - lr * wd * p   first (decoupled weight decay, Loshchilov & Hutter 2019),
               then the Adam step without weight decay in g.

Weight decay in SGD/RMSProp/Adam is the classic L2 form g <- g + wd * p: it goes through the
adaptive scaling in Adam, so large-gradient weights are barely decayed; AdamW's decoupled decay
shrinks every weight by the same factor, which is why LLMs are trained with AdamW.

Which parameters get weight decay is one rule for the whole course, Phase 2's
`training_utils.weight_decay_groups` (matmul weights yes; biases, norm gains, embedding tables no).

Like torch.optim, parameters whose .grad is None are skipped, and `zero_grad()` sets grads to None.
Each optimizer has an `lr` attribute that a schedule may change between steps
(`phase3_components.src.lr_schedules.set_learning_rate`).
"""

from __future__ import annotations

from typing import Iterable

import torch

from phase1_foundation.src.validation import check_number


class Optimizer:
    """Base class: keeps the parameter list and per-parameter state; subclasses write `step`."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float):
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors (e.g. model.parameters()), not one tensor")
        self.params = list(params)
        if not self.params:
            raise ValueError("the optimizer got an empty parameter list: pass model.parameters()")
        for p in self.params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameters must be tensors, got {type(p).__name__}")
        check_number("lr", lr, low=0)
        self.lr = lr
        self.state: list[dict] = [{} for _ in self.params]  # one dict of buffers per parameter

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients of the last backward pass (torch's default: set them to None)."""
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    def step(self) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """Plain stochastic gradient descent: p <- p - lr * (g + wd * p)."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0):
        super().__init__(params, lr)
        check_number("weight_decay", weight_decay, low=0)
        self.weight_decay = weight_decay

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            g = p.grad + self.weight_decay * p if self.weight_decay else p.grad
            p.sub_(self.lr * g)


class SGDMomentum(Optimizer):
    """SGD with (optionally Nesterov) momentum, torch.optim.SGD's conventions.

    b_1 = g_1,  b_t = momentum * b_{t-1} + (1 - dampening) * g_t
    update = g_t + momentum * b_t (nesterov)  or  b_t (classic);   p <- p - lr * update
    The buffer b is a running (undamped) sum of gradients: with a constant gradient it grows to
    g / (1 - momentum), so momentum 0.9 gives steps 10x larger than plain SGD on flat directions.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, lr)
        check_number("momentum", momentum, low=0, below=1)
        check_number("dampening", dampening, low=0, high=1)
        if nesterov and (momentum == 0.0 or dampening != 0.0):
            raise ValueError("Nesterov momentum needs momentum > 0 and dampening = 0")
        check_number("weight_decay", weight_decay, low=0)
        self.momentum, self.dampening, self.nesterov = momentum, dampening, nesterov
        self.weight_decay = weight_decay

    @torch.no_grad()
    def step(self) -> None:
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            g = p.grad + self.weight_decay * p if self.weight_decay else p.grad.clone()
            if "momentum_buffer" not in state:
                buf = g.clone()  # first step: the buffer starts at the gradient itself
            else:
                buf = self.momentum * state["momentum_buffer"] + (1.0 - self.dampening) * g
            state["momentum_buffer"] = buf
            update = g + self.momentum * buf if self.nesterov else buf
            p.sub_(self.lr * update)


class RMSProp(Optimizer):
    """RMSProp (Hinton, 2012), torch.optim.RMSprop's conventions.

    s <- alpha * s + (1 - alpha) * g^2
    centered: a <- alpha * a + (1 - alpha) * g,  denom = sqrt(s - a^2) + eps   (variance, not 2nd moment)
    otherwise denom = sqrt(s) + eps
    momentum > 0: b <- momentum * b + g / denom;  p <- p - lr * b   else  p <- p - lr * g / denom
    """

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
    ):
        super().__init__(params, lr)
        check_number("alpha", alpha, low=0, below=1)
        check_number("eps", eps, low=0)
        check_number("weight_decay", weight_decay, low=0)
        check_number("momentum", momentum, low=0, below=1)
        self.alpha, self.eps, self.weight_decay = alpha, eps, weight_decay
        self.momentum, self.centered = momentum, centered

    @torch.no_grad()
    def step(self) -> None:
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            g = p.grad + self.weight_decay * p if self.weight_decay else p.grad
            if not state:
                state["square_avg"] = torch.zeros_like(p)
                if self.centered:
                    state["grad_avg"] = torch.zeros_like(p)
                if self.momentum > 0:
                    state["momentum_buffer"] = torch.zeros_like(p)
            state["square_avg"] = self.alpha * state["square_avg"] + (1.0 - self.alpha) * g * g
            if self.centered:
                state["grad_avg"] = self.alpha * state["grad_avg"] + (1.0 - self.alpha) * g
                variance = state["square_avg"] - state["grad_avg"] ** 2
                denom = variance.sqrt() + self.eps
            else:
                denom = state["square_avg"].sqrt() + self.eps
            if self.momentum > 0:
                state["momentum_buffer"] = self.momentum * state["momentum_buffer"] + g / denom
                p.sub_(self.lr * state["momentum_buffer"])
            else:
                p.sub_(self.lr * g / denom)


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) with torch.optim.Adam's conventions (L2 weight decay in the gradient)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, lr)
        beta1, beta2 = betas
        check_number("beta1", beta1, low=0, below=1)
        check_number("beta2", beta2, low=0, below=1)
        check_number("eps", eps, low=0)
        check_number("weight_decay", weight_decay, low=0)
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay

    def _decoupled_decay(self, p: torch.Tensor) -> None:
        """Adam has none (its weight decay is L2, inside the gradient); AdamW overrides this."""

    def _l2_coefficient(self) -> float:
        return self.weight_decay

    @torch.no_grad()
    def step(self) -> None:
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            self._decoupled_decay(p)
            wd = self._l2_coefficient()
            g = p.grad + wd * p if wd else p.grad
            if not state:
                state["t"] = 0
                state["m"] = torch.zeros_like(p)  # first moment  E[g]
                state["v"] = torch.zeros_like(p)  # second moment E[g^2]
            state["t"] += 1
            t = state["t"]
            state["m"] = self.beta1 * state["m"] + (1.0 - self.beta1) * g
            state["v"] = self.beta2 * state["v"] + (1.0 - self.beta2) * g * g
            # Bias correction: m and v start at 0, so early averages are too small by (1 - beta^t).
            m_hat = state["m"] / (1.0 - self.beta1**t)
            v_hat = state["v"] / (1.0 - self.beta2**t)
            p.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


class AdamW(Adam):
    """AdamW: Adam plus decoupled weight decay p <- p * (1 - lr * wd), applied before the Adam step.

    torch.optim.AdamW's default weight_decay is 0.01; so is ours.
    """

    def __init__(
        self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _decoupled_decay(self, p: torch.Tensor) -> None:
        p.mul_(1.0 - self.lr * self.weight_decay)

    def _l2_coefficient(self) -> float:
        return 0.0
