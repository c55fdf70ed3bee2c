"""Time to quality: how fast does each recipe reach the validation loss of nanoGPT's recipe?

    python sparse_moe_transformer/benchmarks/speedrun.py                       # the reference setting
    python sparse_moe_transformer/benchmarks/speedrun.py --iters 300 --seeds 0  # scaled down
    python sparse_moe_transformer/benchmarks/speedrun.py --variants baseline,ours,"ours:pos=learned"

Contenders (--variants; each trains on the same token stream, tokenizer and sampler):

    baseline     the Phase 2 GPT in nanoGPT's configuration and recipe: 4 layers, 4 heads, d 128,
                 block 256, learned positions, GELU, LayerNorm, bias, tied head, no dropout; batch 16,
                 AdamW (0.9, 0.95), weight decay 0.1 on matrices, lr 1e-3, 100 warm-up steps, cosine
                 to 1e-4 at 1,500 iterations, clipping 1.0; attention by F.scaled_dot_product_attention
                 as in nanoGPT (fuse_attention; "baseline:fused_attention=false" = the lesson's kernel)
    ours         the MoE's cpu-small preset: the winning recipe (train.RECIPE, TrainSettings' defaults)
    nanogpt-moe  the same MoE with nanoGPT's 2022 recipe (cpu-small before today's recipe)
    NAME:k=v,…   any of them with Config / TrainSettings fields replaced (for ablations), e.g.
                 "ours:optimizer=adamw", "nanogpt-moe:pos=rope", or "ours:ns_dtype=fp32" (Newton-Schulz in
                 fp32, what a CPU without native bf16 gets; "ours" lets hardware.py choose)

Every run stores the machine's facts and its dtype decisions (hardware.py) beside its figures.

Every run is a fresh process (no allocator or thread-pool state carries over), and the runs
alternate: seed 0 of every variant, then seed 1 of every variant, ... Each run records
(step, train_time_s, val_loss) at --evals evenly spaced steps; val_loss is the mean over the
WHOLE validation split; train_time_s counts optimizer steps only (evaluation excluded).

The report: L* = the median over seeds of the baseline's final validation loss; for every run
the training time at which its curve first reaches L* (linear interpolation between
evaluations) and that time / the baseline's total time; each run's loss at the baseline's total
wall-clock (interpolated; a run that ended sooner gives its final loss); training tokens/s; and
the model FLOP/s (3 x forward FLOPs, analytic, of the tokens trained per second) as a fraction of
the machine's fp32 matmul peak, measured in every worker (best of a few 1024^3 matmuls).

--iters N scales every recipe's schedule by N / 1500 (the baseline runs N iterations; the
warm-up and the other recipes' steps scale alike); --max-seconds S stops any run once it has
trained S seconds (the schedule is not shortened: a stopped run has not annealed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BASELINE_ITERS = 1500  # nanoGPT's schedule length: the reference every --iters scales from

# name -> what to build. "settings" are TrainSettings fields over the preset's training values;
# "config" are Config fields over the preset (the MoE) or GPTConfig fields (the baseline).
RECIPES = {
    "baseline": dict(
        model="gpt", fused_attention=True,  # F.scaled_dot_product_attention, as nanoGPT (fuse_attention)
        config=dict(n_layer=4, n_head=4, d_model=128, block_size=256, dropout=0.0, tie_weights=True),
        settings=dict(
            batch_size=16, grad_accum_steps=1, seq_len=256, max_steps=1500, max_lr=1e-3, min_lr=1e-4,
            warmup_steps=100, optimizer="adamw", lr_schedule="cosine",
        ),
    ),
    # the winning recipe: the cpu-small preset as it is (train.RECIPE, TrainSettings' defaults)
    "ours": dict(model="moe", preset="cpu-small", config={}, settings={}),
    # the same MoE with nanoGPT's 2022 recipe (cpu-small before today's recipe): learned positions,
    # no QK-norm, GPT-2's init, no soft-cap, AdamW with warmup + cosine over 1,400 steps
    "nanogpt-moe": dict(
        model="moe", preset="cpu-small",
        config=dict(pos="learned", qk_norm=False, zero_init_proj=False, logit_softcap=None),
        settings=dict(optimizer="adamw", lr_schedule="cosine", max_steps=1400, warmup_steps=100),
    ),
}  # fmt: skip


def default_data_args() -> list[str]:
    """The shared TinyStories sample when this checkout sits beside it, else the synthetic stories."""
    repo = Path(__file__).resolve().parents[2]
    for root in (repo / "shared", repo.parent / "shared", repo.parent.parent / "shared"):
        train, valid = root / "data/tinystories/train.txt", root / "data/tinystories/valid.txt"
        if train.is_file() and valid.is_file():
            return ["--data-files", f"{train},{valid}", "--text-split", "file"]
    return ["--dataset", "synthetic"]


# ----------------------------------------------------------------------------- variants


# --tiny (the smoke test): every model and batch shrunk to run in seconds
TINY = dict(n_layer=1, n_head=2, d_model=32, d_ff=32, block_size=32, seq_len=32, batch_size=4)


def parse_variant(spec: str, iters: int | None, tiny: bool = False) -> dict:
    """'NAME[:field=value,...]' -> the recipe with those Config (GPTConfig for the baseline) /
    TrainSettings fields replaced and its steps scaled to --iters."""
    from phase2_architecture.src.gpt import GPTConfig
    from sparse_moe_transformer.src.cli import _parse_value
    from sparse_moe_transformer.src.train import PRESETS, Config
    from sparse_moe_transformer.src.train_settings import TrainSettings

    name, _, rest = spec.partition(":")
    if name not in RECIPES:
        raise ValueError(f"unknown variant {name!r} in {spec!r}: choose one of {', '.join(RECIPES)}")
    recipe = json.loads(json.dumps(RECIPES[name]))  # a deep copy
    recipe["name"] = spec
    if recipe["model"] == "moe":
        recipe["settings"] = {**PRESETS[recipe["preset"]].training, **recipe["settings"]}
    config_fields = {f.name: f for f in dataclasses.fields(Config if recipe["model"] == "moe" else GPTConfig)}
    settings_fields = {f.name: f for f in dataclasses.fields(TrainSettings)}
    if tiny:
        for key, value in TINY.items():
            recipe["settings" if key in settings_fields else "config"][key] = value
        if recipe["model"] == "gpt":
            del recipe["config"]["d_ff"]  # the GPT's MLP is 4 x d_model
    for item in filter(None, rest.split(",")):
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"variant {spec!r}: expected field=value, got {item!r}")
        if key == "fused_attention" and recipe["model"] == "gpt":
            recipe[key] = text.lower() in ("1", "true", "yes")
        elif key in settings_fields:
            recipe["settings"][key] = _parse_value(key, text, settings_fields[key])
        elif key in config_fields:
            recipe["config"][key] = _parse_value(key, text, config_fields[key])
        else:
            raise ValueError(f"variant {spec!r}: {key!r} is not a field this variant's model or training has")
    if iters is not None:
        s = recipe["settings"]
        scale = iters / BASELINE_ITERS
        s["max_steps"] = max(1, round(s["max_steps"] * scale))
        s["warmup_steps"] = min(s["max_steps"], round(s["warmup_steps"] * scale))
    return recipe


# ----------------------------------------------------------------------------- nanoGPT's attention


def fuse_attention(model) -> None:
    """Make every attention layer of a Phase 2 GPT (learned positions, no GQA) compute
    F.scaled_dot_product_attention(is_causal=True), as nanoGPT does, instead of the lesson's explicit
    softmax(QK^T / sqrt(d)) V with a materialised mask. Same weights, same function (tested): only the
    speed changes, so the baseline is nanoGPT's recipe at nanoGPT's speed."""
    import types

    import torch.nn.functional as F

    def forward(attn, x, context=None, causal=False, mask=None):
        assert context is None and mask is None and causal, "the fused baseline is causal self-attention"
        q = attn.split_heads(attn.q_proj(x))  # [B, H, T, Dh]
        k = attn.split_heads(attn.k_proj(x))
        v = attn.split_heads(attn.v_proj(x))
        p = attn.attn_dropout.p if attn.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # [B, H, T, Dh]
        return attn.out_proj(attn.merge_heads(out)), None  # [B, T, C]; no weights are materialised

    for block in model.blocks:
        block.attn.forward = types.MethodType(forward, block.attn)


# ----------------------------------------------------------------------------- measurements


def matmul_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """The best fp32 FLOP/s of an n x n x n matmul over `repeats` tries (2 n^3 FLOPs each)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def gpt_forward_flops_per_token(c, seq_len: int) -> int:
    """The Phase 2 GPT, counted as train.forward_flops_per_token counts the MoE: q,k,v,out 8C^2,
    MLP (hidden 4C) 16C^2, attention 4TC per layer, head 2CV."""
    C = c.d_model
    return c.n_layer * (8 * C * C + 16 * C * C + 4 * seq_len * C) + 2 * C * c.vocab_size


