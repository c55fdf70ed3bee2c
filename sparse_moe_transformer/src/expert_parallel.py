"""Expert parallelism: the experts of every MoE layer sharded over ranks, tokens moved to them by all-to-all.

Data parallelism (DDP) copies all n_expert experts onto every rank. Expert parallelism (GShard, Switch,
DeepSpeed-MoE, Megatron-Core, torchtitan) gives each rank a slice of them instead:

    layout      W ranks form W / E expert groups of E consecutive ranks; rank i of a group holds experts
                [i * n_expert / E, (i + 1) * n_expert / E) of every layer. Everything that is not an
                expert (embeddings, attention, norms, routers, head) is on every rank, as in DDP.
    one layer   on each rank, for its N tokens:
                  route      the router picks top_k experts per token; the (token, slot) pairs are sorted by
                             expert with moe_dispatch.route_tokens, which groups them by destination rank too
                  counts     all_to_all_single of the per-expert pair counts: each rank learns how many rows
                             every rank will send it, the split sizes of the next exchange
                  dispatch   all_to_all_single of the pair rows [M, C], uneven splits, in expert order
                  compute    the local experts on the received rows, with the sorted dispatch
                             (moe_dispatch.expert_ffn, one routing weight of 1 per row)
                  return     all_to_all_single of the expert outputs back to the ranks the rows came from
                  combine    out[n] = sum_j weight_j * row_j over the token's kept pairs
                Both exchanges are autograd Functions whose backward is the reverse exchange, so the
                gradients of the rows travel back the way the rows came.
    gradients   non-expert gradients: summed over all W ranks; expert gradients: summed over the W / E
                ranks that hold the same experts (their expert group already added every token of its
                E ranks); both divided by W, so each gradient equals one process's over the global batch.
    losses      the load-balancing loss needs the global expert counts: train_step all-reduces them
                (moe_losses' reduce_counts), exactly as under DDP. The z-loss is a mean over tokens.
    capacity    with a capacity factor, a group drops exactly the pairs one process would drop over the
                group's tokens (ranks in order): every rank all-gathers the group's per-(slot, expert)
                counts and keeps the pairs whose position in that one-process order is below capacity.
    checkpoint  saved in the layout of one process (experts gathered; optimizer state too), so a run
                resumes with any E, and `--mode generate` loads it in one process.

Bytes moved: with N tokens per rank and a balanced router, a rank sends N * top_k * (E - 1) / E rows of
d_model values to other ranks in the dispatch, and as many in the return exchange; the backward sends
the same again. `ExpertParallel.bytes_sent` counts what is actually sent (the rows for the rank itself
excluded), so the figure can be checked against the formula.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from phase2_architecture.src.mixture_of_experts import expert_capacity
from sparse_moe_transformer.src.moe_dispatch import Routing, expert_ffn, route_tokens

EXPERT_PARAMS = ("w1", "b1", "w2", "b2")  # the stacked expert tensors of a SparseMoEFFN, [n_expert, ...]


def check_layout(
    size: int, world_size: int, n_expert: int, precision: str = "fp32", compile: bool = False
) -> None:
    """A clear error unless E = size divides both the number of ranks and the number of experts, and the
    run uses what expert parallelism supports (no fp16 GradScaler, no torch.compile)."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"--expert-parallel must be a positive integer, got {size!r}")
    if world_size % size:
        raise ValueError(
            f"--expert-parallel {size} must divide the number of ranks ({world_size}): launch "
            f"torchrun --nproc_per_node with a multiple of {size}, or choose a divisor of {world_size}"
        )
    if n_expert % size:
        raise ValueError(
            f"--expert-parallel {size} must divide n_expert ({n_expert}): every rank holds n_expert / E "
            "experts; choose a divisor of n_expert"
        )
    if precision == "fp16":
        raise ValueError(
            "--expert-parallel does not support --precision fp16: the GradScaler would skip steps on some "
            "ranks only (each sees its own experts' overflows); use bf16 or fp32"
        )
    if compile:
        raise ValueError("--expert-parallel does not support --compile (the exchanges are not compiled)")


