"""The language-model head and its cross-entropy in one pass over row chunks, never holding the logits.

    linear_cross_entropy(h, weight, targets, softcap) == F.cross_entropy(softcap(h @ weight.T), targets)

The plain way materialises the logits z = h W^T, [N, V] with N = B x T tokens and V = vocabulary, and
the cross-entropy keeps its log-softmax, also [N, V], for the backward pass; the backward then builds
two more [N, V] tensors: at the `t1000`'s V = 50,257 and batch 4 x 256 they are about 0.7 GiB of a 4 GB
card. (On the CPU the chunked loss is about as fast as the plain one: BENCHMARKS.md.) Here, for one
chunk of rows at a time, the forward pass computes the loss AND the gradients
(z -> loss is a few lines of calculus), so nothing [N, V] outlives its chunk:

    z      = h_c W^T                                  [n, V]   (cap * tanh(z / cap) with a soft-cap)
    lse    = m + log sum_j exp(z_j - m),  m = max_j z_j        [n]
    loss  += sum over rows of  lse - z[target]                 (the mean is taken at the end)
    G      = softmax(z) - onehot(target)                       [n, V]   (x (1 - tanh^2) under the cap)
    dL/dh_c = G W / count                                      [n, C]
    dL/dW  += G^T h_c / count                                  [V, C]

count = the number of targets that are not ignore_index (-100), as F.cross_entropy's mean. The backward
pass only scales the saved dL/dh [N, C] and dL/dW [V, C] by the incoming gradient (a scalar).
This is the "fused linear cross-entropy" of Liger-Kernel and of several LLM trainers; it is exact (the
tests compare it with F.cross_entropy on the materialised logits, values and gradients).

Precision: the matmuls run in the autocast dtype when autocast is on (as nn.Linear would), the softmax and
its gradient in fp32 always. G enters the half-precision matmuls unscaled, in [-1, 1]; 1/count and the
incoming gradient (which carries the fp16 GradScaler's scale) are applied afterwards, in fp32. Applied
before the cast, 1/count would push most of G below fp16's smallest subnormal (6e-8) at a GPT-2
vocabulary. dL/dh and dL/dW are kept in fp32.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**21  # logits per chunk (8 MiB in fp32): 512 rows at V = 4,096, 41 at V = 50,257


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk: CHUNK_ELEMENTS logits, at least one row."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


def _matmul_dtype(device: torch.device) -> torch.dtype:
    """The dtype nn.Linear would compute in here: the autocast dtype inside autocast, else fp32."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32


def _chunk_logits(h_c: torch.Tensor, w: torch.Tensor, softcap: float | None):
    """-> (z [n, V] fp32 after the cap, tanh(z_raw / cap) or None)."""
    z = (h_c.to(w.dtype) @ w.t()).float()  # [n, V]
    if softcap is None:
        return z, None
    t = z.div_(softcap).tanh_()  # in place: z is not needed raw again
    return t * softcap, t


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, softcap):
        N, V = h.shape[0], weight.shape[0]
        mm_dtype = _matmul_dtype(h.device)
        with torch.autocast(h.device.type, enabled=False):  # the casts below are explicit
            w = weight.to(mm_dtype)  # [V, C]
            count = (targets != IGNORE_INDEX).sum()
            scale = 1.0 / count.clamp(min=1).float()  # the mean over counted targets (0: the loss is 0/0)
            grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)  # [N, C]
            grad_w = torch.zeros_like(weight, dtype=torch.float32)  # [V, C]
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            rows = chunk_rows(V)
            for s in range(0, N, rows):
                h_c, y = h[s : s + rows], targets[s : s + rows]  # [n, C], [n]
                z, t = _chunk_logits(h_c, w, softcap)  # [n, V]
                keep = y != IGNORE_INDEX  # [n]
                y_safe = torch.where(keep, y, 0)  # any valid index; these rows are zeroed below
                target_z = z.gather(1, y_safe[:, None]).squeeze(1)  # [n]
                m = z.amax(dim=1, keepdim=True)  # [n, 1]
                e = z.sub_(m).exp_()  # [n, V] exp(z - m), in place of z
                sum_e = e.sum(dim=1)  # [n]
                lse = m.squeeze(1) + sum_e.log()  # [n]
                total += torch.where(keep, lse - target_z, 0.0).sum()
                g = e.div_(sum_e[:, None])  # softmax(z), in place of e
                g[torch.arange(len(y), device=h.device), y_safe] -= 1.0  # - onehot(target)
                g.mul_(keep[:, None])  # ignored rows -> 0
                if t is not None:
                    g.mul_(1.0 - t * t)  # d(cap tanh(z/cap))/dz = 1 - tanh^2
                # g stays in [-1, 1] through the half-precision matmuls: scaled by 1/count first, its
                # entries (~1e-8 at V = 50,257 and 1,024 tokens) would flush to 0 in fp16
                g_mm = g.to(mm_dtype)
                grad_h[s : s + rows] = g_mm @ w  # [n, C]
                grad_w += (g_mm.t() @ h_c.to(mm_dtype)).float()  # [V, C]
            grad_h.mul_(scale), grad_w.mul_(scale)  # the mean over counted targets, in fp32
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = h.dtype, weight.dtype
        return total / count.float()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors  # fp32; grad_loss carries a GradScaler's scale, if any
        h_dtype, weight_dtype = ctx.dtypes
        return (grad_h * grad_loss).to(h_dtype), (grad_w * grad_loss).to(weight_dtype), None, None


@torch.no_grad()
def _loss_only(h, weight, targets, softcap):
    """The same loss without gradients (evaluation): one chunk of logits at a time."""
    w = weight.to(_matmul_dtype(h.device))
    total, rows = torch.zeros((), dtype=torch.float32, device=h.device), chunk_rows(weight.shape[0])
    with torch.autocast(h.device.type, enabled=False):
        for s in range(0, h.shape[0], rows):
            y = targets[s : s + rows]
            keep = y != IGNORE_INDEX
            z, _ = _chunk_logits(h[s : s + rows], w, softcap)  # [n, V]
            target_z = z.gather(1, torch.where(keep, y, 0)[:, None]).squeeze(1)
            total += torch.where(keep, torch.logsumexp(z, dim=1) - target_z, 0.0).sum()
    return total / (targets != IGNORE_INDEX).sum().float()


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None = None
) -> torch.Tensor:
    """h [N, C] (the head's input), weight [V, C] (the head), targets [N] (-100 = ignore) -> the mean
    cross-entropy of the logits h W^T (soft-capped to cap * tanh(z / cap) if softcap is given), a
    scalar; its gradients reach h and weight. Equal to F.cross_entropy on the materialised logits."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"need h [N, C] and weight [V, C], got {tuple(h.shape)} and {tuple(weight.shape)}")
    if targets.shape != h.shape[:1]:
        raise ValueError(f"targets must have shape [{h.shape[0]}], got {tuple(targets.shape)}")
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= weight.shape[0]))
    if bad.any():
        raise ValueError(
            f"targets must be token ids in [0, {weight.shape[0]}) or {IGNORE_INDEX} (ignored), got "
            f"{targets[bad][0].item()}; check that the tokenizer matches the model's vocab_size"
        )
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, softcap)
    return _loss_only(h, weight, targets, softcap)