@torch.no_grad()
def validation_loss(model, tokens: np.ndarray, seq_len: int, batch_size: int) -> float:
    """Token-weighted mean cross-entropy over the whole validation stream, in eval mode."""
    from sparse_moe_transformer.src.batches import iter_eval_batches

    model.eval()
    total, count = 0.0, 0
    for x, y in iter_eval_batches(tokens, seq_len, batch_size):
        out = model(x, y)
        loss = out[1] if isinstance(out, tuple) else out.loss
        total, count = total + float(loss) * y.numel(), count + y.numel()
    model.train()
    return total / count


# ----------------------------------------------------------------------------- one run (a worker process)


def build(recipe: dict, vocab_size: int):
    """-> (model, optimizer, TrainSettings, one_step(x, y), forward FLOPs per token)."""
    from phase2_architecture.src.gpt import GPT, GPTConfig
    from phase2_architecture.src.training_utils import make_adamw
    from sparse_moe_transformer.src.moe_optimizer import make_optimizer
    from sparse_moe_transformer.src.param_counts import forward_flops_per_token
    from sparse_moe_transformer.src.runtime import setup_runtime
    from sparse_moe_transformer.src.train import SparseMoETransformer, preset_config, train_step
    from sparse_moe_transformer.src.train_settings import TrainSettings

    rt = setup_runtime("cpu", "fp32")  # also the allocator setting (cpu_memory.py), for both models
    s = TrainSettings(**{"seq_len": 256, **recipe["settings"]})
    if recipe["model"] == "gpt":
        config = GPTConfig(vocab_size=vocab_size, **recipe["config"])
        model = GPT(config)
        if recipe["fused_attention"]:
            fuse_attention(model)
        optimizer = make_adamw(model, s.max_lr, s.weight_decay, (s.beta1, s.beta2))

        def one_step(x, y):
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return model, optimizer, s, one_step, gpt_forward_flops_per_token(config, s.seq_len)
    config = preset_config(recipe["preset"], **{**recipe["config"], "vocab_size": vocab_size})
    model = SparseMoETransformer(config)
    optimizer = make_optimizer(model, s, rt.device)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def one_step(x, y):
        train_step(model, optimizer, scaler, [(x, y)], s, rt)

    return model, optimizer, s, one_step, forward_flops_per_token(config, s.seq_len)