@dataclass
class ExpertParallel:
    """Where this rank stands: its expert group (exchanges tokens) and replica group (same experts)."""

    size: int  # E: ranks per expert group
    n_expert: int
    world_size: int
    group_rank: int  # this rank's index in its expert group = which slice of the experts it holds
    group: dist.ProcessGroup | None  # the E ranks that exchange tokens (None: the default group)
    replica_group: dist.ProcessGroup | None  # the W / E ranks holding the same experts (None if W == E)
    bytes_sent: int = 0  # token bytes sent to other ranks by the exchanges, forward and backward
    count_bytes_sent: int = 0  # bytes of the count exchanges

    @property
    def n_local(self) -> int:
        return self.n_expert // self.size

    @property
    def first_expert(self) -> int:
        return self.group_rank * self.n_local

    def reset_counters(self) -> None:
        self.bytes_sent, self.count_bytes_sent = 0, 0


def exchange_bytes_per_layer(tokens: int, d_model: int, top_k: int, size: int, bytes_per_value: int) -> float:
    """Bytes one rank sends to other ranks in one layer's forward with a balanced router: tokens x
    d_model x top_k x 2 exchanges (dispatch, return) x (E - 1) / E x bytes per value. The backward
    sends as many again (the reverse exchanges)."""
    return tokens * d_model * top_k * 2 * (size - 1) / size * bytes_per_value


def init_expert_parallel(size: int, n_expert: int) -> ExpertParallel:
    """Create the process groups (every rank must call this, in the same order) for E = size."""
    world_size, rank = dist.get_world_size(), dist.get_rank()
    check_layout(size, world_size, n_expert)
    group = replica_group = None
    # new_group is collective: every rank creates every group, and keeps the ones it belongs to
    for start in range(0, world_size, size):
        ranks = list(range(start, start + size))
        g = dist.new_group(ranks) if size < world_size else None
        if rank in ranks:
            group = g
    if size < world_size:
        for i in range(size):
            ranks = list(range(i, world_size, size))
            g = dist.new_group(ranks)
            if rank in ranks:
                replica_group = g
    return ExpertParallel(size, n_expert, world_size, rank % size, group, replica_group)


# ----------------------------------------------------------------------------- the exchanges


class _AllToAll(torch.autograd.Function):
    """rows [sum(send), C] -> [sum(recv), C]: chunk d of the input goes to rank d of the group.

    Backward: the reverse exchange (the gradient of chunk d comes back from rank d)."""

    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits, ep):
        ctx.send_splits, ctx.recv_splits, ctx.ep = send_splits, recv_splits, ep
        return _exchange(rows, send_splits, recv_splits, ep)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.recv_splits, ctx.send_splits, ctx.ep), None, None, None


def _exchange(rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], ep: ExpertParallel):
    rows = rows.contiguous()
    out = rows.new_empty(sum(recv_splits), *rows.shape[1:])  # [R, C]
    dist.all_to_all_single(out, rows, recv_splits, send_splits, group=ep.group)
    remote = sum(send_splits) - send_splits[ep.group_rank]  # rows that leave this rank
    ep.bytes_sent += remote * math.prod(rows.shape[1:]) * rows.element_size()
    return out


def all_to_all(rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], ep: ExpertParallel):
    """Differentiable all-to-all of rows [sum(send_splits), ...] within the expert group."""
    return _AllToAll.apply(rows, send_splits, recv_splits, ep)


def exchange_counts(counts: torch.Tensor, ep: ExpertParallel) -> torch.Tensor:
    """counts [n_expert] (pairs this rank sends to each expert) -> [E, n_local]: row s = the pairs
    rank s of the group sends to each of this rank's experts."""
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=ep.group)  # n_local counts per rank
    ep.count_bytes_sent += (ep.size - 1) * ep.n_local * counts.element_size()
    return received.view(ep.size, ep.n_local)


