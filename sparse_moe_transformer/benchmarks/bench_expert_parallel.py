"""Benchmark: data parallel (E = 1, DDP) against expert parallel (E = 2) training on 2 gloo ranks.

    python sparse_moe_transformer/benchmarks/bench_expert_parallel.py [--preset cpu-small] [--steps 5]

For each layout the script launches 2 ranks with torchrun (gloo) and times `train_step` (AdamW, fp32) on
random tokens: the same model, the same global batch. Each rank prints its tokens/s, its peak resident
memory (ru_maxrss: parameters, gradients, optimizer state, activations and the Python/torch runtime)
and, with E = 2, the bytes the exchanges sent per step, against the balanced-load formula
    tokens x d_model x top_k x 2 exchanges x (E - 1) / E x 4 bytes, per layer, x 2 (forward + backward).
DDP's gradient all-reduce is not counted in those bytes (it moves every parameter's gradient).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist


def worker(args) -> None:
    """One rank: build the model, wrap it for the layout, time train_step."""
    from sparse_moe_transformer.src.expert_parallel import (
        ExpertParallelModel,
        exchange_bytes_per_layer,
        init_expert_parallel,
        shard_experts,
    )
    from sparse_moe_transformer.src.moe_optimizer import make_optimizer
    from sparse_moe_transformer.src.runtime import Runtime
    from sparse_moe_transformer.src.train import SparseMoETransformer, preset_config, train_step
    from sparse_moe_transformer.src.train_settings import TrainSettings

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = preset_config(args.preset, dropout=0.0, attn_dropout=0.0)
    torch.manual_seed(0)
    model = SparseMoETransformer(config)
    ep = None
    if args.expert_parallel > 1:
        ep = init_expert_parallel(args.expert_parallel, config.n_expert)
        shard_experts(model, ep)
        train_model = ExpertParallelModel(model)
    else:
        train_model = torch.nn.parallel.DistributedDataParallel(model)
    settings = TrainSettings(
        batch_size=args.batch_size, grad_accum_steps=1, seq_len=args.seq_len, max_steps=args.steps,
        max_lr=1e-3, min_lr=1e-4, warmup_steps=0, optimizer="adamw", expert_parallel=args.expert_parallel,
        world_size=world,
    )  # fmt: skip
    runtime = Runtime(torch.device("cpu"), None, rank=rank, world_size=world)
    optimizer = make_optimizer(model, settings, runtime.device)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(rank)
    seconds, sent = [], []
    for step in range(args.warmup + args.steps):
        x, y = (
            torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=gen) for _ in "xy"
        )
        if ep is not None:
            ep.reset_counters()
        dist.barrier()
        t0 = time.perf_counter()
        train_step(train_model, optimizer, scaler, [(x, y)], settings, runtime)
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            seconds.append(dt)
            sent.append(ep.bytes_sent if ep is not None else 0)
    tokens = args.batch_size * args.seq_len
    formula = 0.0
    if ep is not None:
        formula = (
            2 * config.n_layer * exchange_bytes_per_layer(tokens, config.d_model, config.top_k, ep.size, 4)
        )
    result = {
        "rank": rank, "tokens_per_s": tokens * len(seconds) / sum(seconds),
        "step_s": sum(seconds) / len(seconds),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "bytes_per_step": sum(sent) / len(sent), "formula_bytes_per_step": formula,
        "params_on_rank": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def launch(args, expert_parallel: int) -> list[dict]:
    """torchrun this script as 2 ranks with --expert-parallel E; their results."""
    with tempfile.TemporaryDirectory() as out:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(port), __file__, "--worker", "--out", out,
               "--expert-parallel", str(expert_parallel), "--preset", args.preset, "--batch-size",
               str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--expert-parallel", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}; "
        f"2 gloo ranks x {args.threads} thread(s)"
    )
    print(
        f"{args.preset}: {args.batch_size} x {args.seq_len} tokens per rank, fp32, AdamW, "
        f"{args.steps} timed steps"
    )
    for E, name in ((1, "E = 1 (DDP)"), (2, "E = 2 (expert parallel)")):
        for r in launch(args, E):
            line = (
                f"{name:<24} rank {r['rank']}: {r['tokens_per_s']:8,.0f} tokens/s, "
                f"{r['step_s'] * 1e3:7.1f} ms/step, "
                f"peak RSS {r['peak_rss_mib']:6.0f} MiB, {r['params_on_rank'] / 1e6:.2f}M parameters held"
            )
            if E > 1:
                line += (
                    f", exchanges {r['bytes_per_step'] / 2**20:.2f} MiB/step "
                    f"(balanced formula {r['formula_bytes_per_step'] / 2**20:.2f} MiB)"
                )
            print(line, flush=True)


if __name__ == "__main__":
    main()
