"""One-shot GPU check of the t1000 preset: hardware decisions, Newton-Schulz cost, memory against the plan,
speed, loss agreement, inference. Made for a single short run on whatever GPU is lent:

    python sparse_moe_transformer/benchmarks/gpu_check.py --json gpu_check.json    # any CUDA GPU, < 5 min
    python sparse_moe_transformer/benchmarks/gpu_check.py --json gpu_check.json --compile  # + compiled
    python sparse_moe_transformer/benchmarks/gpu_check.py --device cpu --tiny --steps 2    # the CPU path

It runs from the repository root without installing anything, prints unbuffered, and prints a line and
rewrites its JSON after every part, so a run cut at its time limit still reports what it finished.

1. hardware: the facts (GPU name, compute capability, memory; CPU capability) and the decisions of Phase 3's
   hardware.py with their reasons: `--precision auto` (bf16 at capability >= 8.0; below, fp16 only where
   an fp16 matmul is measured faster than fp32) and Muon's Newton-Schulz dtype.
2. Newton-Schulz: the milliseconds one optimizer step spends orthogonalising the t1000's hidden matrices
   (attention and expert stacks), in each dtype the hardware could use (median of 5).
3. training: on a CUDA GPU the process is capped at --memory-gb (4 GiB: the T1000): the caching allocator
   gets that budget less this process's CUDA context (measured at start with torch.cuda.mem_get_info),
   through torch.cuda.set_per_process_memory_fraction. The t1000 preset at its micro-batch (4 x 256, no
   gradient accumulation) trains --steps optimizer steps with the preset's optimizer (Muon + AdamW) on the
   same batches in each variant, eager first:

       fp32          the reference for the losses (not capped; IEEE fp32: TF32 off)
       fp16          autocast + GradScaler              \\  each without and with activation
       bf16          autocast (compute capability >= 8) /  checkpointing

   Printed per variant: peak allocated and reserved memory (torch.cuda.max_memory_*) beside the plan
   (src/memory_plan.py: model state + weight copies + activations + transient for "allocated",
   + fragmentation for "reserved", + the CUDA context for the total the 4 GiB must hold), tokens/s (batch
   tokens / median step time after the warm-up steps), the largest difference of the LM loss from the fp32
   run's at the same step, and the steps the fp16 GradScaler skipped (a gradient overflowed).
4. inference, batch 1, the model freshly initialised (speed and memory do not depend on the weights):
       latency per generated token   greedy decoding with the KV cache from a 16-token prompt: (time to
                                     generate 1 + N tokens - time to generate 1) / N, N = 64, median of 3
       peak inference memory         torch.cuda.max_memory_allocated during that generation (fp32 weights)
       GFLOPs per forward            torch.utils.flop_counter.FlopCounterMode over one forward of batch 1
                                     at sequence length block_size, no cache: 2 FLOPs per multiply-add of
                                     the matmuls and attention kernels the counter knows (on a CPU the
                                     fused attention kernel is not counted)
   in fp32 and under the autocast precisions of the training variants.
5. with --compile only: the same training variants under torch.compile, --compile-steps steps each.

On a CPU (--device cpu) the same code runs without the memory figures: the suite runs it with --tiny.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

# Run as a script from a plain clone (a lent GPU machine may have torch but not this package installed):
# the repository root goes first on the import path.
REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from phase3_components.src.hardware import (  # noqa: E402
    choose_newton_schulz_dtype,
    choose_precision,
    hardware_facts,
    hardware_report,
)
from phase3_components.src.muon import newton_schulz  # noqa: E402
from sparse_moe_transformer.benchmarks.bench_memory import (  # noqa: E402
    build_model,
    consecutive_batches,
    local_corpus,
    parse_sets,
    run_training_steps,
    sync,
)
from sparse_moe_transformer.src.memory_plan import GB, plan_memory  # noqa: E402
from sparse_moe_transformer.src.train import PRESETS  # noqa: E402
from sparse_moe_transformer.src.train_settings import TrainSettings  # noqa: E402

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPT_TOKENS, NEW_TOKENS, REPEATS = 16, 64, 3


def low_precisions(device: torch.device) -> list[str]:
    """fp16 everywhere (a GradScaler on the CPU too), bf16 where the hardware has it natively."""
    return ["fp16"] + (["bf16"] if hardware_facts(device).native_bf16 else [])


def newton_schulz_ms(model, device: torch.device, repeats: int = 5) -> dict[str, float]:
    """Milliseconds of one optimizer step's orthogonalisations (every hidden matrix of the model, each
    expert stack batched), in each dtype this hardware could iterate in; median of `repeats`."""
    facts = hardware_facts(device)
    dtypes = {"fp32": torch.float32}
    if facts.native_bf16:
        dtypes["bf16"] = torch.bfloat16
    if facts.is_cuda and facts.native_fp16:
        dtypes["fp16"] = torch.float16
    grads = [torch.randn(p.shape, device=device) for p in model.hidden_matrices()]
    result = {}
    for name, dtype in dtypes.items():
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            sync(device)
            t0 = time.perf_counter()
            for g in grads:
                newton_schulz(g, dtype=dtype)
            sync(device)
            times.append(time.perf_counter() - t0)
        result[name] = 1e3 * statistics.median(times[1:])
    return result


def greedy_generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The model's generation entry point (KV cache, greedy), in one place."""
    return model.generate(prompt, new_tokens, temperature=0.0)


