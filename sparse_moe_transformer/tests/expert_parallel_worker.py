"""One rank of the expert-parallel equivalence checks (launched by test_expert_parallel.py, W processes).

Every rank builds the same tiny model twice from one seed: the reference, run as ONE process on the
whole global batch, and the expert-parallel model, run on this rank's rows with its slice of the
experts. It writes the largest differences it finds (logits, losses, gradients, weights after three
optimizer steps, bytes moved) to OUT/rank{R}.json; the test asserts on them.

    python expert_parallel_worker.py OUT CASES_JSON    (RANK, WORLD_SIZE, MASTER_ADDR/PORT set)
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

import torch
import torch.distributed as dist

from sparse_moe_transformer.src.expert_parallel import (
    ExpertParallelModel,
    exchange_bytes_per_layer,
    expert_parallel_ffn,
    init_expert_parallel,
    shard_experts,
)
from sparse_moe_transformer.src.memory_plan import activation_bytes_per_token, measure_saved_bytes
from sparse_moe_transformer.src.moe_optimizer import MuonAdamW, make_optimizer
from sparse_moe_transformer.src.runtime import Runtime
from sparse_moe_transformer.src.train import SparseMoETransformer, preset_config, train_step
from sparse_moe_transformer.src.train_settings import TrainSettings

CONFIG = preset_config("tiny", n_layer=2, d_model=32, n_head=4, n_expert=4, top_k=2, d_ff=48)
SEQ, ROWS = 8, 3  # tokens per sequence, sequences per micro-batch per rank


class GradientRecorder:
    """Stands in for the optimizer in train_step: keeps the gradients it is handed, changes nothing."""

    def __init__(self, model):
        self.params, self.grads = list(model.parameters()), None

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def local_slice(full: torch.Tensor, local: torch.Tensor, ep) -> torch.Tensor:
    """The part of a one-process tensor that this rank holds (the expert slice, or all of it)."""
    if full.shape == local.shape:
        return full
    return full[ep.first_expert : ep.first_expert + ep.n_local]


def run_case(case: dict, rank: int, world: int) -> dict:
    config = replace(CONFIG, capacity_factor=case.get("capacity_factor"), **case.get("options", {}))
    ep = init_expert_parallel(case["E"], config.n_expert)
    torch.manual_seed(0)
    reference = SparseMoETransformer(config)
    model = SparseMoETransformer(config)
    model.load_state_dict(reference.state_dict())
    shard_experts(model, ep)
    wrapped = ExpertParallelModel(model)
    for m in (reference, model):  # the backward reruns each layer, and with it the layer's exchanges
        m.set_activation_checkpointing(case.get("checkpointing", False))
    accum = case.get("accum", 1)
    gen = torch.Generator().manual_seed(1)
    steps = [  # 3 optimizer steps of `accum` global micro-batches [W * ROWS, SEQ]
        [torch.randint(0, config.vocab_size, (2, world * ROWS, SEQ), generator=gen) for _ in range(accum)]
        for _ in range(3)
    ]
    mine = slice(rank * ROWS, (rank + 1) * ROWS)
    global_batches = [[(b[0], b[1]) for b in step] for step in steps]
    local_batches = [[(b[0][mine], b[1][mine]) for b in step] for step in steps]
    settings = TrainSettings(
        batch_size=ROWS, grad_accum_steps=accum, seq_len=SEQ, max_steps=3, max_lr=1e-3,
        min_lr=0.0, warmup_steps=0, grad_clip=case.get("grad_clip", 1.0), optimizer="adamw",
    )  # fmt: skip
    one = Runtime(torch.device("cpu"), None)
    ranks = Runtime(torch.device("cpu"), None, rank=rank, world_size=world)
    result = {}

    # logits of the first micro-batch, and how many pairs the capacity dropped
    x0 = global_batches[0][0][0]
    ref_out = reference(x0)
    ep.reset_counters()
    ep_out = model(x0[mine])
    result["logits"] = max_diff(ref_out.logits[mine], ep_out.logits)
    dropped = torch.tensor([sum(r.dropped for r in ep_out.routing)])
    dist.all_reduce(dropped)
    result["dropped"] = [sum(r.dropped for r in ref_out.routing), int(dropped)]

    # bytes of that forward: the rows this rank sent away + the rows it returned to other ranks
    result["bytes_forward"] = [ep.bytes_sent, bytes_from_routing(ep_out.routing, ep, config.d_model)]

    # losses and every gradient of one accumulated step (no clipping: the raw gradients)
    raw = replace(settings, grad_clip=0.0)
    ref_rec, ep_rec = GradientRecorder(reference), GradientRecorder(model)
    ref_step = train_step(reference, ref_rec, _no_scaler(), global_batches[0], raw, one)
    ep.reset_counters()
    ep_step = train_step(wrapped, ep_rec, _no_scaler(), local_batches[0], raw, ranks)
    for i, name in enumerate(("lm", "aux", "z", "total")):
        result[f"loss_{name}"] = abs(float(ref_step["losses"][i]) - float(ep_step["losses"][i]))
    names = [n for n, _ in reference.named_parameters()]
    result["grads"] = {
        n: max_diff(local_slice(g_ref, g_ep, ep), g_ep)
        for n, g_ref, g_ep in zip(names, ref_rec.grads, ep_rec.grads)
    }
    result["grad_norm"] = abs(float(ref_step["grad_norm"]) - float(ep_step["grad_norm"]))

    # three optimizer steps through train_step (clipping on), then every weight
    ref_opt, ep_opt = (
        make_optimizer(reference, settings, one.device),
        make_optimizer(model, settings, one.device),
    )
    start = [p.detach().clone() for p in reference.parameters()]
    for g, b in zip(global_batches, local_batches):
        train_step(reference, ref_opt, _no_scaler(), g, settings, one)
        train_step(wrapped, ep_opt, _no_scaler(), b, settings, ranks)
    local = dict(model.named_parameters())
    result["weights"] = {
        n: max_diff(local_slice(p, local[n], ep), local[n]) for n, p in reference.named_parameters()
    }
    biases = dict(model.named_buffers())  # balance "bias": every rank's biases equal one process's
    result["weights"].update(
        {n: max_diff(b, biases[n]) for n, b in reference.named_buffers() if n.endswith("balance_bias")}
    )
    result["weights_moved"] = max(max_diff(p, q) for p, q in zip(reference.parameters(), start))
    # Muon on the expert slices = Muon on the whole stacks, given the same gradients
    result["muon"] = muon_on_slices(reference, model, ep)
    return result


def bytes_from_routing(routings, ep, d_model: int) -> int:
    """What the exchanges must have sent, from the routing alone: per layer, this rank's kept pairs
    for other ranks' experts (dispatch) + the other ranks' kept pairs for this rank's experts (return)."""
    rows = 0
    for routing in routings:
        holder = routing.expert_index // ep.n_local  # [M] the group rank holding each kept pair's expert
        per_holder = torch.bincount(holder, minlength=ep.size)  # [E]
        every = [torch.empty_like(per_holder) for _ in range(ep.size)]
        dist.all_gather(every, per_holder, group=ep.group)
        own = int(per_holder[ep.group_rank])  # pairs this rank keeps for its own experts: never sent
        received = sum(int(counts[ep.group_rank]) for counts in every) - own  # from the other ranks
        rows += (len(holder) - own) + received  # dispatch + return exchange
    return rows * d_model * 4  # float32 rows


