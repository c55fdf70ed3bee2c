"""Muon: momentum, orthogonalised by Newton–Schulz iterations, for the hidden weight matrices.

Muon (Keller Jordan et al. 2024; used for the NanoGPT speedrun records, Kimi K2's Moonlight) treats a
weight matrix as a matrix, not as a bag of numbers. SGD-momentum's update M [out, in] is usually
dominated by a few directions (its singular values span orders of magnitude); Muon replaces it by
the nearest semi-orthogonal matrix, U Vᵀ from M's SVD U S Vᵀ: every direction gets the same step size,
so the rare directions learn as fast as the common ones.

Computing an SVD every step is slow; an odd polynomial iteration gets close in 5 matrix products:

    X_0 = M / ||M||_F                       (singular values in (0, 1])
    X_{k+1} = a X_k + (b A + c A²) X_k,     A = X_k X_kᵀ            (a, b, c) = (3.4445, -4.7750, 2.0315)

Each step applies p(s) = a s + b s³ + c s⁵ to every singular value s (U and V are untouched, since
X Xᵀ X = U S³ Vᵀ). Newton–Schulz's classic cubic (1.5, -0.5, 0) converges to 1 slowly from small s;
these coefficients make p steep at 0, so 5 steps map every s into roughly [0.7, 1.2]: not exactly
U Vᵀ, which turns out not to matter, and also why low precision is good enough: torch and the original
iterate in bfloat16. Here the dtype is the machine's (hardware.py): bf16 where it is native and measured
faster than fp32, fp32 elsewhere (a CPU without AVX512-BF16 or AMX emulates bf16 ~50x slower than fp32).
Wide matrices are processed as they are, tall ones transposed (X Xᵀ is then the small Gram matrix).

One Muon step, per matrix p with gradient g (torch.optim.Muon's conventions):

    B <- mu * B + (1 - mu) * g                 momentum as a running average (B starts at 0)
    U  = (1 - mu) * g + mu * B                 Nesterov look-ahead (U = B without Nesterov)
    O  = NewtonSchulz5(U)
    p <- p * (1 - lr * wd)                     decoupled weight decay, as AdamW
    p <- p - lr * sqrt(max(1, out / in)) * O   the scale keeps the update's RMS similar across shapes

Muon is for 2-D hidden matrices only. Embeddings, the output head, norms and biases are trained with
AdamW: an embedding row is updated only for the tokens present, so its "matrix" update is not
meaningful as a whole, and vectors have no singular values (`muon_and_adamw_groups` splits a GPT).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from phase1_foundation.src.validation import check_int, check_number
from phase3_components.src.hardware import choose_newton_schulz_dtype
from phase3_components.src.optimizers import Optimizer

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Approximately orthogonalise G [..., m, n], each [m, n] matrix on its own: U S Vᵀ -> U S' Vᵀ, S' ~ 1.

    Returned in `dtype`, the dtype the iteration runs in; None = the one this machine runs fastest
    (hardware.choose_newton_schulz_dtype: bf16 where it is native and measured faster, else fp32).
    The scaling to norm 1 happens in fp32 (or float64) BEFORE the cast: a gradient of size 1e-6 is
    below fp16's normal range, and cast first it would lose most of its bits.
    """
    if G.dim() < 2:
        raise ValueError(f"Newton–Schulz orthogonalises a matrix (or a stack), got shape {tuple(G.shape)}.")
    if dtype is None:
        dtype = choose_newton_schulz_dtype(device=G.device).dtype
    a, b, c = coefficients
    X = G.to(torch.promote_types(dtype, torch.float32)).reshape(-1, *G.shape[-2:])  # [S, m, n]
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        X = X.mT  # work with the wide orientation: X Xᵀ is the smaller Gram matrix
    # Frobenius norm >= spectral norm: every singular value <= 1
    X = (X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)).to(dtype)
    for _ in range(steps):
        A = X @ X.mT  # [S, m, m]  = U S² Uᵀ
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A²  (one fused op, as torch does it)
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X   = U (a S + b S³ + c S⁵) Vᵀ
    return (X.mT if tall else X).reshape(G.shape)


class Muon(Optimizer):
    """Muon for 2-D parameters; torch.optim.Muon's update (its default "original" learning-rate scale), with
    Newton–Schulz in `ns_dtype` (None: the machine's choice; torch.optim.Muon always uses bf16)."""

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | None = None,
    ):
        super().__init__(params, lr)
        for p in self.params:
            if p.dim() != 2:
                raise ValueError(
                    f"Muon updates 2-D weight matrices only, got a parameter of shape {tuple(p.shape)}; "
                    "give embeddings, norms, biases and the output head to AdamW (muon_and_adamw_groups)."
                )
        check_number("momentum", momentum, low=0, below=1)
        check_number("weight_decay", weight_decay, low=0)
        check_int("ns_steps", ns_steps, minimum=1)
        self.momentum, self.nesterov = momentum, nesterov
        self.weight_decay, self.ns_steps = weight_decay, ns_steps
        # None: the machine's fastest accurate dtype, decided once (hardware.choose_newton_schulz_dtype)
        if ns_dtype is None:
            ns_dtype = choose_newton_schulz_dtype(device=self.params[0].device).dtype
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self) -> None:
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            g = p.grad
            if "momentum" not in state:
                state["momentum"] = torch.zeros_like(p)
            B = state["momentum"]
            B.mul_(self.momentum).add_(g, alpha=1 - self.momentum)  # running average of gradients
            update = (1 - self.momentum) * g + self.momentum * B if self.nesterov else B
            O = newton_schulz(update, self.ns_steps, dtype=self.ns_dtype)  # [out, in] singular values ~ 1
            out_features, in_features = p.shape
            scale = math.sqrt(max(1.0, out_features / in_features))
            p.mul_(1 - self.lr * self.weight_decay)
            p.add_(O.to(p.dtype), alpha=-self.lr * scale)


def muon_and_adamw_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices for Muon, everything else for AdamW) of a Phase 2 GPT.

    Hidden matrices: the 2-D weights inside the transformer blocks (attention and FFN projections).
    AdamW: token and position embeddings, lm_head, norm gains and every bias.
    """
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (muon if p.dim() == 2 and name.startswith("blocks.") else adamw).append(p)
    if not muon:
        raise ValueError("found no 2-D parameters under `blocks.`: is this a Phase 2 GPT?")
    return muon, adamw