def worker(args) -> None:
    """Train one recipe with one seed; write its curve and figures to --result as JSON."""
    from phase3_components.src.lr_schedules import set_learning_rate
    from sparse_moe_transformer.src.batches import BlockBatchSampler, blocks_to_batch
    from sparse_moe_transformer.src.runtime import seed_everything
    from sparse_moe_transformer.src.train_settings import lr_at

    recipe = json.loads(args.worker)
    data = load_data(args)
    peak = matmul_peak_flops()
    seed_everything(args.seed)
    model, optimizer, s, one_step, fwd_flops = build(recipe, data.tokenizer.vocab_size)
    sampler = BlockBatchSampler(len(data.train_tokens), s.seq_len, s.batch_size, args.seed)
    eval_steps = sorted({round(s.max_steps * (i + 1) / args.evals) for i in range(args.evals)})
    curve, train_time, step = [], 0.0, 0
    model.train()
    while step < s.max_steps:
        t0 = time.perf_counter()
        set_learning_rate(optimizer, lr_at(step, s))
        x, y = blocks_to_batch(data.train_tokens, next(sampler), s.seq_len)
        one_step(x, y)
        train_time += time.perf_counter() - t0
        step += 1
        stop = args.max_seconds is not None and train_time >= args.max_seconds
        if step in eval_steps or stop or step == s.max_steps:
            loss = validation_loss(model, data.valid_tokens, s.seq_len, s.batch_size)
            if not math.isfinite(loss):
                raise RuntimeError(f"{recipe['name']}: the validation loss is {loss} at step {step}")
            curve.append({"step": step, "train_time_s": train_time, "val_loss": loss})
            print(
                f"  {recipe['name']} step {step}/{s.max_steps}: val loss {loss:.4f}, {train_time:.1f} s",
                flush=True,
            )
        if stop:
            break
    tokens = step * s.batch_size * s.seq_len
    peak = max(peak, matmul_peak_flops())
    result = {
        "variant": recipe["name"],
        "seed": args.seed,
        "curve": curve,
        "steps": step,
        "max_steps": s.max_steps,
        "train_time_s": train_time,
        "tokens_per_s": tokens / train_time,
        "model_flops_per_s": 3 * fwd_flops * tokens / train_time,
        "matmul_peak_flops": peak,
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "hardware": worker_hardware(s),
    }
    Path(args.result).write_text(json.dumps(result))