# ----------------------------------------------------------------------------- training


def train_variant(
    base, device, batches, precision, checkpointing, compiled, cap_fraction, warmup, optimizer="adamw"
) -> dict:
    """A copy of the initial model `base` (config, model, n_params) trained on `batches`: losses,
    tokens/s, peak memory, the plan."""
    name = precision + (" +ckpt" if checkpointing else "") + (" +compile" if compiled else "")
    row = {"variant": name, "precision": precision, "checkpointing": checkpointing, "compile": compiled}
    config, model, n_params = base[0], copy.deepcopy(base[1]), base[2]
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(cap_fraction, device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device)
    try:
        run = run_training_steps(
            model, batches, precision, str(device), checkpointing, compiled, optimizer=optimizer
        )
        row["losses"], row["skipped_steps"] = run["losses"], run["skipped_steps"]
        timed = run["step_seconds"][min(warmup, len(batches) - 1) :]  # after compilation, warm caches
        row["tokens_per_s"] = batches[0][0].numel() / statistics.median(timed)
    except torch.OutOfMemoryError as err:
        row["error"] = "out of memory: " + str(err).splitlines()[0][:200]
    except Exception as err:  # e.g. --compile without a working compiler: report it, run the rest
        if device.type != "cuda":
            raise  # the CPU path is the test: fail loudly there
        row["error"] = f"{type(err).__name__}: " + (str(err).splitlines() or [""])[0][:200]
    if device.type == "cuda":
        row["peak_allocated"] = torch.cuda.max_memory_allocated(device)
        row["peak_reserved"] = torch.cuda.max_memory_reserved(device)
    B, T = batches[0][0].shape
    plan = plan_memory(
        config,
        B,
        T,
        n_params=n_params,
        precision=precision,
        activation_checkpointing=checkpointing,
        on_gpu=device.type == "cuda",
    )
    row["plan_allocated"] = plan.total - plan.fragmentation - plan.runtime_overhead
    row["plan_reserved"] = plan.total - plan.runtime_overhead
    row["plan_total"] = plan.total
    del model
    if compiled:
        torch._dynamo.reset()  # drop the compiled graphs, which hold on to the model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- inference