def balanced_bytes(rank: int, world: int, size: int) -> dict:
    """One MoE layer with a router made balanced: token n picks experts n and n + 1 (mod n_expert), so
    every rank sends every rank tokens x top_k / E rows. Measured bytes vs the formula."""
    ep = init_expert_parallel(size, CONFIG.n_expert)
    model = SparseMoETransformer(CONFIG)
    shard_experts(model, ep)
    moe = model.layers[0].moe
    N = 4 * CONFIG.n_expert  # tokens on this rank
    x = torch.randn(N, CONFIG.d_model, requires_grad=True)
    n = torch.arange(N)
    gate_logits = torch.zeros(N, CONFIG.n_expert)
    gate_logits[n, n % CONFIG.n_expert] = 2.0
    gate_logits[n, (n + 1) % CONFIG.n_expert] = 1.0
    ep.reset_counters()
    out, _ = expert_parallel_ffn(moe, x, gate_logits, ep)
    forward = ep.bytes_sent
    out.sum().backward()
    formula = exchange_bytes_per_layer(N, CONFIG.d_model, CONFIG.top_k, size, 4)
    return {"forward": forward, "forward_and_backward": ep.bytes_sent, "formula": formula}


def saved_bytes(rank: int, world: int, size: int) -> dict:
    """What autograd saves per layer on every rank (summed over the ranks: the exchange moves pairs
    between ranks but every pair is kept once), and the memory plan's per-rank bytes for a balanced
    router times the number of ranks."""
    ep = init_expert_parallel(size, CONFIG.n_expert)
    torch.manual_seed(0)
    model = SparseMoETransformer(CONFIG)
    shard_experts(model, ep)
    gen = torch.Generator().manual_seed(3 + rank)
    x, y = (torch.randint(0, CONFIG.vocab_size, (ROWS, SEQ), generator=gen) for _ in range(2))
    measured = torch.tensor(measure_saved_bytes(model, x, y).per_layer)  # [L]
    dist.all_reduce(measured)
    per_token = activation_bytes_per_token(CONFIG, 4, SEQ, expert_parallel=size)["layer"]
    return {"measured": measured.tolist(), "planned": [world * ROWS * SEQ * per_token] * CONFIG.n_layer}


def muon_on_slices(reference, model, ep) -> float:
    """Hand both models the reference's gradients (sliced for this rank), one MuonAdamW step each, and
    return the largest difference between the two updates."""
    torch.manual_seed(2)
    for p in reference.parameters():
        p.grad = torch.randn_like(p)
    for p, q in zip(reference.parameters(), model.parameters()):
        q.grad = local_slice(p.grad, q, ep).clone()
    before = [[p.detach().clone() for p in m.parameters()] for m in (reference, model)]
    for m in (reference, model):
        hidden = {id(p) for p in m.hidden_matrices()}
        rest = [p for p in m.parameters() if id(p) not in hidden]
        MuonAdamW(m.hidden_matrices(), [{"params": rest}], lr=1e-3, lr_ratio=20.0).step()
    updates = [
        [p.detach() - b for p, b in zip(m.parameters(), old)] for m, old in zip((reference, model), before)
    ]
    return max(max_diff(local_slice(u, v, ep), v) for u, v in zip(*updates))


def _no_scaler():
    return torch.amp.GradScaler("cpu", enabled=False)


def main(out_dir: str, cases_json: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for case in json.loads(cases_json):
        if case.get("balanced_bytes"):
            results[case["name"]] = balanced_bytes(rank, world, case["E"])
        elif case.get("saved_bytes"):
            results[case["name"]] = saved_bytes(rank, world, case["E"])
        else:
            results[case["name"]] = run_case(case, rank, world)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
