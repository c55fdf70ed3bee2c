"""Benchmark: what a Muon training step costs against an AdamW step of the same preset, on this machine.

    python sparse_moe_transformer/benchmarks/bench_optimizer_step.py                     # cpu-demo, cpu-small
    python sparse_moe_transformer/benchmarks/bench_optimizer_step.py --presets cpu-small --rounds 15
    ONEDNN_MAX_CPU_ISA=AVX2 python sparse_moe_transformer/benchmarks/bench_optimizer_step.py   # a CPU whose
                                                          # bf16 is emulated (oneDNN held to AVX2)

Variants, one full training step each (forward, backward, clip, update; train.py's train_step on the
preset's batch of random token ids), taking turns in every round so that the shared machine's swings hit
them alike, reported as medians and as ratios to AdamW's median:

    adamw        AdamW for every parameter
    muon-auto    Muon + AdamW, Newton-Schulz in the dtype hardware.py chooses here (the default)
    muon-fp32    Newton-Schulz forced to fp32 (what a CPU without native bf16 gets)
    muon-bf16    Newton-Schulz forced to bf16 (torch.optim.Muon's choice, whatever the machine)

The hardware facts and decisions are printed and stored with the figures (--json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from phase3_components.src.hardware import hardware_facts
from sparse_moe_transformer.src.moe_optimizer import make_optimizer
from sparse_moe_transformer.src.runtime import setup_runtime
from sparse_moe_transformer.src.train import PRESETS, SparseMoETransformer, preset_config, train_step
from sparse_moe_transformer.src.train_settings import TrainSettings

VARIANTS = {
    "adamw": dict(optimizer="adamw"),
    "muon-auto": dict(optimizer="muon", ns_dtype="auto"),
    "muon-fp32": dict(optimizer="muon", ns_dtype="fp32"),
    "muon-bf16": dict(optimizer="muon", ns_dtype="bf16"),
}


def make_variant(preset: str, overrides: dict, seed: int = 0):
    """(model, optimizer, settings) of `preset` with the variant's optimizer settings."""
    config = preset_config(preset)
    values = {**PRESETS[preset].training, **overrides, "seq_len": config.block_size}
    names = {f for f in TrainSettings.__dataclass_fields__}
    settings = TrainSettings(**{k: v for k, v in values.items() if k in names})
    torch.manual_seed(seed)
    model = SparseMoETransformer(config).train()
    return model, make_optimizer(model, settings, torch.device("cpu")), settings


def bench_preset(preset: str, rounds: int, warmup: int, variants: list[str]) -> dict:
    rt = setup_runtime("cpu", "fp32")
    runs = {name: make_variant(preset, VARIANTS[name]) for name in variants}
    config = next(iter(runs.values()))[0].config
    s = next(iter(runs.values()))[2]
    gen = torch.Generator().manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(warmup + rounds):
        x = torch.randint(0, config.vocab_size, (s.batch_size, s.seq_len + 1), generator=gen)
        for name, (model, optimizer, settings) in runs.items():  # every variant, in turn, on the same batch
            start = time.perf_counter()
            train_step(model, optimizer, scaler, [(x[:, :-1], x[:, 1:])], settings, rt)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians.get("adamw")
    return {
        "preset": preset,
        "batch": [s.batch_size, s.seq_len],
        "rounds": rounds,
        "median_step_s": medians,
        "ratio_to_adamw": {n: m / base for n, m in medians.items()} if base else {},
        "newton_schulz_auto": rt.newton_schulz.reason,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["cpu-demo", "cpu-small"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=9, help="timed rounds (each variant once per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rt = setup_runtime("cpu", "fp32")
    report = {"hardware": rt.hardware(), "threads": torch.get_num_threads(), "presets": []}
    print(f"hardware: {hardware_facts('cpu').summary()}; {torch.get_num_threads()} threads")
    print(f"Newton-Schulz (auto): {rt.newton_schulz.reason}")
    for preset in args.presets:
        result = bench_preset(preset, args.rounds, args.warmup, args.variants)
        report["presets"].append(result)
        batch, seq = result["batch"]
        print(f"\n{preset}: batch {batch} x {seq}, median of {args.rounds} rounds")
        for name, median in result["median_step_s"].items():
            ratio = result["ratio_to_adamw"].get(name)
            print(f"  {name:<10} {1e3 * median:9.1f} ms" + (f"   {ratio:.2f}x AdamW" if ratio else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
