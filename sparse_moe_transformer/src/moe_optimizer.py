"""Muon for the hidden matrices, AdamW for everything else: one optimizer, one state dict, one step.

Muon (Keller Jordan, 2024; torch.optim.Muon) updates a weight matrix W with the orthogonalised
momentum of its gradient:

    m   <- momentum * m + (1 - momentum) * g              (torch: m.lerp_(g, 1 - momentum))
    u   =  g + momentum * (m - g)  (Nesterov)  or  m
    O   ~  U V^T  of u = U S V^T        (5 Newton-Schulz steps, Phase 3's, in the machine's dtype)
    W   <- W * (1 - lr * weight_decay) - lr * sqrt(max(1, A / B)) * O     for W [A, B]

so every direction of the update has about the same size, whatever the gradient's spectrum.
torch.optim.Muon takes 2-D parameters only; the experts of a MoE layer are stacked as one
parameter w1 [E, C, F]. Here a parameter [..., A, B] is a stack of matrices, and each [A, B] slice
(each expert) is orthogonalised separately by Phase 3's batched Newton-Schulz: the result equals
torch.optim.Muon run on E separate matrices (tests/test_moe_optimizer.py checks it step for step).
Newton-Schulz iterates in bf16 where the machine has it natively and measures it faster than fp32,
in fp32 elsewhere (Phase 3's hardware.py): emulated bf16 made a Muon step 4x an AdamW step.

Embeddings, norms, biases, the router and the head keep AdamW (as in modded-nanogpt): they are
not hidden matrices (a lookup table, vectors, or an output layer whose scale matters).

Learning rates: the training schedule writes one lr into every group (Phase 3's
set_learning_rate); a Muon group multiplies it by its `lr_ratio` (= muon_lr / max_lr), so both
follow the same warm-up and decay with their own peak.

make_optimizer builds it (or plain AdamW) for a model and its TrainSettings.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.adamw import adamw

from phase2_architecture.src.training_utils import weight_decay_groups
from phase3_components.src.hardware import choose_newton_schulz_dtype
from phase3_components.src.muon import newton_schulz
from sparse_moe_transformer.src.train_settings import TrainSettings


class MuonAdamW(torch.optim.Optimizer):
    """Param groups with use_muon=True get Muon (their lr x lr_ratio), the others torch's AdamW kernel.

    ns_dtype: the dtype Newton-Schulz iterates in; None = the machine's choice (Phase 3's hardware.py:
    bf16 where native and measured faster, else fp32).
    """

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
        ns_dtype: torch.dtype | None = None,
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
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["use_muon"]:
                for p in params:
                    self._muon(p, group)
            else:
                self._adamw(params, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        g, state = p.grad, self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        m, beta = state["momentum_buffer"], group["momentum"]
        m.lerp_(g, 1 - beta)  # m = beta m + (1 - beta) g
        update = g.lerp(m, beta) if group["nesterov"] else m
        update = newton_schulz(update, dtype=self.ns_dtype)  # [..., A, B], each slice orthogonalised
        lr = group["lr"] * group["lr_ratio"]
        A, B = p.shape[-2:]
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-lr * math.sqrt(max(1, A / B)))

    def _adamw(self, params: list[torch.Tensor], group: dict) -> None:
        """One AdamW step for the whole group with torch's own kernel (fused on GPUs, foreach on CPUs):
        m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p = p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)."""
        fused = params[0].device.type == "cuda"
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                state["step"] = 0
            if not torch.is_tensor(state["step"]):  # a new state, or a checkpoint that stored an int
                where = p.device if fused else "cpu"
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device=where)
        beta1, beta2 = group["betas"]
        adamw(
            params, [p.grad for p in params], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
            foreach=not fused, fused=fused, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )  # fmt: skip


def make_optimizer(model: nn.Module, s: TrainSettings, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay by the course's one rule (Phase 2's weight_decay_groups: the matmul weights,
    not biases, norms or embeddings); or (optimizer "muon") MuonAdamW: Muon for the model's
    hidden_matrices() and that AdamW for the others."""
    muon = model.hidden_matrices() if s.optimizer == "muon" else []
    groups = weight_decay_groups(model, s.weight_decay, exclude=muon)
    if s.optimizer == "muon":
        return MuonAdamW(
            model.hidden_matrices(), groups, lr=s.max_lr, lr_ratio=s.muon_lr / s.max_lr,
            momentum=s.muon_momentum, muon_weight_decay=s.muon_weight_decay, betas=(s.beta1, s.beta2),
            ns_dtype=choose_newton_schulz_dtype(s.ns_dtype, device).dtype,
        )  # fmt: skip
    fused = device.type == "cuda"  # one kernel for all parameters on GPUs; foreach on the CPU
    return torch.optim.AdamW(groups, lr=s.max_lr, betas=(s.beta1, s.beta2), fused=fused, foreach=not fused)
