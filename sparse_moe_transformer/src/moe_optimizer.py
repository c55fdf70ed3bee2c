"""Muon for the hidden matrices, AdamW for everything else: one optimizer, one state dict, one step.

Muon (Keller Jordan, 2024; torch.optim.Muon) updates a weight matrix W with the orthogonalised
momentum of its gradient:

    m   <- momentum * m + (1 - momentum) * g              (torch: m.lerp_(g, 1 - momentum))
    u   =  g + momentum * (m - g)  (Nesterov)  or  m
    O   ~  U V^T  of u = U S V^T                          (5 Newton-Schulz steps, in bfloat16)
    W   <- W * (1 - lr * weight_decay) - lr * sqrt(max(1, A / B)) * O     for W [A, B]

so every direction of the update has about the same size, whatever the gradient's spectrum.
torch.optim.Muon takes 2-D parameters only; the experts of a MoE layer are stacked as one
parameter w1 [E, C, F]. Here a parameter [..., A, B] is a stack of matrices, and each [A, B] slice
(each expert) is orthogonalised separately by a batched Newton-Schulz: the result equals
torch.optim.Muon run on E separate matrices (tests/test_moe_optimizer.py checks it step for step).

Embeddings, norms, biases, the router and the head keep AdamW (as in modded-nanogpt): they are
not hidden matrices (a lookup table, vectors, or an output layer whose scale matters).

Learning rates: the training schedule writes one lr into every group (Phase 3's
set_learning_rate); a Muon group multiplies it by its `lr_ratio` (= muon_lr / max_lr), so both
follow the same warm-up and decay with their own peak.
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's (Keller Jordan's) quintic


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """G [..., A, B] -> about U V^T for each [A, B] slice (its singular values pushed towards 1).

    X <- a X + (b X X^T + c (X X^T)^2) X, after scaling X to Frobenius norm 1 (so every singular
    value is <= 1), on the wide orientation (A <= B, so X X^T is the small Gram matrix). bfloat16,
    as in torch.optim.Muon: the iteration only needs the singular values to land near 1.
    """
    a, b, c = NS_COEFFICIENTS
    X = G.bfloat16().reshape(-1, *G.shape[-2:])  # [S, A, B]: S slices
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # [S, B, A]
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = X @ X.mT  # [S, a, a], a = the short side
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b gram + c gram^2
        X = torch.baddbmm(X, update, X, beta=a)  # a X + update @ X
    return (X.mT if tall else X).reshape(G.shape)


class MuonAdamW(torch.optim.Optimizer):
    """Param groups with use_muon=True get Muon (their lr x lr_ratio), the others AdamW (= torch's)."""

    def __init__(
        self,
        muon_params: list[torch.nn.Parameter],
        adamw_groups: list[dict],
        *,
        lr: float,
        lr_ratio: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        muon_weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
    ):
        for p in muon_params:
            if p.dim() < 2:
                raise ValueError(
                    f"Muon updates matrices (or stacks of them): got a parameter of shape {p.shape}"
                )
        groups = [
            dict(params=list(muon_params), use_muon=True, lr_ratio=lr_ratio, momentum=momentum,
                 nesterov=nesterov, weight_decay=muon_weight_decay),
            *(dict(g, use_muon=False) for g in adamw_groups),
        ]  # fmt: skip
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    (self._muon if group["use_muon"] else self._adamw)(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        g, state = p.grad, self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        m, beta = state["momentum_buffer"], group["momentum"]
        m.lerp_(g, 1 - beta)  # m = beta m + (1 - beta) g
        update = g.lerp(m, beta) if group["nesterov"] else m
        update = newton_schulz(update)  # [..., A, B], each slice orthogonalised
        lr = group["lr"] * group["lr_ratio"]
        A, B = p.shape[-2:]
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-lr * math.sqrt(max(1, A / B)))

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        g, state = p.grad, self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        state["step"] += 1
        t, (beta1, beta2), lr = state["step"], group["betas"], group["lr"]
        state["exp_avg"].lerp_(g, 1 - beta1)  # m = beta1 m + (1 - beta1) g
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v = beta2 v + (1 - beta2) g^2
        p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))  # bias-corrected m / sqrt(v)