def worker_hardware(s) -> dict:
    """The machine's facts and the dtype decisions this run trained under (Newton-Schulz's for Muon)."""
    from phase3_components.src.hardware import choose_newton_schulz_dtype, choose_precision, hardware_report

    choices = [choose_precision("fp32", "cpu")]
    if s.optimizer == "muon":
        choices.append(choose_newton_schulz_dtype(s.ns_dtype, "cpu"))
    return hardware_report("cpu", *choices)


def load_data(args):
    from sparse_moe_transformer.src.data_sources import data_source_from_flags
    from sparse_moe_transformer.src.token_cache import prepare_data

    return prepare_data(
        data_source_from_flags(args, seed=args.seed),  # each seed its own synthetic stories
        args.tokenizer or "bpe",
        vocab_size=args.vocab_size or 4096,
        cache_dir=args.cache_dir,
        progress=False,
    )


# ----------------------------------------------------------------------------- the report


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """The training time at which the curve first reaches `target` (linear between evaluations;
    the first evaluation's time when it is already below); None when it never does."""
    prev = None
    for point in curve:
        if point["val_loss"] <= target:
            if prev is None:
                return point["train_time_s"]
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - point["val_loss"])
            return prev["train_time_s"] + frac * (point["train_time_s"] - prev["train_time_s"])
        prev = point
    return None