def inference_figures(base, device, precision, cap_fraction) -> dict:
    """Latency per generated token, peak inference memory, GFLOPs per forward (module docstring)."""
    config, model = base[0], copy.deepcopy(base[1])
    model.to(device).eval()
    autocast = AUTOCAST[precision]

    def context():
        return torch.autocast(device.type, autocast) if autocast else nullcontext()

    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT_TOKENS), generator=gen).to(device)
    new_tokens = min(NEW_TOKENS, config.block_size - PROMPT_TOKENS - 1)
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(cap_fraction, device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def seconds(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        with context():
            greedy_generate(model, prompt, n)
        sync(device)
        return time.perf_counter() - t0

    seconds(1 + new_tokens)  # warm-up
    per_token = [(seconds(1 + new_tokens) - seconds(1)) / new_tokens for _ in range(REPEATS)]
    figures = {
        "precision": precision,
        "latency_ms_per_token": 1e3 * statistics.median(per_token),
        "new_tokens": new_tokens,
        "peak_inference_memory": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    x = torch.randint(0, config.vocab_size, (1, config.block_size), generator=gen).to(device)
    with torch.no_grad(), context(), FlopCounterMode(display=False) as counter:
        model(x)
    figures["gflops_per_forward"] = counter.get_total_flops() / 1e9
    figures["flops_counted_ops"] = sorted(str(op) for op in counter.get_flop_counts()["Global"])
    figures["flops_seq_len"] = config.block_size
    return figures


# ----------------------------------------------------------------------------- main


def _gib(row: dict, key: str) -> str:
    return f"{row[key] / GB:.3f}" if row.get(key) is not None else "n/a"


def print_training_row(row: dict) -> None:
    losses = row.get("losses") or [float("nan")]
    print(
        f"  {row['variant']:<22}{_gib(row, 'peak_allocated'):>7}{_gib(row, 'plan_allocated'):>7}"
        f"{_gib(row, 'peak_reserved'):>10}{_gib(row, 'plan_reserved'):>7}{_gib(row, 'plan_total'):>12}"
        f"{row.get('tokens_per_s', float('nan')):>10.0f}{losses[0]:>12.4f}{losses[-1]:>11.4f}"
        f"{row.get('max_loss_diff_vs_fp32', float('nan')):>13.4f}{row.get('skipped_steps', 0):>9}"
        + (f"  {row['error']}" if "error" in row else "")
    )


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per eager variant")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of tokens/s")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="the GPU memory cap (the T1000's 4 GiB)")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset, batch 2 x 16 (the CPU test)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="Config override")
    parser.add_argument("--optimizer", choices=("muon", "adamw"), default=None, help="default: the preset's")
    parser.add_argument("--compile", action="store_true", help="also the torch.compile variants (slow)")
    parser.add_argument("--compile-steps", type=int, default=10, help="optimizer steps per compiled variant")
    parser.add_argument("--json", default=None, help="write every figure to this JSON file (after each part)")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.compile_steps < 2:
        parser.error("--steps and --compile-steps must be >= 2 (one warm-up step, one timed)")
    return args


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)  # every line out at once, even into a pipe or a file
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible: run with --device cpu for the CPU path")
    if args.tiny:
        preset, overrides, batch_size, block_size = "tiny", {"vocab_size": 300}, 2, 16
    else:
        preset, overrides, batch_size, block_size = "t1000", {}, 4, 256
    optimizer = args.optimizer or PRESETS[preset].training.get("optimizer", TrainSettings.optimizer)
    base = build_model(preset, {**overrides, **parse_sets(args.set)})  # (config, model, n_params)
    _, tokens = local_corpus(base[0].vocab_size, args.steps * batch_size * (block_size + 1))
    batches = consecutive_batches(tokens, args.steps, batch_size, block_size)
    result = {"torch": torch.__version__, "preset": preset, "steps": args.steps, "optimizer": optimizer}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))

    # -- 1. hardware facts and decisions --------------------------------------------------------------
    cap_fraction, context_bytes = 1.0, None
    if device.type == "cuda":
        # The allocator's cap is the budget less this process's CUDA context (measured: what the
        # device has in use before the allocator holds anything), which the 4 GiB card holds too.
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info(device)
        context_bytes = total - free - torch.cuda.memory_reserved(device)
        cap_fraction = min(1.0, max(0.0, args.memory_gb * GB - context_bytes) / total)
    auto_precision = choose_precision("auto", device)
    ns_choice = choose_newton_schulz_dtype("auto", device)
    result["hardware"] = hardware_report(device, auto_precision, ns_choice)
    result["batch"], result["memory_cap_gb"] = [batch_size, block_size], args.memory_gb
    result["config"], result["cuda_context_bytes"] = dataclasses.asdict(base[0]), context_bytes
    print(f"hardware: {hardware_facts(device).summary()}; torch {torch.__version__}")
    print(f"  --precision auto -> {auto_precision.name}: {auto_precision.reason}")
    print(f"  Newton-Schulz -> {ns_choice.name}: {ns_choice.reason}")
    print(f"{preset} {base[0]}, batch {batch_size} x {block_size}, optimizer {optimizer}")
    if device.type == "cuda":
        print(
            f"CUDA context {context_bytes / GB:.3f} GiB; the allocator capped at {args.memory_gb:g} GiB "
            f"less the context (fraction {cap_fraction:.4f} of the card), except for the fp32 reference"
        )
    save()

    # -- 2. Newton-Schulz, timed alone ------------------------------------------------------------------
    result["newton_schulz_ms_per_step"] = newton_schulz_ms(copy.deepcopy(base[1]).to(device), device)
    ns = result["newton_schulz_ms_per_step"]
    print("Newton-Schulz per optimizer step: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ns.items()))
    save()

    # -- 3. training, eager (then 5. compiled, with --compile) ----------------------------------------------
    lows = low_precisions(device)
    variants = [("fp32", False, False, batches)]
    variants += [(p, ck, False, batches) for p in lows for ck in (False, True)]
    if args.compile:
        variants += [(p, ck, True, batches[: args.compile_steps]) for p in lows for ck in (False, True)]
    print(f"\ntraining, {args.steps} steps per eager variant on the same batches (GiB; plan: memory_plan.py)")
    header = f"  {'variant':<22}{'alloc':>7}{'plan':>7}{'reserved':>10}{'plan':>7}{'plan total':>12}"
    print(header + f"{'tokens/s':>10}{'first loss':>12}{'last loss':>11}{'max |dloss|':>13}{'skipped':>9}")
    result["training"] = []
    for precision, ckpt, compiled, variant_batches in variants:
        cap = 1.0 if precision == "fp32" else cap_fraction
        warmup = min(args.warmup, len(variant_batches) - 1)
        row = train_variant(base, device, variant_batches, precision, ckpt, compiled, cap, warmup, optimizer)
        reference = result["training"][0].get("losses") if result["training"] else None
        if reference and row.get("losses"):
            row["max_loss_diff_vs_fp32"] = max(abs(a - b) for a, b in zip(row["losses"], reference))
        result["training"].append(row)
        print_training_row(row)
        save()

    # -- 4. inference ---------------------------------------------------------------------------------
    print(f"\ninference, batch 1 (latency: {PROMPT_TOKENS}-token prompt, greedy with the KV cache)")
    result["inference"] = []
    for precision in ["fp32", *lows]:
        fig = inference_figures(base, device, precision, cap_fraction)
        result["inference"].append(fig)
        memory = fig["peak_inference_memory"]
        print(
            f"  {fig['precision']:<6} latency {fig['latency_ms_per_token']:.2f} ms/token over "
            f"{fig['new_tokens']} tokens, peak memory "
            f"{'n/a (CPU)' if memory is None else f'{memory / GB:.3f} GiB'}, "
            f"{fig['gflops_per_forward']:.2f} GFLOPs per forward at length {fig['flops_seq_len']} "
            f"({', '.join(fig['flops_counted_ops'])})"
        )
        save()
    if args.json:
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
