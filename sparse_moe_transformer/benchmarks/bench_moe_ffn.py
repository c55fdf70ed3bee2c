"""Benchmark: forward + backward of one sparse MoE FFN layer against the alternatives.

    python sparse_moe_transformer/benchmarks/bench_moe_ffn.py                 # the reference setting
    python sparse_moe_transformer/benchmarks/bench_moe_ffn.py --profile       # + where the time goes
    python sparse_moe_transformer/benchmarks/bench_moe_ffn.py --device cuda   # on a GPU
    python sparse_moe_transformer/benchmarks/bench_moe_ffn.py --processes 6   # ours / dense, fresh processes
    python sparse_moe_transformer/benchmarks/bench_moe_ffn.py --only-fast --n-expert 64 --top-k 8 --d-ff 256
                                                                              # fine-grained experts

Setting: float32, 2 threads, d_model 512, d_ff 1024, 16 experts, top-2, 1024 and 2048
tokens, gradients for the input, the gate and the experts. Implementations, run in alternating
order every round (so machine noise hits them alike) and reported as medians:

    ours          SparseMoEFFN (sort once + custom autograd.Function, moe_dispatch.py)
    seed_loop     the seed's dispatch: for each top-k slot, for each chosen expert, a boolean mask
                  over all tokens, autograd through the indexing (same weights as ours)
    hf_mixtral    transformers' MixtralSparseMoeBlock, "eager" and "grouped_mm" experts; SwiGLU
                  has 3 matrices instead of 2, so its time is also reported per FLOP (divided by 1.5)
    dense         a dense GELU FFN d_model -> top_k*d_ff -> d_model: the same active work as the MoE

Then the cpu-demo layer (d_model 192, d_ff 384, 8 experts) against its dense equivalent.
`--d-model`, `--d-ff`, `--n-expert` and `--top-k` change the first layer's shape (fine-grained experts:
more experts, a larger top_k and a smaller d_ff at the same top_k * d_ff, so the same dense FFN).

On the 2-core VM the machine alternates between two states every few tens of seconds. In one
of them a 64 MiB memory copy runs faster and the expert matmuls run slower (dense barely moves;
BENCHMARKS.md). So every timed round also times such a copy, and each report gives its median
rate as the machine state of that measurement. `--processes K` repeats the ours / dense
comparison in K fresh processes per token count (one token count per process, as in a training
run) and prints every sample with its copy rate, then the median ratio.
Numbers vary with machine load; report them with the machine and the command.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from phase3_components.src.hardware import hardware_facts
from sparse_moe_transformer.src.cpu_memory import keep_freed_memory
from sparse_moe_transformer.src.train import Config, SparseMoEFFN, preset_config


def seed_style_loop(moe: SparseMoEFFN):
    """The dispatch of the seed project: a boolean mask over all tokens per (slot, expert)."""

    def forward(x):
        logits = moe.gate(x)  # [N, E]
        top_logits, top_idx = torch.topk(logits, moe.top_k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)  # [N, k]
        out = torch.zeros_like(x)
        for j in range(moe.top_k):
            for e in torch.unique(top_idx[:, j]).tolist():
                mask = top_idx[:, j] == e  # [N] bool
                h = F.gelu(x[mask] @ moe.w1[e] + moe.b1[e])
                out[mask] += weights[mask, j : j + 1] * (h @ moe.w2[e] + moe.b2[e])
        return out

    return forward


def hf_mixtral(d_model, d_ff, n_expert, top_k, implementation):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=d_model,
        intermediate_size=d_ff,
        num_local_experts=n_expert,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
    )
    cfg._experts_implementation = implementation
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        nn.init.normal_(p, std=0.02)
    return block, lambda x: block(x[None])[0]


def build(d_model, d_ff, n_expert, top_k, with_others, device):
    cfg = Config(
        vocab_size=8, d_model=d_model, n_head=1, n_layer=1, n_expert=n_expert, top_k=top_k, d_ff=d_ff,
        block_size=8,
    )  # fmt: skip
    moe = SparseMoEFFN(cfg).to(device)
    dense = nn.Sequential(nn.Linear(d_model, top_k * d_ff), nn.GELU(), nn.Linear(top_k * d_ff, d_model)).to(
        device
    )
    impls = {"ours": (moe, lambda x: moe(x)[0]), "dense": (dense, dense)}  # the FFN output alone
    if with_others:
        impls["seed_loop"] = (moe, seed_style_loop(moe))
        for name in ("eager", "grouped_mm"):
            try:
                block, fn = hf_mixtral(d_model, d_ff, n_expert, top_k, name)
                block.to(device)
                x = torch.randn(64, d_model, device=device, requires_grad=True)
                fn(x).sum().backward()  # does it run here?
                impls[f"hf_mixtral_{name}"] = (block, fn)
            except Exception as err:  # report, keep benchmarking the others
                print(f"hf_mixtral_{name}: cannot run here: {type(err).__name__}: {str(err)[:150]}")
    return impls


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_rate_probe(device, mib=64):
    """A function that copies `mib` MiB and returns the rate in GiB/s (read + write): the machine state."""
    src = torch.randn(mib << 18, device=device)
    dst = torch.empty_like(src)

    def probe():
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        return 2 * mib / 1024 / (time.perf_counter() - t0)

    return probe


def time_impls(impls, n_tokens, d_model, repeats, warmup, device):
    """Median seconds per forward + backward of each implementation, and the median copy rate."""
    x = torch.randn(n_tokens, d_model, device=device, requires_grad=True)
    grad = torch.randn(n_tokens, d_model, device=device)
    times = {name: [] for name in impls}
    probe, copy_rates = copy_rate_probe(device), []
    names = list(impls)
    for r in range(warmup + repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate the order every round
        for name in order:
            module, fn = impls[name]
            module.zero_grad(set_to_none=True)
            x.grad = None
            sync(device)
            t0 = time.perf_counter()
            fn(x).backward(grad)
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
        if r >= warmup:
            copy_rates.append(probe())
    return {name: statistics.median(v) for name, v in times.items()}, statistics.median(copy_rates)


def report(medians, copy_rate, n_tokens, d_model, d_ff, top_k, swiglu_names=()):
    flops = 3 * 2 * n_tokens * top_k * 2 * d_model * d_ff  # fwd + bwd (x3) of two matmuls per expert
    base = medians["dense"]
    print(f"\n{n_tokens} tokens: median ms, GFLOP/s of the active work, time / dense "
          f"(machine state: 64 MiB copy at {copy_rate:.1f} GiB/s)")  # fmt: skip
    for name, t in medians.items():
        line = f"  {name:22s} {t * 1e3:9.1f} ms  {flops / t / 1e9:7.1f} GFLOP/s  {t / base:6.2f}x"
        if name in swiglu_names:
            line += f"   per FLOP (SwiGLU has 1.5x the FLOPs): {t / 1.5 / base:5.2f}x"
        print(line)


def profile_ours(impls, n_tokens, d_model, device):
    from torch.profiler import profile

    module, fn = impls["ours"]
    x = torch.randn(n_tokens, d_model, device=device, requires_grad=True)
    for _ in range(2):
        fn(x).sum().backward()
    with profile() as prof:
        for _ in range(3):
            module.zero_grad(set_to_none=True)
            fn(x).sum().backward()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def ratios_over_processes(args):
    """Run ours against dense in args.processes fresh processes per token count; print each ratio."""
    samples = {n: [] for n in args.tokens}
    common = ["--only-fast", "--ratio-only", "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    common += ["--threads", str(args.threads), "--device", args.device]
    common += ["--d-model", str(args.d_model), "--d-ff", str(args.d_ff)]
    common += ["--n-expert", str(args.n_expert), "--top-k", str(args.top_k)]
    print(f"ours / dense in {args.processes} fresh processes per token count ({args.threads} threads)")
    for i in range(args.processes):
        for n_tokens in args.tokens:  # token counts alternate, so drifting machine load hits all alike
            cmd = [sys.executable, __file__, "--tokens", str(n_tokens), *common]
            line = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split("\n")[-2]
            _, _, ours_ms, dense_ms, copy_rate = line.split()
            samples[n_tokens].append(float(ours_ms) / float(dense_ms))
            print(f"  process {i + 1}, {n_tokens} tokens: ours {ours_ms} ms, dense {dense_ms} ms, "
                  f"{samples[n_tokens][-1]:.2f}x; 64 MiB copy at {copy_rate} GiB/s", flush=True)  # fmt: skip
    for n_tokens, ratios in samples.items():
        print(f"{n_tokens} tokens: median ours / dense {statistics.median(ratios):.2f}x "
              f"(per process: {', '.join(f'{r:.2f}' for r in sorted(ratios))})")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--warmup",
        type=int,
        default=8,
        help="untimed rounds first (default 8): the allocator needs a few steps to reuse freed blocks, "
        "as it has in a training run",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=1024, help="hidden size of each expert")
    parser.add_argument("--n-expert", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2, help="experts per token")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only-fast", action="store_true", help="skip the seed loop and HF Mixtral")
    parser.add_argument(
        "--profile", action="store_true", help="print the op profile of ours at the largest size"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="time ours / dense in this many fresh processes per token count and report the median",
    )
    parser.add_argument("--ratio-only", action="store_true", help=argparse.SUPPRESS)  # one --processes sample
    args = parser.parse_args()
    if args.processes:
        return ratios_over_processes(args)
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        keep_freed_memory()  # as the training CLI does: big buffers are reused, not page-faulted in
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, float32")
    print(f"hardware: {hardware_facts(args.device).summary()}")

    d_model, d_ff, n_expert, top_k = args.d_model, args.d_ff, args.n_expert, args.top_k
    print(f"MoE FFN: d_model {d_model}, d_ff {d_ff}, {n_expert} experts, top-{top_k}; "
          f"dense: {d_model} -> {top_k * d_ff} -> {d_model}")  # fmt: skip
    impls = build(d_model, d_ff, n_expert, top_k, not args.only_fast, args.device)
    swiglu = [n for n in impls if n.startswith("hf_mixtral")]
    for n_tokens in args.tokens:
        medians, copy_rate = time_impls(impls, n_tokens, d_model, args.repeats, args.warmup, args.device)
        if args.ratio_only:
            ours_ms, dense_ms = medians["ours"] * 1e3, medians["dense"] * 1e3
            print(f"RATIO {n_tokens} {ours_ms:.2f} {dense_ms:.2f} {copy_rate:.1f}")
            return
        report(medians, copy_rate, n_tokens, d_model, d_ff, top_k, swiglu)
    if args.profile:
        profile_ours(impls, max(args.tokens), d_model, args.device)

    c = preset_config("cpu-demo")
    print(f"\ncpu-demo layer: d_model {c.d_model}, d_ff {c.d_ff}, {c.n_expert} experts, top-{c.top_k}")
    small = build(c.d_model, c.d_ff, c.n_expert, c.top_k, False, args.device)
    n_tokens = 16 * c.block_size  # a training batch of 16 sequences
    medians, copy_rate = time_impls(small, n_tokens, c.d_model, args.repeats, args.warmup, args.device)
    report(medians, copy_rate, n_tokens, c.d_model, c.d_ff, c.top_k)


if __name__ == "__main__":
    main()