def loss_at(curve: list[dict], seconds: float) -> float:
    """The validation loss at `seconds` of training (linear between evaluations; the last loss
    when the run ended sooner; the first evaluation's loss when it comes later)."""
    times = [p["train_time_s"] for p in curve]
    losses = [p["val_loss"] for p in curve]
    return float(np.interp(seconds, times, losses))


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def report(results: list[dict], reference: str = "baseline") -> dict:
    """L*, time to L*, ratios, loss at the baseline's wall-clock, throughput; medians over seeds.
    `reference`: the variant that plays the baseline (for ablations: "ours", each part removed)."""
    baseline = [r for r in results if r["variant"] == reference]
    if not baseline:
        raise ValueError(f"the report needs the reference {reference!r}: add it to --variants")
    target = median([r["curve"][-1]["val_loss"] for r in baseline])  # L*
    base_time = median([r["train_time_s"] for r in baseline])
    base_tokens = median([r["tokens_per_s"] for r in baseline])
    summary = {"L_star": target, "baseline_train_time_s": base_time, "variants": {}}
    print(f"\nL* (median final validation loss of {reference}) = {target:.4f}")
    print(f"{reference} wall-clock (median training seconds) = {base_time:.1f} s\n")
    header = (
        f"{'variant':<34} {'seed':>4} {'final':>7} {'train s':>8} {'t(L*) s':>8} {'t/base':>7} "
        f"{'L@base t':>8} {'tok/s':>7} {'MFU':>6}"
    )
    print(header)
    print("-" * len(header))
    for name in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == name]
        rows = []
        for r in runs:
            reach = time_to_reach(r["curve"], target)
            row = {
                "seed": r["seed"],
                "final_loss": r["curve"][-1]["val_loss"],
                "train_time_s": r["train_time_s"],
                "time_to_L_star_s": reach,
                "time_ratio": None if reach is None else reach / base_time,
                "loss_at_baseline_time": loss_at(r["curve"], base_time),
                "tokens_per_s": r["tokens_per_s"],
                "mfu": r["model_flops_per_s"] / r["matmul_peak_flops"],
            }
            rows.append(row)
            print(_format_row(name, str(r["seed"]), row))
        med = {k: median([row[k] for row in rows]) for k in rows[0] if k != "seed"}
        med["tokens_per_s_vs_baseline"] = med["tokens_per_s"] / base_tokens
        med["reached_L_star"] = sum(row["time_to_L_star_s"] is not None for row in rows)
        print(_format_row(name, "med", med))
        summary["variants"][name] = {"runs": rows, "median": med}
    base_at = summary["variants"][reference]["median"]["loss_at_baseline_time"]
    print("\nagainst the targets (medians over seeds):")
    for name, v in summary["variants"].items():
        if name == reference:
            continue
        med = v["median"]
        ratio = "never reached" if med["time_ratio"] is None else f"{med['time_ratio']:.3f}"
        gap = med["loss_at_baseline_time"] - base_at
        med["loss_gap_at_baseline_time"] = gap
        print(
            f"  {name}: time to L* / baseline time = {ratio} (target <= 0.333; reached in "
            f"{med['reached_L_star']} of {len(v['runs'])} runs), loss at the baseline's wall-clock "
            f"{gap:+.3f} nats against the baseline (target <= -0.10), tokens/s "
            f"{med['tokens_per_s_vs_baseline']:.2f}x the baseline's (target >= 1.0)"
        )
    peaks = [r["matmul_peak_flops"] for r in results]
    summary["matmul_peak_gflops_median"] = median(peaks) / 1e9
    print(
        f"\nfp32 matmul peak (1024^3, best of 5 per worker): median {median(peaks) / 1e9:.1f} GFLOP/s "
        f"(range {min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f}); MFU = 3 x analytic forward FLOPs x "
        "tokens/s / that peak. t(L*): '-' = never reached. L@base t: loss at the baseline's wall-clock."
    )
    return summary


