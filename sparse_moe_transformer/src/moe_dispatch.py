"""Fast sparse expert dispatch for the MoE FFN: route, sort once, run experts on slices, scatter once.

Every token picks `top_k` experts, so a batch of N tokens makes M = N * top_k (token, slot) pairs.

    route_tokens(gate_logits, top_k, capacity)   -> Routing
        top-k of the gate logits, softmax over the selected logits (the routing weights), then ONE
        stable argsort of the pairs by expert. Pairs are enumerated slot-major (all first choices,
        then all second choices, ...), so inside an expert's slice first choices come before
        second choices and earlier tokens before later ones. With a capacity C per expert, the
        pairs beyond position C of each slice are dropped: the lowest-priority pairs are the
        later choices (slot 2 before slot 1), then the later tokens in the flattened batch.
        Note: capacity is shared by the whole batch, so a later token can take the place of an
        earlier token's second choice; with a capacity factor the model is therefore not strictly
        causal. Dropless routing (the default) is.

    expert_ffn(x, w1, b1, w2, b2, routing, activation="gelu")   -> out [N, C]
        a custom torch.autograd.Function. Forward: gather the sorted token rows once, and for
        every expert e with a non-empty slice s:t run  y[s:t] = act(x_s @ w1[e] + b1[e]) @ w2[e] + b2[e]
        (act = GELU, or ReLU^2 = relu(h)^2 as in the modded-nanogpt speedrun; or SwiGLU: w1 [E, C, 2F]
        holds the gate and up projections side by side, h = [gate | up] and act(h) = SiLU(gate) * up,
        so each projection stays one matmul per expert and w2 is [E, F, C])
        as two addmm calls that write into preallocated [M, F] / [M, C] buffers, scale by the
        routing weight and add the rows back to their tokens once (see _combine). Backward does
        the same in reverse by hand (dX, dW1, db1, dW2, db2 and d(routing weight)) on the same slices.

    dense_ffn(x, w1, b1, w2, b2, activation="gelu")   -> out [N, C]
        the shared experts every token passes through: one FFN of hidden size S * F for S shared
        experts (the sum of S experts' outputs is one FFN over their concatenated hidden units).

Why by hand: left to autograd, slicing a stacked weight per expert and concatenating results
creates dozens of small graph nodes, copies and zero-filled gradient buffers per layer (the
seed-style loop with a boolean mask per expert is worse still: it touches all N tokens E times).
Here the only data movement besides the matmuls is one gather and one un-sort gather each way.
`torch._grouped_mm` exists in torch 2.13, but on the CPU its forward was slower than this loop
and its backward failed on CPU tensors when we tried it, so it is not used (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from phase2_architecture.src.mixture_of_experts import route_with_bias

ACTIVATIONS = ("gelu", "relu2", "swiglu")
COMBINE_ROWS = 256  # CPU: rows per block of the per-pair row work, so a [256, C] block stays in the cache


SMALL_COMBINE = 16  # tokens up to which _combine gathers every slot at once (a KV-cached decode step)


def _block_rows(t: torch.Tensor, n: int) -> int:
    """Rows per block: COMBINE_ROWS on the CPU; one block elsewhere (a GPU pays a launch per kernel)."""
    return COMBINE_ROWS if t.device.type == "cpu" else max(n, 1)


@dataclass
class Routing:
    """The routing decision for N tokens (M kept (token, slot) pairs, sorted by expert).

    token_index    [M] long   token (row of x) of each kept pair, grouped by expert
    unsort_index   [k*N] long for pair (slot j, token n) at j*N + n: its row among the M sorted
                              kept pairs, or M when the pair was dropped
    weight         [M] float  routing weight of each kept pair (differentiable w.r.t. the gate)
    expert_index   [M] long   expert of each kept pair (non-decreasing)
    counts         list[int]  kept pairs per expert (length E), sums to M
    routed_counts  [E] long   pairs the router sent to each expert before any capacity drop
    topk_index     [N, k]     experts chosen per token; topk_weight [N, k] their routing weights
    dropped        int        pairs dropped by the capacity limit (0 when dropless)
    """

    token_index: torch.Tensor
    unsort_index: torch.Tensor
    weight: torch.Tensor
    expert_index: torch.Tensor
    counts: list[int]
    routed_counts: torch.Tensor
    topk_index: torch.Tensor
    topk_weight: torch.Tensor
    dropped: int


def route_tokens(
    gate_logits: torch.Tensor,
    top_k: int,
    capacity: int | None = None,
    capacity_offset: torch.Tensor | None = None,
    choice_bias: torch.Tensor | None = None,
) -> Routing:
    """gate_logits [N, E] -> Routing (top-k, softmax over the selected logits, one sort by expert).

    choice_bias [E] (Config.balance="bias"): the experts are the top-k of gate_logits + choice_bias, their
    weights the softmax of their unbiased logits (Phase 2's route_with_bias).

    capacity_offset [k, E] (expert parallelism): how many pairs of other ranks come before this rank's
    slot-j pairs of expert e in the priority order of one process holding every rank's tokens; a pair
    is kept when its position in that order is below `capacity` (expert_parallel.py).
    """
    N, E = gate_logits.shape
    if choice_bias is None:
        topk_logits, topk_index = torch.topk(gate_logits, top_k, dim=-1)  # [N, k], [N, k]
        topk_weight = torch.softmax(topk_logits, dim=-1)  # [N, k], positive, rows sum to 1
    else:
        topk_weight, topk_index = route_with_bias(gate_logits, choice_bias, top_k)  # [N, k], [N, k]

    # Slot-major enumeration of the pairs: pair p = slot * N + token.
    flat_expert = topk_index.t().reshape(-1)  # [k*N]
    order = torch.argsort(flat_expert, stable=True)  # [k*N] pairs grouped by expert
    expert_sorted = flat_expert[order]  # [k*N] non-decreasing
    token_sorted = order % N  # [k*N] token of each sorted pair
    weight_sorted = topk_weight.t().reshape(-1)[order]  # [k*N] (autograd: a gather)
    routed_counts = torch.bincount(flat_expert, minlength=E)  # [E]

    dropped = 0
    kept_counts = routed_counts
    if capacity is not None:
        # position of each sorted pair inside its expert's slice: p - start(expert)
        starts = torch.cumsum(routed_counts, 0) - routed_counts  # [E]
        rank = torch.arange(order.numel(), device=order.device) - starts[expert_sorted]  # [k*N]
        if capacity_offset is not None:  # + the other ranks' pairs ahead of each one (slot = order // N)
            rank = rank + capacity_offset[order // N, expert_sorted]
        keep = rank < capacity  # [k*N]
        if capacity_offset is None:
            kept_counts = routed_counts.clamp(max=capacity)
        else:  # still a prefix of each slice, of a length that depends on the other ranks
            kept_counts = torch.bincount(expert_sorted[keep], minlength=E)
        dropped = int(order.numel() - int(kept_counts.sum()))
        if dropped:
            token_sorted, weight_sorted, expert_sorted = (
                token_sorted[keep],
                weight_sorted[keep],
                expert_sorted[keep],
            )
            order = order[keep]
    # Inverse permutation: sorted row of every pair; dropped pairs point at row M (a zero row).
    unsort_index = torch.full_like(flat_expert, order.numel())  # [k*N]
    unsort_index[order] = torch.arange(order.numel(), device=order.device)
    return Routing(
        token_index=token_sorted,
        unsort_index=unsort_index,
        weight=weight_sorted,
        expert_index=expert_sorted,
        counts=kept_counts.tolist(),  # the one host sync of the dispatch
        routed_counts=routed_counts,
        topk_index=topk_index,
        topk_weight=topk_weight,
        dropped=dropped,
    )


def _slices(counts: list[int]):
    """Yield (expert, start, end) for every expert with a non-empty contiguous slice."""
    start = 0
    for e, c in enumerate(counts):
        if c:
            yield e, start, start + c
        start += c


class _SortedExpertFFN(torch.autograd.Function):
    """out = sum over kept pairs p of weight[p] * FFN_{expert[p]}(x[token[p]]); backward by hand."""

    @staticmethod
    def forward(
        ctx, x, w1, b1, w2, b2, weight, token_index, expert_index, unsort_index, counts, top_k, activation
    ):
        M, (N, C), Fh = token_index.numel(), x.shape, w1.shape[2]
        xs = x.index_select(0, token_index)  # [M, C] sorted token rows, gathered once
        h = x.new_empty(M, Fh)  # [M, F] pre-activation (swiglu: [M, 2F], gate | up)
        for e, s, t in _slices(counts):
            torch.addmm(b1[e], xs[s:t], w1[e], out=h[s:t])  # [m, C] @ [C, F] + [F]
        if activation == "gelu":
            a = F.gelu(h)  # [M, F]
        elif activation == "swiglu":
            a = swiglu(h)  # [M, F] from h = [gate | up] [M, 2F]
        else:  # relu2: a = relu(h)^2; h's buffer keeps relu(h), all the backward needs (d a/d h = 2 relu(h))
            h = h.clamp_(min=0)
            a = h.square()  # [M, F]
        y = x.new_empty(M, C)  # [M, C] expert outputs
        for e, s, t in _slices(counts):
            torch.addmm(b2[e], a[s:t], w2[e], out=y[s:t])  # [m, F] @ [F, C] + [C]
        out = _combine(y, unsort_index, top_k, N, weight)  # [N, C] weighted, scattered back once
        ctx.save_for_backward(xs, h, a, y, w1, w2, weight, token_index, expert_index, unsort_index)
        ctx.counts, ctx.top_k, ctx.n_tokens, ctx.activation = counts, top_k, N, activation
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xs, h, a, y, w1, w2, weight, token_index, expert_index, unsort_index = ctx.saved_tensors
        counts = ctx.counts
        dy, grad_weight = _pair_output_grads(grad_out.contiguous(), y, weight, token_index)  # [M, C], [M]
        # Gradients of experts that received no pair are exactly 0: fill only those.
        dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
        for e, c in enumerate(counts):
            if c == 0:
                dw1[e].zero_(), dw2[e].zero_()
        db2 = per_expert_sum(dy, expert_index, len(counts))  # [E, C]
        da = torch.empty_like(a)  # [M, F]
        for e, s, t in _slices(counts):
            torch.mm(a[s:t].t(), dy[s:t], out=dw2[e])  # [F, m] @ [m, C]
            torch.mm(dy[s:t], w2[e].t(), out=da[s:t])  # [m, C] @ [C, F]
        if ctx.activation == "gelu":
            dh = torch.ops.aten.gelu_backward.grad_input(da, h, grad_input=da)  # [M, F] da * GELU'(h), in da
        elif ctx.activation == "swiglu":
            dh = swiglu_backward(da, h)  # [M, 2F]
        else:
            dh = da.mul_(h).mul_(2.0)  # [M, F] da * 2 relu(h), in da (h holds relu(h))
        db1 = per_expert_sum(dh, expert_index, len(counts))  # [E, F] (swiglu: [E, 2F])
        need_dx = ctx.needs_input_grad[0]
        dxs = dy if need_dx else None  # [M, C] dy is no longer needed: its buffer takes dx per pair
        for e, s, t in _slices(counts):
            torch.mm(xs[s:t].t(), dh[s:t], out=dw1[e])  # [C, m] @ [m, F] (swiglu: 2F)
            if need_dx:
                torch.mm(dh[s:t], w1[e].t(), out=dxs[s:t])  # [m, F] @ [F, C] (swiglu: 2F)
        dx = _combine(dxs, unsort_index, ctx.top_k, ctx.n_tokens) if need_dx else None  # [N, C]
        return dx, dw1, db1, dw2, db2, grad_weight, None, None, None, None, None, None


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h = [gate | up] [..., 2F] -> SiLU(gate) * up [..., F] (Shazeer 2020, "GLU Variants")."""
    gate, up = h.chunk(2, dim=-1)  # 2 x [..., F] views
    return F.silu(gate) * up


def swiglu_backward(da: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """dL/dh [..., 2F] from dL/da [..., F] for a = SiLU(gate) * up, h = [gate | up].

    d a / d up = SiLU(gate); d a / d gate = up * SiLU'(gate), SiLU'(g) = s (1 + g (1 - s)), s = sigmoid(g).
    """
    gate, up = h.chunk(2, dim=-1)  # 2 x [..., F]
    s = torch.sigmoid(gate)
    d_up = da * gate * s  # da * SiLU(gate)
    d_gate = da * up * s * (1 + gate * (1 - s))
    return torch.cat([d_gate, d_up], dim=-1)  # [..., 2F]


class _SwiGLU(torch.autograd.Function):
    """SiLU(gate) * up that saves only h (its backward recomputes the sigmoid): autograd's own ops
    would also keep SiLU(gate), F more values per row."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return swiglu(h)

    @staticmethod
    def backward(ctx, da):
        (h,) = ctx.saved_tensors
        return swiglu_backward(da, h)


def _pair_output_grads(
    grad_out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, token_index: torch.Tensor
):
    """grad_out [N, C], expert outputs y [M, C], routing weights [M] -> (dL/dy [M, C], dL/dweight [M]).

    For pair p of token n: g_p = grad_out[n]; dL/dweight_p = <g_p, y_p> and dL/dy_p = weight_p g_p. Done
    in blocks of COMBINE_ROWS pairs (gather, dot, scale while the block is in the cache), so the [M, C]
    rows go through memory once instead of three times (most of the cost with many small experts).
    """
    M = token_index.numel()
    dy = grad_out.new_empty(M, grad_out.shape[1])  # [M, C]
    grad_weight = grad_out.new_empty(M)  # [M]
    R = _block_rows(grad_out, M)
    product = grad_out.new_empty(min(R, M), grad_out.shape[1])  # [R, C] in-cache scratch
    for start in range(0, M, R):
        end = min(start + R, M)
        g = dy[start:end]  # [R, C]
        torch.index_select(grad_out, 0, token_index[start:end], out=g)
        torch.sum(torch.mul(g, y[start:end], out=product[: end - start]), -1, out=grad_weight[start:end])
        g.mul_(weight[start:end, None])
    return dy, grad_weight


def per_expert_sum(
    rows: torch.Tensor, expert_index: torch.Tensor, n_expert: int, one_hot_matmul: bool | None = None
) -> torch.Tensor:
    """Column sums of each expert's rows: rows [M, D], expert_index [M] -> [E, D] (bias gradients).

    CPU: one index_add_ streams every row into its expert's accumulator; it reads the rows once
    and is 6-8x faster than the one-hot matmul (BENCHMARKS.md). GPU (one_hot_matmul, the default
    off the CPU): index_add_ would use atomic adds, whose float sums depend on the order, so there
    the sum is the one-hot matmul S^T @ rows with S [M, E].
    """
    if one_hot_matmul is None:
        one_hot_matmul = rows.device.type != "cpu"
    if one_hot_matmul:
        return F.one_hot(expert_index, n_expert).to(rows.dtype).t() @ rows  # [E, M] @ [M, D]
    return rows.new_zeros(n_expert, rows.shape[1]).index_add_(0, expert_index, rows)


def _combine(
    rows: torch.Tensor,
    unsort_index: torch.Tensor,
    top_k: int,
    n_tokens: int,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum the sorted pair rows [M, C] back per token -> [N, C], each scaled by weight [M] if given.

    unsort_index [k*N] gives, for pair (slot j, token n) at j*N + n, its row in the sorted order,
    or M (a zero row) when the pair was dropped. Gathering each slot's rows in token order and adding
    them gives the same result as index_add_ over token_index, deterministic, and several times faster
    on the CPU. The routing weights are applied after the gather (out = sum_j w_j * row_j), which saves
    a scaled [M, C] copy. The gather runs one block of COMBINE_ROWS tokens and one slot at a time into
    a small buffer that stays in cache: a whole [k, N, C] gather would write and read back k times the
    output through memory, which costs the most with many small experts (large k).
    """
    if rows.shape[0] < unsort_index.numel():  # some pairs dropped: append the zero row
        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
        if weight is not None:
            weight = torch.cat([weight, weight.new_zeros(1)])
    index = unsort_index.view(top_k, n_tokens)  # [k, N] sorted row of each (slot, token)
    w = None if weight is None else weight.index_select(0, unsort_index).view(top_k, n_tokens, 1)  # [k, N, 1]
    if n_tokens <= SMALL_COMBINE:  # decoding: a few rows, where each Python-level op is the cost
        gathered = rows.index_select(0, unsort_index).view(top_k, n_tokens, -1)  # [k, N, C]
        return (gathered if w is None else gathered * w).sum(0)  # [N, C]
    out = rows.new_empty(n_tokens, rows.shape[1])  # [N, C]
    R = _block_rows(rows, n_tokens)
    buffer = rows.new_empty(min(R, n_tokens), rows.shape[1])  # [R, C]
    for start in range(0, n_tokens, R):
        end = min(start + R, n_tokens)
        block, row = out[start:end], buffer[: end - start]  # [R, C] each
        torch.index_select(rows, 0, index[0, start:end], out=block)
        if w is not None:
            block.mul_(w[0, start:end])
        for j in range(1, top_k):
            torch.index_select(rows, 0, index[j, start:end], out=row)
            if w is None:
                block.add_(row)
            else:
                block.addcmul_(row, w[j, start:end])  # block += row_j * w_j
    return out


def check_ffn_shapes(w1_out: int, w2_in: int, activation: str) -> None:
    """w1's output width must be w2's input width (2x for swiglu: gate and up side by side)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown expert activation {activation!r}: choose gelu, relu2 or swiglu")
    want = 2 * w2_in if activation == "swiglu" else w2_in
    if w1_out != want:
        raise ValueError(
            f"{activation} experts need w1 with {want} output columns for w2's {w2_in} input rows, got "
            f"{w1_out}"
            + (" (swiglu: gate and up projections side by side, 2F)" if activation == "swiglu" else "")
        )


def expert_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    routing: Routing,
    activation: str = "gelu",
) -> torch.Tensor:
    """x [N, C], stacked experts w1 [E, C, F], b1 [E, F], w2 [E, F, C], b2 [E, C] -> out [N, C].

    Each token's output is sum_j weight_j * (act(x @ w1[e_j] + b1[e_j]) @ w2[e_j] + b2[e_j])
    over its kept choices j (act: "gelu", "relu2" = relu(h)^2, or "swiglu", where w1 is [E, C, 2F] and
    b1 [E, 2F]: the gate projection in the first F columns, the up projection in the last F, and
    act(h) = SiLU(gate) * up); a token whose pairs were all dropped gets 0.
    """
    check_ffn_shapes(w1.shape[-1], w2.shape[-2], activation)
    top_k = routing.topk_index.shape[1]
    # Under autocast the experts compute in its dtype, as nn.Linear would (their input, a LayerNorm's
    # output, is fp32 even under autocast); the casts are differentiable, so the gradients of the fp32
    # weights come back in fp32.
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    x, w1, b1, w2, b2, weight = (t.to(dtype) for t in (x, w1, b1, w2, b2, routing.weight))
    with torch.autocast(device_type=device, enabled=False):  # out= matmuls: dtypes fixed above
        return _SortedExpertFFN.apply(
            x,
            w1,
            b1,
            w2,
            b2,
            weight,
            routing.token_index,
            routing.expert_index,
            routing.unsort_index,
            routing.counts,
            top_k,
            activation,
        )


def dense_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    activation: str = "gelu",
) -> torch.Tensor:
    """x [N, C], w1 [C, F], b1 [F], w2 [F, C], b2 [C] -> act(x @ w1 + b1) @ w2 + b2 [N, C] (swiglu: w1
    [C, 2F], b1 [2F], the gate projection in the first F columns): the shared experts, which every token
    passes through with weight 1, so they need no routing and no gather. S shared experts of hidden size
    F are one such FFN of hidden size S * F (for swiglu the S gates first, then the S ups).

    Under autocast it computes in the autocast dtype, as expert_ffn does. Saved for the backward: x (the
    gate's own input in fp32; a cast copy under autocast), h and act(h) (memory_plan.py counts them).
    """
    check_ffn_shapes(w1.shape[-1], w2.shape[-2], activation)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    x, w1, b1, w2, b2 = (t.to(dtype) for t in (x, w1, b1, w2, b2))
    with torch.autocast(device_type=device, enabled=False):
        h = torch.addmm(b1, x, w1)  # [N, F] (swiglu: [N, 2F])
        if activation == "gelu":
            a = F.gelu(h)
        elif activation == "swiglu":
            a = _SwiGLU.apply(h)
        else:  # relu(h)^2: relu saves its output, which square reuses
            a = F.relu(h).square()
        return torch.addmm(b2, a, w2)  # [N, C]


class SharedExperts(nn.Module):
    """Dense experts that every token passes through (DeepSeekMoE's shared experts): S experts of hidden
    F as one FFN of hidden S F, computed by dense_ffn with the routed experts' formula. Its matrices are
    nn.Linear weights ([out, in], passed to dense_ffn transposed), like every other dense matmul."""

    def __init__(self, d_model: int, hidden: int, activation: str):
        super().__init__()
        up = 2 * hidden if activation == "swiglu" else hidden  # SwiGLU: the S gates, then the S ups
        self.w1 = nn.Linear(d_model, up)  # weight [S F', C]
        self.w2 = nn.Linear(hidden, d_model)  # weight [C, S F]
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C] -> [N, C]
        w1, w2 = self.w1, self.w2
        return dense_ffn(x, w1.weight.t(), w1.bias, w2.weight.t(), w2.bias, self.activation)
