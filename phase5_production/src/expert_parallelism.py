"""Expert parallelism, the lesson version: Phase 2's MoE layer with its experts spread over processes.

Data parallelism puts every expert on every process. Expert parallelism gives process r of E only the
experts [r * n_expert / E, (r + 1) * n_expert / E) and moves the tokens to them:

    1. route     top-k of the gate logits on every process (Phase 2's route_top_k)
    2. sort      the (token, slot) pairs by expert: that also groups them by the process holding it
    3. counts    all_to_all_single of the pair counts: each process learns what it will receive
    4. dispatch  all_to_all_single of the pair rows (uneven splits, given by the counts)
    5. experts   each process runs its own experts on the rows it received (Phase 2's expert_forward)
    6. return    all_to_all_single of the outputs, back to where the rows came from
    7. combine   y[n] = sum_j weight_j * output of pair (n, j)

The exchanges are autograd Functions: the backward of an all-to-all is the all-to-all in reverse.
Bytes one process sends per layer, with a balanced router: N tokens x C values x k pairs x 2 exchanges x
(E - 1) / E of the rows leave the process x bytes per value; the backward sends as much again.

    python -m torch.distributed.run --nproc_per_node 2 -m phase5_production.src.expert_parallelism OUT.json

runs the lesson's measurements (notebooks/5.7_expert_parallelism.ipynb launches it and plots them).
Dropless only: sparse_moe_transformer/src/expert_parallel.py is the production version (capacity,
gradient sync, checkpoints).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from phase2_architecture.src.mixture_of_experts import expert_forward, moe_ffn_sorted, route_top_k


class AllToAll(torch.autograd.Function):
    """rows [sum(send), C] -> [sum(recv), C]: chunk r of the rows goes to process r. Backward: reverse."""

    @staticmethod
    def forward(ctx, rows, send, recv, stats):
        ctx.send, ctx.recv, ctx.stats = send, recv, stats
        return exchange(rows, send, recv, stats)

    @staticmethod
    def backward(ctx, grad):
        return exchange(grad, ctx.recv, ctx.send, ctx.stats), None, None, None


def exchange(rows: torch.Tensor, send: list[int], recv: list[int], stats: dict) -> torch.Tensor:
    out = rows.new_empty(sum(recv), rows.shape[1])  # [R, C]
    dist.all_to_all_single(out, rows.contiguous(), recv, send)
    away = sum(send) - send[dist.get_rank()]  # rows for the other processes (ours stay here)
    stats["bytes_sent"] = stats.get("bytes_sent", 0) + away * rows.shape[1] * rows.element_size()
    return out


def expert_parallel_moe(x, gate_logits, w1, b1, w2, b2, top_k: int, stats: dict) -> torch.Tensor:
    """x [N, C], gate_logits [N, n_expert]; w1 [n_local, C, F] ... this process's experts -> y [N, C]."""
    N, C = x.shape
    E, n_local = dist.get_world_size(), w1.shape[0]
    weights, indices = route_top_k(gate_logits, top_k)  # [N, k], [N, k]
    expert = indices.reshape(-1)  # [N*k] pair p = n * k + j
    order = torch.argsort(expert, stable=True)  # [N*k] pairs grouped by expert = by process
    counts = torch.bincount(expert, minlength=E * n_local)  # [n_expert]
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts)  # [E * n_local]: from process s, for each of my experts
    received = received.view(E, n_local)
    send, recv = counts.view(E, n_local).sum(1).tolist(), received.sum(1).tolist()
    stats.setdefault("received_rows", []).append(sum(recv))

    rows = AllToAll.apply(x[order // top_k], send, recv, stats)  # [R, C] rows for my experts
    local = torch.repeat_interleave(torch.arange(n_local).repeat(E), received.flatten())  # [R]
    out = torch.zeros_like(rows)
    for e in range(n_local):  # the readable loop; the production version uses the sorted dispatch
        mine = local == e
        out = out.index_put((mine.nonzero()[:, 0],), expert_forward(rows[mine], w1[e], b1[e], w2[e], b2[e]))
    back = AllToAll.apply(out, recv, send, stats)  # [N*k, C] in `order`
    weighted = back * weights.reshape(-1)[order, None]  # [N*k, C]
    return torch.zeros(N, C, dtype=x.dtype).index_add(0, order // top_k, weighted)  # [N, C]


def experiment(
    n_tokens: int = 64, d_model: int = 16, d_ff: int = 32, n_expert: int = 4, top_k: int = 2
) -> dict:
    """What the notebook plots, from this process: equality with one process, bytes, loads."""
    rank, E = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same full weights on every process
    gate_w, gate_b = torch.randn(n_expert, d_model), torch.zeros(n_expert)
    w1, w2 = torch.randn(n_expert, d_model, d_ff) * 0.2, torch.randn(n_expert, d_ff, d_model) * 0.2
    b1, b2 = torch.randn(n_expert, d_ff) * 0.1, torch.randn(n_expert, d_model) * 0.1
    mine = slice(rank * n_expert // E, (rank + 1) * n_expert // E)
    torch.manual_seed(1 + rank)  # each process its own tokens
    x = torch.randn(n_tokens, d_model, requires_grad=True)
    result = {"rank": rank, "world": E}

    # 1. the same output and input gradient as one process holding every expert (Phase 2's layer)
    stats = {}
    y = expert_parallel_moe(x, x @ gate_w.t() + gate_b, w1[mine], b1[mine], w2[mine], b2[mine], top_k, stats)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    reference = moe_ffn_sorted(x, gate_w, gate_b, w1, b1, w2, b2, top_k)
    (grad_ref,) = torch.autograd.grad(reference.square().sum(), x)
    result["max_output_diff"] = float((y - reference).detach().abs().max())
    result["max_grad_diff"] = float((grad - grad_ref).abs().max())

    # 2. bytes per layer with a balanced router (token n -> experts n and n + 1), for growing batches
    result["bytes"] = []
    for n in (16, 32, 64, 128, 256):
        idx = torch.arange(n)
        logits = torch.zeros(n, n_expert)
        logits[idx, idx % n_expert], logits[idx, (idx + 1) % n_expert] = 2.0, 1.0
        stats = {}
        xs = torch.randn(n, d_model, requires_grad=True)
        ys = expert_parallel_moe(xs, logits, w1[mine], b1[mine], w2[mine], b2[mine], top_k, stats)
        forward = stats["bytes_sent"]
        ys.sum().backward()  # the reverse exchanges
        result["bytes"].append({"tokens": n, "forward": forward, "forward_and_backward": stats["bytes_sent"]})

    # 3. rows each process's experts receive as the router favours the first process's experts
    result["loads"] = []
    for skew in (0.0, 0.5, 1.0, 2.0, 4.0):
        bias = torch.zeros(n_expert)
        bias[: n_expert // E] = skew
        stats = {}
        with torch.no_grad():
            expert_parallel_moe(
                x, x @ gate_w.t() + bias, w1[mine], b1[mine], w2[mine], b2[mine], top_k, stats
            )
        result["loads"].append({"skew": skew, "received": stats["received_rows"][0]})
    result["balanced_received"] = n_tokens * top_k  # E processes x N tokens x k pairs / E
    return result


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = experiment()
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, result)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(every, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