def capacity_offsets(topk_index: torch.Tensor, n_expert: int, capacity_factor: float, ep: ExpertParallel):
    """(capacity, offset [k, n_expert]) so that this rank keeps exactly the pairs one process would keep
    over the group's tokens (rank 0's first, then rank 1's, ...).

    One process orders an expert's pairs by slot, then by token. Ahead of this rank's slot-j pairs of
    expert e come: every rank's pairs of slots < j, and the slot-j pairs of the ranks before it."""
    N, k = topk_index.shape
    slot = torch.arange(k, device=topk_index.device).repeat_interleave(N)  # [k*N] slot-major
    flat = slot * n_expert + topk_index.t().reshape(-1)  # [k*N]
    mine = torch.bincount(flat, minlength=k * n_expert).view(k, n_expert)  # [k, E_n]
    every = [torch.empty_like(mine) for _ in range(ep.size)]
    dist.all_gather(every, mine, group=ep.group)
    every = torch.stack(every)  # [E, k, n_expert]
    per_slot = every.sum(0)  # [k, n_expert]
    before_slot = per_slot.cumsum(0) - per_slot  # every rank's pairs of earlier slots
    mine_before_slot = mine.cumsum(0) - mine  # already counted by the local position in route_tokens
    before_rank = every[: ep.group_rank].sum(0)  # [k, n_expert]
    n_group_tokens = int(every.sum()) // k
    capacity = expert_capacity(n_group_tokens, k, n_expert, capacity_factor)
    return capacity, before_slot - mine_before_slot + before_rank


# ----------------------------------------------------------------------------- one MoE layer