def markdown_table(summary: dict) -> str:
    """The report as the Markdown table BENCHMARKS.md quotes (medians over seeds; each seed's final loss)."""
    lines = [
        "| variant | final loss (each seed) | median final | training s | time to L\\* ÷ reference time "
        "| loss at the reference's wall-clock | vs the reference | tokens/s ÷ reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in summary["variants"].items():
        med = v["median"]
        seeds = " / ".join(f"{row['final_loss']:.4f}" for row in v["runs"])
        ratio = "never" if med["time_ratio"] is None else f"{med['time_ratio']:.3f}"
        gap = med.get("loss_gap_at_baseline_time")
        lines.append(
            f"| `{name}` | {seeds} | {med['final_loss']:.4f} | {med['train_time_s']:.0f} | {ratio} | "
            f"{med['loss_at_baseline_time']:.4f} | {'–' if gap is None else f'{gap:+.3f}'} | "
            f"{med['tokens_per_s_vs_baseline']:.2f} |"
        )
    return "\n".join(lines)


def _format_row(name: str, seed: str, row: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    return (
        f"{name[:34]:<34} {seed:>4} {row['final_loss']:>7.4f} {row['train_time_s']:>8.1f} "
        f"{f(row['time_to_L_star_s'], '>8.1f'):>8} {f(row['time_ratio'], '>7.3f'):>7} "
        f"{row['loss_at_baseline_time']:>8.4f} {row['tokens_per_s']:>7.0f} {row['mfu']:>6.1%}"
    )


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from sparse_moe_transformer.src.data_sources import add_data_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds, each run for every variant")
    p.add_argument("--variants", default="baseline,ours", help="comma-separated NAME[:field=value,...]")
    p.add_argument("--iters", type=int, default=None, help=f"baseline iterations (default {BASELINE_ITERS})")
    p.add_argument("--max-seconds", type=float, default=None, help="stop any run after this much training")
    p.add_argument("--evals", type=int, default=20, help="evaluations of the whole validation split per run")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    p.add_argument("--tiny", action="store_true", help="tiny models and batches (the smoke test)")
    p.add_argument(
        "--reference", default="baseline", help="the variant the others are measured against (L*, time)"
    )
    p.add_argument("--markdown", action="store_true", help="also print the report as a Markdown table")
    p.add_argument("--json", default=None, help="write every curve and the report to this file")
    p.add_argument("--report", default=None, metavar="JSON", help="print the report of a saved --json run")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a recipe, as JSON
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p


def split_variants(text: str) -> list[str]:
    """'a,b:x=1,y=2,c' -> ['a', 'b:x=1,y=2', 'c']: a part with no ':' that holds '=' extends the last."""
    out = []
    for part in text.split(","):
        if out and "=" in part and ":" not in part:
            out[-1] += "," + part
        else:
            out.append(part.strip())
    return [v for v in out if v]


def main(argv=None) -> dict | None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker is not None:
        worker(args)
        return None
    if args.report is not None:
        summary = report(json.loads(Path(args.report).read_text())["runs"], args.reference)
        if args.markdown:
            print("\n" + markdown_table(summary))
        return summary
    if args.dataset is None and args.data_files is None:
        data_args = default_data_args()
        argv = [*(argv if argv is not None else sys.argv[1:]), *data_args]
        args = build_parser().parse_args(argv)
    for name in ("iters", "evals"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be >= 1")
    variants = [parse_variant(v, args.iters, args.tiny) for v in split_variants(args.variants)]
    data = load_data(args)  # tokenize once; the workers read the cache
    print(
        f"data: {data.info['source']}: {len(data.train_tokens):,} train / {len(data.valid_tokens):,} valid "
        f"tokens, {data.tokenizer.name} {data.tokenizer.vocab_size} ids; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )
    data_flags = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for recipe in variants:  # alternating: every variant once per seed, in order
                result_file = Path(tmp) / f"run-{len(results)}.json"
                cmd = [
                    sys.executable, __file__, *data_flags, "--worker", json.dumps(recipe),
                    "--seed", str(seed), "--result", str(result_file),
                ]  # fmt: skip
                start = time.perf_counter()
                subprocess.run(cmd, check=True)
                result = json.loads(result_file.read_text())
                results.append(result)
                if args.json:  # after every run, so that an interrupted campaign keeps what it measured
                    save_json(args.json, results, None)
                print(
                    f"{recipe['name']} seed {seed}: {result['steps']} steps, final val loss "
                    f"{result['curve'][-1]['val_loss']:.4f}, {result['train_time_s']:.1f} s training "
                    f"({time.perf_counter() - start:.0f} s with evaluations)",
                    flush=True,
                )
    summary = report(results, args.reference)
    if args.markdown:
        print("\n" + markdown_table(summary))
    if args.json:
        save_json(args.json, results, summary)
        print(f"saved {args.json}")
    return summary


def save_json(path: str, results: list[dict], summary: dict | None) -> None:
    Path(path).write_text(json.dumps({"command": sys.argv, "runs": results, "report": summary}, indent=1))


if __name__ == "__main__":
    main()
