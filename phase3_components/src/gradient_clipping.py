"""Gradient clipping by global norm, equal to torch.nn.utils.clip_grad_norm_.

All gradients are treated as one long vector g = concat(p.grad for every parameter):

    total_norm = ||g||_p = (sum_i ||grad_i||_p^p)^(1/p)        (max_i ||grad_i||_inf for p = inf)
    coef       = max_norm / (total_norm + 1e-6)
    every grad <- grad * min(coef, 1)

So gradients are rescaled (their direction kept) only when their global norm exceeds max_norm;
one bad batch then cannot throw the weights far away. The returned value is the norm *before*
clipping, which is worth logging: spikes in it announce loss spikes.

Non-finite norms: a NaN/inf gradient cannot be clipped into something meaningful (coef becomes 0
or NaN and the NaN spreads into every gradient). By default we raise a RuntimeError naming the
problem — torch's `error_if_nonfinite=True` behaviour, with the same exception type — instead of
torch's default of silently producing NaN gradients. `error_if_nonfinite=False` reproduces torch's
default exactly.
"""

from __future__ import annotations

from typing import Iterable

import torch

from phase1_foundation.src.validation import check_number


def global_grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients concatenated into one vector (parameters without grad are skipped)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    if norm_type == float("inf"):
        per_tensor = torch.stack([g.detach().abs().max() for g in grads])  # [n_tensors]
        return per_tensor.max()
    # ||g||_p of the concatenation = || (||g_1||_p, ..., ||g_n||_p) ||_p
    per_tensor = torch.stack([torch.linalg.vector_norm(g.detach(), norm_type) for g in grads])  # [n_tensors]
    return torch.linalg.vector_norm(per_tensor, norm_type)


def clip_grad_norm(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = True,
) -> torch.Tensor:
    """Scale all gradients in place so their global norm is at most max_norm; return the norm before.

    parameters: tensors (e.g. model.parameters()); max_norm > 0; norm_type 2.0 (default), 1.0, inf, ...
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    check_number("max_norm", max_norm, above=0)
    if not norm_type > 0:
        raise ValueError(f"norm_type must be > 0 (e.g. 2.0 or float('inf')), got {norm_type}")
    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = global_grad_norm(parameters, norm_type)
    if not grads:
        return total_norm
    if error_if_nonfinite and not torch.isfinite(total_norm):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is {total_norm.item()}: a NaN or inf "
            "gradient (check the loss and the learning rate), or pass error_if_nonfinite=False"
        )
    clip_coef = max_norm / (total_norm + 1e-6)  # the 1e-6 keeps a zero norm from dividing by zero
    clip_coef = torch.clamp(clip_coef, max=1.0)  # never scale gradients *up*
    with torch.no_grad():
        for g in grads:
            g.mul_(clip_coef.to(g.dtype))
    return total_norm