def _local_routing(recv_counts: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Routing:
    """The received rows (grouped by source rank, then expert) as a top-1 Routing of weight 1."""
    E, n_local = recv_counts.shape
    expert_of_chunk = torch.arange(n_local, device=device).repeat(E)  # [E * n_local]
    expert = torch.repeat_interleave(expert_of_chunk, recv_counts.flatten())  # [R]
    order = torch.argsort(expert, stable=True)  # [R] rows grouped by local expert
    unsort = torch.empty_like(order)
    unsort[order] = torch.arange(order.numel(), device=device)
    counts = recv_counts.sum(0)  # [n_local]
    return Routing(
        token_index=order,
        unsort_index=unsort,
        weight=torch.ones(order.numel(), device=device, dtype=dtype),
        expert_index=expert[order],
        counts=counts.tolist(),
        routed_counts=counts,
        topk_index=expert[:, None],
        topk_weight=torch.ones(order.numel(), 1, device=device, dtype=dtype),
        dropped=0,
    )


def expert_parallel_ffn(moe: nn.Module, x: torch.Tensor, gate_logits: torch.Tensor, ep: ExpertParallel):
    """The MoE FFN with the experts spread over the group: x [N, C], gate_logits [N, n_expert] ->
    (out [N, C], Routing of this rank's pairs). `moe` is a sharded SparseMoEFFN (its w1 .. b2 hold the
    n_local experts of this rank)."""
    N, k, bias = x.shape[0], moe.top_k, moe.balance_bias
    capacity = offset = None
    if moe.capacity_factor is not None:
        scores = gate_logits if bias is None else gate_logits + bias  # the choice route_tokens makes
        topk_index = torch.topk(scores, k, dim=-1).indices  # [N, k]
        capacity, offset = capacity_offsets(topk_index, ep.n_expert, moe.capacity_factor, ep)
    routing = route_tokens(gate_logits, k, capacity, capacity_offset=offset, choice_bias=bias)
    counts = torch.tensor(routing.counts, device=x.device)  # [n_expert] kept pairs per expert
    recv_counts = exchange_counts(counts, ep)  # [E, n_local]
    send_splits = counts.view(ep.size, ep.n_local).sum(1).tolist()  # rows to each rank of the group
    recv_splits = recv_counts.sum(1).tolist()  # rows from each rank

    rows = x.index_select(0, routing.token_index)  # [M, C] the kept pairs, in expert = rank order
    received = all_to_all(rows, send_splits, recv_splits, ep)  # [R, C]
    local = _local_routing(recv_counts, x.device, received.dtype)
    y = expert_ffn(received, moe.w1, moe.b1, moe.w2, moe.b2, local, moe.activation)  # [R, C]
    y = all_to_all(y, recv_splits, send_splits, ep)  # [M, C] each pair's expert output, home again
    return _combine(y, routing, k, N), routing


def _combine(y: torch.Tensor, routing: Routing, top_k: int, n_tokens: int) -> torch.Tensor:
    """out[n] = sum_j weight_j * y[pair (j, n)]; dropped pairs read the appended zero row. y [M, C]."""
    rows = torch.cat([y, y.new_zeros(1, y.shape[1])])  # [M + 1, C]
    weight = torch.cat([routing.weight.to(y.dtype), y.new_zeros(1)])  # [M + 1]
    per_slot = rows.index_select(0, routing.unsort_index).view(top_k, n_tokens, -1)  # [k, N, C]
    w = weight.index_select(0, routing.unsort_index).view(top_k, n_tokens, 1)  # [k, N, 1]
    return (per_slot * w).sum(0)  # [N, C]


# ----------------------------------------------------------------------------- sharding the model


def moe_layers(model: nn.Module) -> list[nn.Module]:
    return [layer.moe for layer in model.layers]


def shard_experts(model: nn.Module, ep: ExpertParallel) -> None:
    """Keep only this rank's experts in every MoE layer and route its tokens through the group.

    Loading a state dict of the full model (one process's layout) keeps this rank's slice of it."""
    lo, hi = ep.first_expert, ep.first_expert + ep.n_local
    for moe in moe_layers(model):
        if moe.n_expert != ep.n_expert:
            raise ValueError(f"the model has {moe.n_expert} experts per layer, the layout {ep.n_expert}")
        for name in EXPERT_PARAMS:
            full = getattr(moe, name)
            setattr(moe, name, nn.Parameter(full.detach()[lo:hi].clone(), full.requires_grad))
        moe.expert_parallel = ep
        moe.register_load_state_dict_pre_hook(_keep_local_experts)


def _keep_local_experts(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: a full [n_expert, ...] expert tensor becomes this rank's slice."""
    ep = module.expert_parallel
    for name in EXPERT_PARAMS:
        key = prefix + name
        if key in state_dict and state_dict[key].shape[0] == ep.n_expert != ep.n_local:
            state_dict[key] = state_dict[key][ep.first_expert : ep.first_expert + ep.n_local]


def _experts_of(moe: nn.Module) -> list[nn.Parameter]:
    return [getattr(moe, name) for name in EXPERT_PARAMS]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for moe in moe_layers(model) for p in _experts_of(moe)]


def _gather_experts(t: torch.Tensor, ep: ExpertParallel) -> torch.Tensor:
    """This rank's [n_local, ...] slice -> the group's [n_expert, ...] tensor (collective)."""
    parts = [torch.empty_like(t) for _ in range(ep.size)]
    dist.all_gather(parts, t.detach().contiguous(), group=ep.group)
    return torch.cat(parts)


class _StateView:
    """Something with a state_dict(): what the checkpoint writer asks of a model or an optimizer."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


class ExpertParallelModel(nn.Module):
    """The training wrapper for an expert-parallel model (in place of DDP): forward as the model;
    sync_gradients() and clip_grad_norm_() after the backward passes of a step; the model and
    optimizer state in one process's layout for checkpoints."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module, self.expert_parallel = module, moe_layers(module)[0].expert_parallel
        self._expert_ids = {id(p) for p in expert_parameters(module)}

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        """Gradients are only synchronised by sync_gradients(), called once per optimizer step."""
        return nullcontext()

    def _split(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # as DDP: a parameter this step did not use contributes zeros
                p.grad = torch.zeros_like(p)
        dense = [p for p in params if id(p) not in self._expert_ids]
        return dense, [p for p in params if id(p) in self._expert_ids]

    def sync_gradients(self) -> None:
        """Every gradient = the sum over the ranks that hold the parameter, / W (one process's mean)."""
        ep = self.expert_parallel
        dense, experts = self._split()
        _all_reduce_sum([p.grad for p in dense], group=None)
        if ep.replica_group is not None:
            _all_reduce_sum([p.grad for p in experts], group=ep.replica_group)
        for p in dense + experts:
            p.grad.div_(ep.world_size)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The global gradient norm (every expert of the group counted once), then clip as torch does."""
        dense, experts = self._split()
        dense_sq = sum((p.grad.float().square().sum() for p in dense), torch.zeros(()))
        expert_sq = sum((p.grad.float().square().sum() for p in experts), torch.zeros(()))
        expert_sq = expert_sq.to(experts[0].device)
        dist.all_reduce(expert_sq, group=self.expert_parallel.group)
        total = (dense_sq.to(expert_sq.device) + expert_sq).sqrt()
        torch.nn.utils.clip_grads_with_norm_(dense + experts, max_norm, total)
        return total

    def full_model(self) -> nn.Module | None:
        """On global rank 0: a one-process copy of the model with every expert (for samples); None
        elsewhere. Collective. The copy is built without touching the training's random streams."""
        full = self.full_state(None)[0].state_dict()
        if dist.get_rank() != 0:
            return None
        device = next(self.module.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model = type(self.module)(self.module.config).to(device)
        model.load_state_dict(full)
        return model.train(self.module.training)

    def full_state(self, optimizer: torch.optim.Optimizer | None):
        """(model view, optimizer view) with state_dict()s in one process's layout (collective)."""
        ep = self.expert_parallel
        model_state = self.module.state_dict()
        for i in range(len(moe_layers(self.module))):
            for name in EXPERT_PARAMS:
                key = f"layers.{i}.moe.{name}"
                model_state[key] = _gather_experts(model_state[key], ep)
        if optimizer is None:
            return _StateView(model_state), None
        state = optimizer.state_dict()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, p in enumerate(params):
            if id(p) in self._expert_ids and index in state["state"]:
                entry = dict(state["state"][index])
                for key, value in entry.items():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        entry[key] = _gather_experts(value, ep)
                state["state"] = {**state["state"], index: entry}
        return _StateView(model_state), _StateView(state)


def keep_local_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Make optimizer.load_state_dict take one process's state and keep this rank's expert slices."""
    experts = {id(p): moe.expert_parallel for moe in moe_layers(model) for p in _experts_of(moe)}

    def keep_local(opt, state_dict):
        params = [p for group in opt.param_groups for p in group["params"]]
        states = dict(state_dict["state"])
        for index, p in enumerate(params):
            if id(p) in experts and index in states:
                ep = experts[id(p)]
                states[index] = {key: _slice_if_full(value, p, ep) for key, value in states[index].items()}
        return {**state_dict, "state": states}

    optimizer.register_load_state_dict_pre_hook(keep_local)


def _slice_if_full(value, p: torch.Tensor, ep: ExpertParallel):
    if isinstance(value, torch.Tensor) and value.shape == (ep.n_expert, *p.shape[1:]) != p.shape:
        return value[ep.first_expert : ep.first_expert + ep.n_local]
    return value


def _all_reduce_sum(tensors: list[torch.Tensor], group) -> None:
    """Sum the tensors over the group in one flat buffer (one collective instead of one per tensor)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def every_rank_batches(batches: Iterator, device: torch.device) -> Iterator:
    """Evaluation batches on every rank until every rank has run out (each forward is collective): a
    rank that has run out yields (x, None), a forward whose loss is not counted, while others still
    have batches. One small all-reduce per batch says whether any rank still has one."""
    batches, filler = iter(batches), None
    while True:
        batch = next(batches, None)
        more = torch.tensor([0 if batch is None else 1], device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not int(more):
            return
        if batch is not None:
            filler = batch[0][:1, :1]  # [1, 1]: one token of this rank's last window
            yield batch
        else:
            yield (torch.zeros(1, 1, dtype=torch.long, device=device) if filler is None else filler), None
