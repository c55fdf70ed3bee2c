"""The command line of the Sparse MoE transformer: every --mode, and the flags.

    train       run_config.resolve_run and build_state, then train.py's train (the loop), then the plots
    eval        validation loss and perplexity of a checkpoint
    generate    stream samples from a checkpoint
    benchmark   parameters, FLOPs per token, training tokens/s, decode latency, peak memory
    plan        the memory plan of a preset, batch and precision (no model is built)
    plot        redraw a run's plots from metrics.jsonl

Run it as `python sparse_moe_transformer/src/train.py --mode MODE ...` (or this file): `--help`
lists every flag. Errors a user can fix print one line and exit with code 2; a diverged run exits
with 3; a torchrun rank whose peer stopped answering exits with 4; a run stopped by Ctrl-C or SIGTERM
saves a checkpoint and exits with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist

from phase1_foundation.src.validation import check_int, check_number
from phase3_components.src.hardware import PRECISIONS
from sparse_moe_transformer.src.benchmark_mode import benchmark_main
from sparse_moe_transformer.src.checkpointing import LATEST_NAME
from sparse_moe_transformer.src.data_sources import add_data_arguments, data_source_from_flags
from sparse_moe_transformer.src.memory_plan import GB, format_memory_plan, plan_memory
from sparse_moe_transformer.src.param_counts import (
    count_hidden_matrix_parameters,
    count_parameters,
)
from sparse_moe_transformer.src.rank_checks import RanksStopped
from sparse_moe_transformer.src.run_config import DEFAULT_PRESET, build_state, merge_settings, resolve_run
from sparse_moe_transformer.src.runtime import TrainingDiverged, setup_runtime
from sparse_moe_transformer.src.serving import load_trained_model
from sparse_moe_transformer.src.token_cache import prepare_data
from sparse_moe_transformer.src.train import (
    PRESETS,
    Config,
    evaluate,
    preset_config,
    prompt_ids,
    train,
)
from sparse_moe_transformer.src.training_plots import make_plots

EXIT_USAGE, EXIT_DIVERGED, EXIT_RANK_STOPPED, EXIT_INTERRUPTED = 2, 3, 4, 130


def parse_overrides(items: list[str] | None) -> dict:
    """['n_layer=4', 'dropout=0.0'] -> {'n_layer': 4, 'dropout': 0.0}, typed by the Config fields."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ValueError(f"--set expects FIELD=VALUE (e.g. --set n_layer=4), got {item!r}")
        if key not in fields:
            raise ValueError(
                f"unknown config field {key!r} in --set {item}: the fields are {', '.join(sorted(fields))}"
            )
        out[key] = _parse_value(key, text, fields[key])
    return out


def _parse_value(key: str, text: str, field):
    """Convert the text of one --set value to the type of its Config field."""
    default = field.default if field.default is not dataclasses.MISSING else None
    type_name = (
        field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    )
    if text.lower() in ("none", "null") and ("None" in type_name or default is None):
        return None
    try:
        if isinstance(default, bool) or type_name.startswith("bool"):
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(default, int) or type_name.startswith("int"):
            return int(text)
        if isinstance(default, float) or type_name.startswith("float"):
            return float(text)
    except ValueError:
        kind = {"bool": "true or false", "int": "an int", "float": "a float"}.get(
            type_name.split(" ")[0], type_name
        )
        raise ValueError(f"--set {key}={text}: {key} must be {kind}") from None
    return text


def train_main(args) -> dict:
    """Resolve the run from the flags, build its state (fresh or resumed), train, then draw the plots."""
    run = resolve_run(args)
    summary = train(run, build_state(run))
    rt, status = run.runtime, summary["status"]
    if rt.is_main:
        if status == "interrupted":
            print(
                f"interrupted at step {summary['step']}: checkpoint saved to {run.out_dir / LATEST_NAME}; "
                "continue with the same command plus --resume"
            )
        elif status == "stopped":
            print(f"stopped at step {summary['step']} (--stop-at-step): continue with --resume")
        if run.settings.eval_interval or status == "finished":
            try:
                make_plots(run.out_dir)
            except ValueError as err:
                print(f"no plots: {err}")
        best = (
            f", best val loss {summary['best_val_loss']:.4f}" if summary["best_val_loss"] is not None else ""
        )
        print(f"done: step {summary['step']}{best}, checkpoints in {run.out_dir}")
    if rt.distributed:
        # Leave together: a rank that tears down its gloo connections while another is still
        # working (rank 0 drawing plots) can make the other abort with "connection closed".
        torch_dist.barrier()
    return summary


def eval_main(args) -> dict:
    """Validation loss and perplexity of a checkpoint on a dataset's validation split."""
    rt = setup_runtime(args.device, args.precision or "auto")
    model, tokenizer, checkpoint = load_trained_model(_checkpoint_arg(args), rt.device)
    flags = {"batch_size": args.batch_size, "seq_len": args.seq_len, "world_size": 1}
    s = merge_settings(checkpoint.get("preset"), checkpoint.get("train_args"), flags, model.config)
    # the run's own seed held its validation documents out (--seed picks another split)
    seed = s.seed if args.seed is None else args.seed
    data = prepare_data(data_source_from_flags(args, seed=seed), tokenizer, cache_dir=args.cache_dir)
    result = evaluate(model, data.valid_tokens, s, rt, max_batches=args.eval_batches or None)
    print(f"checkpoint {checkpoint['path']} (step {checkpoint['step']})")
    print(f"data       {data.info['source']}, validation split")
    print(f"val loss   {result['val_loss']:.4f} nats/token over {result['val_tokens']:,} real tokens")
    print(f"perplexity {result['val_ppl']:.3f}")
    return result


def generate_main(args) -> list[str]:
    """Stream samples from a checkpoint to the terminal."""
    rt = setup_runtime(args.device, "fp32")
    model, tokenizer, _ = load_trained_model(_checkpoint_arg(args), rt.device)
    ids = prompt_ids(tokenizer, args.prompt)  # past block_size the generation window slides
    texts = []
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}/{args.num_samples} ---", flush=True)
        stream = model.stream_generate(
            torch.tensor([ids], dtype=torch.long, device=rt.device),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            eos_token_id=tokenizer.eot_id,
            seed=args.seed + i,
        )
        text = print_stream(args.prompt or "", stream, tokenizer)
        texts.append(text)
    return texts


def print_stream(prompt: str, stream, tokenizer) -> str:
    """Print the prompt, then each new piece of text as its tokens arrive.

    Byte-level tokens can end inside a multi-byte character (decoded as U+FFFD); such a tail is held
    back until the next token completes it."""
    print(prompt, end="", flush=True)
    ids, shown = [], ""
    for token in stream:
        token = int(token[0])  # [B] -> this (single) row
        if token == tokenizer.eot_id:
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue
        print(text[len(shown) :], end="", flush=True)
        shown = text
    text = tokenizer.decode(ids)
    print(text[len(shown) :], flush=True)
    return prompt + text


def _checkpoint_arg(args) -> str:
    if args.checkpoint:
        return args.checkpoint
    return str(Path(args.out_dir))  # the run folder: best.pt, else latest.pt


def plan_main(args) -> dict:
    """Print the memory plan of a config, batch and precision (no model is built)."""
    preset = args.preset or DEFAULT_PRESET
    config = preset_config(preset, **args.overrides)
    s = merge_settings(preset, None, {"batch_size": args.batch_size, "optimizer": args.optimizer}, config)
    batch, optimizer = s.batch_size, s.optimizer
    block = args.seq_len or config.block_size
    precision = args.precision or "auto"
    if precision == "auto":
        precision = "fp16" if args.plan_device == "cuda" else "fp32"
    plan = plan_memory(
        config,
        batch,
        block,
        n_params=count_parameters(config),
        n_muon_params=count_hidden_matrix_parameters(config) if optimizer == "muon" else 0,
        precision=precision,
        activation_checkpointing=bool(args.activation_checkpointing),
        expert_parallel=args.expert_parallel or 1,
    )
    print(
        f"preset {preset}, batch {batch} x {block} tokens, {precision}, {optimizer or 'adamw'}"
        f"{', activation checkpointing' if args.activation_checkpointing else ''}"
    )
    print(format_memory_plan(plan, budget_gb=args.gpu_memory_gb))
    largest = largest_expert_counts(config, batch, block, precision, optimizer, args)
    print(f"\nthe most experts per layer that fit in {args.gpu_memory_gb:g} GiB per rank, by E:")
    if precision == "fp16":
        print("  (E > 1 trains in bf16 or fp32, not fp16; bf16 needs the bytes planned here for fp16)")
    for E, row in largest.items():
        print(
            f"  E = {E}: " + (f"{row['n_expert']:>5} experts, {row['params'] / 1e6:9,.1f}M parameters, "
                              f"{row['gib']:.3f} GiB per rank" if row else "not even E experts fit")
        )  # fmt: skip
    return {**plan.as_dict(), "largest_by_expert_parallel": largest}


def largest_expert_counts(config, batch, block, precision, optimizer, args, limit: int = 4096) -> dict:
    """For E = 1, 2, 4, 8: the largest n_expert (a multiple of E) whose per-rank plan fits the budget."""
    budget = args.gpu_memory_gb * GB
    result = {}
    for E in (1, 2, 4, 8):
        best = None
        first = E * -(-max(E, config.top_k) // E)  # the smallest multiple of E that holds top_k experts
        for n in range(first, limit + 1, E):
            c = dataclasses.replace(config, n_expert=n)
            plan = plan_memory(
                c, batch, block, n_params=count_parameters(c), precision=precision, expert_parallel=E,
                n_muon_params=count_hidden_matrix_parameters(c) if optimizer == "muon" else 0,
                activation_checkpointing=bool(args.activation_checkpointing),
            )  # fmt: skip
            if plan.total > budget:
                break
            best = {"n_expert": n, "params": count_parameters(c), "gib": plan.total / GB}
        result[E] = best
    return result


def plot_main(args) -> list[Path]:
    paths = make_plots(args.out_dir)
    for p in paths:
        print(f"wrote {p}")
    return paths


MODES = ("train", "eval", "generate", "benchmark", "plan", "plot")

# ---------------------------------------------------------------------------------------------
# Which flags each mode reads. A flag given to a mode that does not read it is an error: a user who
# passes --preset to generate, or --checkpoint to --resume, expects it to act, and silence would
# let the run do something else than asked.
# ---------------------------------------------------------------------------------------------
DATA_FLAGS = {"dataset", "data_files", "text_split", "text_column", "valid_fraction", "synthetic_stories",
              "cache_dir", "max_file_gb"}  # fmt: skip
TOKENIZER_FLAGS = {"tokenizer", "vocab_size"}
TRAINING_FLAGS = {
    "batch_size", "grad_accum_steps", "seq_len", "max_steps", "max_lr", "min_lr", "warmup_steps",
    "weight_decay", "grad_clip", "lr_schedule", "cooldown_frac", "optimizer", "muon_lr", "muon_momentum",
    "muon_weight_decay", "precision", "activation_checkpointing", "compile", "eval_interval",
    "eval_batches", "log_interval", "save_interval", "sample_tokens", "sample_prompt", "resume",
    "overwrite", "stop_at_step", "dist_timeout", "ns_dtype", "expert_parallel",
}  # fmt: skip
SAMPLING_FLAGS = {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                  "num_samples"}  # fmt: skip
MODE_FLAGS = {
    "train": {"out_dir", "device", "seed", "preset", "set", *DATA_FLAGS, *TOKENIZER_FLAGS, *TRAINING_FLAGS},
    "eval": {"out_dir", "preset", "device", "seed", "checkpoint", *DATA_FLAGS, "precision", "batch_size",
             "seq_len", "eval_batches"},
    "generate": {"out_dir", "preset", "device", "seed", "checkpoint", *SAMPLING_FLAGS},
    "benchmark": {"out_dir", "device", "seed", "checkpoint", "preset", "set", "precision", "batch_size",
                  "seq_len", "activation_checkpointing", "compile", "max_new_tokens", "bench_steps",
                  "bench_warmup", "bench_json", "optimizer", "ns_dtype"},
    "plan": {"preset", "set", "batch_size", "seq_len", "precision", "optimizer", "activation_checkpointing",
             "plan_device", "gpu_memory_gb", "expert_parallel"},
    "plot": {"out_dir", "preset"},
}  # fmt: skip
# mode -> {flag: (the flags it makes unread, why)}. Without --out-dir, the run folder is runs/PRESET,
# so --preset names the run of eval/generate/plot only while nothing else does.
NAMES_THE_RUN = (("out_dir", "preset"), "--checkpoint names the run")
REPLACED_BY = {
    "eval": {"checkpoint": NAMES_THE_RUN, "out_dir": (("preset",), "--out-dir names the run")},
    "generate": {"checkpoint": NAMES_THE_RUN, "out_dir": (("preset",), "--out-dir names the run")},
    "plot": {"out_dir": (("preset",), "--out-dir names the run")},
    "benchmark": {"checkpoint": (("preset", "set"), "--checkpoint names the model"),
                  "bench_json": (("out_dir",), "--bench-json names the output file")},
}  # fmt: skip
# why a flag is not read, where the reason is not just "another mode's flag"
NOT_READ_BECAUSE = {
    ("train", "checkpoint"): "--resume continues OUT_DIR/latest.pt, no other file: name its folder --out-dir",
    **{(mode, flag): "the checkpoint holds the model's config and its tokenizer"
       for mode in ("eval", "generate") for flag in ("set", *TOKENIZER_FLAGS)},
    ("generate", "precision"): "generation runs in fp32",
    **{(mode, "expert_parallel"): "a checkpoint holds every expert, so this mode runs in one process"
       for mode in ("eval", "generate", "benchmark")},
}  # fmt: skip


def given_flags(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The dest names of the flags on the command line (a flag given with its default value counts)."""
    unset = object()
    appended = {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)}
    names = {a.dest for a in parser._actions if a.dest != argparse.SUPPRESS}
    # argparse fills in a default only where the namespace has no value yet: the marker survives
    # exactly for the flags not given (append actions extend their value, so they start from None)
    namespace = argparse.Namespace(**{d: None if d in appended else unset for d in names})
    parser.parse_args(argv, namespace=namespace)
    return {d for d, v in vars(namespace).items() if v is not unset and not (d in appended and v is None)}


def check_mode_flags(mode: str, given: set[str]) -> None:
    """A one-line error for the flags given to `mode` that it does not read (MODE_FLAGS, REPLACED_BY)."""
    replaced = {}  # flag -> why it is not read
    for flag, (flags, why) in REPLACED_BY.get(mode, {}).items():
        if flag in given:
            replaced.update({f: why for f in flags if f in given})
    unread = sorted((given - MODE_FLAGS[mode] - {"mode"}) | set(replaced))
    if not unread:
        return
    names = ", ".join(f"--{f.replace('_', '-')}" for f in unread)
    reasons = sorted({NOT_READ_BECAUSE.get((mode, f), replaced.get(f, "")) for f in unread} - {""})
    why = f" ({'; '.join(reasons)})" if reasons else ""
    raise ValueError(f"--mode {mode} does not use {names}{why}: drop {'it' if len(unread) == 1 else 'them'}")


EXAMPLES = """\
examples:
  # offline demo on a fresh machine (synthetic stories, trained BPE, a few minutes on 2 CPU cores)
  python sparse_moe_transformer/src/train.py --mode train --preset cpu-demo --dataset synthetic \\
      --tokenizer bpe
  # TinyStories with the GPT-2 vocabulary on a 4 GB GPU
  python sparse_moe_transformer/src/train.py --mode train --preset t1000 --dataset tinystories \\
      --tokenizer gpt2
  python sparse_moe_transformer/src/train.py --mode train --out-dir runs/cpu-demo --resume   # continue
  python sparse_moe_transformer/src/train.py --mode generate --checkpoint runs/cpu-demo --prompt "Once upon"
  python sparse_moe_transformer/src/train.py --mode eval --checkpoint runs/cpu-demo --dataset synthetic
  python sparse_moe_transformer/src/train.py --mode benchmark --preset cpu-demo
  python sparse_moe_transformer/src/train.py --mode plan --preset t1000 --batch-size 4
  python sparse_moe_transformer/src/train.py --mode plot --out-dir runs/cpu-demo
  torchrun --nproc_per_node 2 sparse_moe_transformer/src/train.py --mode train --preset t1000 ...
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Sparse Mixture-of-Experts transformer: train, evaluate, sample, benchmark, plan memory.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mode", choices=MODES, default="train", help="what to do (default: train)")
    p.add_argument(
        "--out-dir", default=None, help="run folder: checkpoints, metrics.jsonl, plots (default: runs/PRESET)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=None, help="seed of weights, data and dropout (default 0)")

    add_model_flags(p.add_argument_group("model"))
    add_data_arguments(p)
    g = p.add_argument_group("training (defaults come from the preset)")
    add_schedule_flags(g)
    add_hardware_flags(g)
    add_run_flags(g)
    add_sampling_flags(p.add_argument_group("generate / eval / benchmark / plan"))
    return p


def add_model_flags(g) -> None:
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="model preset and its training defaults (default: cpu-demo, or the checkpoint's)",
    )
    g.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="override a Config field, e.g. --set n_layer=4 --set dropout=0 (repeatable)",
    )


def add_schedule_flags(g) -> None:
    """Batch, schedule and optimizer."""
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch per process")
    g.add_argument("--grad-accum-steps", type=int, help="micro-batches per optimizer step")
    g.add_argument(
        "--seq-len", type=int, help="tokens per training sequence (default: the model's block_size)"
    )
    g.add_argument("--max-steps", type=int, help="optimizer steps (the schedule ends here)")
    g.add_argument("--max-lr", type=float, help="peak learning rate (after warmup)")
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the schedule")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, help="AdamW decay of weight matrices (default 0.1)")
    g.add_argument("--grad-clip", type=float, help="max global gradient norm, 0 = off (default 1.0)")
    g.add_argument(
        "--lr-schedule", choices=("cosine", "wsd"), help="wsd (presets: warmup, flat, cool-down) or cosine"
    )
    g.add_argument("--cooldown-frac", type=float, help="wsd: fraction of the steps that decays (default 0.4)")
    g.add_argument(
        "--optimizer", choices=("adamw", "muon"),
        help="muon (every preset): Muon for attention and expert matrices, AdamW for the rest; or adamw",
    )  # fmt: skip
    g.add_argument("--muon-lr", type=float, help="Muon's peak learning rate (default 0.02)")
    g.add_argument("--muon-momentum", type=float, help="Muon's momentum (default 0.95)")
    g.add_argument("--muon-weight-decay", type=float, help="Muon's weight decay (default 0)")


def add_hardware_flags(g) -> None:
    """Precision, Newton-Schulz dtype, memory and speed options, expert parallelism."""
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="auto: bf16 on GPUs with native bf16 (compute capability >= 8.0); on older GPUs (a T1000) "
        "fp16 + GradScaler where fp16 matmuls are measured faster than fp32, else fp32; fp32 on CPUs",
    )
    g.add_argument(
        "--ns-dtype",
        choices=PRECISIONS,
        help="Muon's Newton-Schulz dtype; auto (default): bf16 where native and measured faster, fp32 "
        "elsewhere (a CPU without AVX512-BF16/AMX emulates bf16 ~50x slower than fp32)",
    )
    g.add_argument(
        "--activation-checkpointing",
        action="store_true",
        default=None,
        help="recompute each layer in the backward pass: less memory, ~30%% more compute",
    )
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument(
        "--expert-parallel",
        type=int,
        default=None,
        metavar="E",
        help="under torchrun: groups of E ranks share one copy of the experts, n_expert / E per rank, "
        "tokens sent to them by all-to-all (default 1: every rank holds every expert, DDP)",
    )


def add_run_flags(g) -> None:
    """Intervals, samples, resuming and stopping."""
    g.add_argument("--eval-interval", type=int, help="steps between evaluations (0 = only at the end)")
    g.add_argument("--eval-batches", type=int, help="validation batches per evaluation (0 = all)")
    g.add_argument("--log-interval", type=int, help="steps between metrics.jsonl records")
    g.add_argument("--save-interval", type=int, help="steps between latest.pt saves (also at each eval)")
    g.add_argument("--sample-tokens", type=int, help="tokens of the sample shown at each evaluation")
    g.add_argument("--sample-prompt", default="Once upon a time", help="prompt of those samples")
    g.add_argument("--resume", action="store_true", help="continue from OUT_DIR/latest.pt exactly")
    g.add_argument("--overwrite", action="store_true", help="start again even if OUT_DIR has a checkpoint")
    g.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        help="torchrun: seconds a collective waits for the other ranks before the run stops, naming the "
        "rank(s) that stopped answering (default 300)",
    )
    g.add_argument(
        "--stop-at-step",
        type=int,
        default=None,
        help="save and exit after this step, keeping the --max-steps schedule (split long runs)",
    )


def add_sampling_flags(g) -> None:
    """Generation, and the benchmark and plan modes."""
    g.add_argument("--checkpoint", help="a .pt file or a run folder (best.pt preferred); default: OUT_DIR")
    g.add_argument("--prompt", default="Once upon a time", help="text to continue ('' = start from EOT)")
    g.add_argument("--max-new-tokens", type=int, default=120, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep mass p")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    g.add_argument("--num-samples", type=int, default=1, help="samples to generate")
    g.add_argument("--bench-steps", type=int, default=10, help="benchmark: timed training steps")
    g.add_argument("--bench-warmup", type=int, default=3, help="benchmark: untimed warm-up steps")
    g.add_argument("--bench-json", default=None, help="benchmark: JSON path (default OUT_DIR/benchmark.json)")
    g.add_argument(
        "--plan-device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="plan: the device precision 'auto' resolves for (default cuda: fp16)",
    )
    g.add_argument("--gpu-memory-gb", type=float, default=4.0, help="plan: the memory budget to check")


# flag -> (minimum, maximum) for every integer flag; None = unbounded
INT_FLAGS = {
    "batch_size": 1, "grad_accum_steps": 1, "seq_len": 1, "max_steps": 1, "warmup_steps": 0,
    "eval_interval": 0, "eval_batches": 0, "log_interval": 1, "save_interval": 0, "sample_tokens": 0,
    "stop_at_step": 1, "max_new_tokens": 1, "num_samples": 1, "bench_steps": 1, "bench_warmup": 0,
    "synthetic_stories": 1, "vocab_size": 257, "top_k": 1,
}  # fmt: skip
# flag -> the bounds of check_number for every float flag
FLOAT_FLAGS = {
    "max_lr": dict(above=0), "min_lr": dict(low=0), "weight_decay": dict(low=0), "grad_clip": dict(low=0),
    "temperature": dict(low=0), "top_p": dict(above=0, high=1), "repetition_penalty": dict(above=0),
    "valid_fraction": dict(above=0, below=1), "gpu_memory_gb": dict(above=0), "dist_timeout": dict(above=0),
    "max_file_gb": dict(above=0),
}  # fmt: skip


def check_flags(args) -> None:
    """Every numeric flag in range and finite, before any work: a bad value never starts a run."""
    for name, minimum in INT_FLAGS.items():
        if getattr(args, name, None) is not None:
            check_int(f"--{name.replace('_', '-')}", getattr(args, name), minimum=minimum)
    for name, bounds in FLOAT_FLAGS.items():
        if getattr(args, name, None) is not None:
            check_number(f"--{name.replace('_', '-')}", getattr(args, name), **bounds)
    args.overrides = parse_overrides(args.set)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    if args.out_dir is None:
        args.out_dir = str(Path("runs") / (args.preset or "cpu-demo"))
    if args.seed is None and args.mode not in ("train", "eval"):
        args.seed = 0
    modes = {
        "train": train_main,
        "eval": eval_main,
        "generate": generate_main,
        "benchmark": benchmark_main,
        "plan": plan_main,
        "plot": plot_main,
    }
    try:
        check_mode_flags(args.mode, given)
        check_flags(args)
        result = modes[args.mode](args)
    except TrainingDiverged as err:
        print(f"error: training diverged at {err}", file=sys.stderr)
        raise SystemExit(EXIT_DIVERGED) from None
    except RanksStopped as err:
        # No clean exit is possible: tearing down a process group with a collective still pending
        # aborts the interpreter ("terminate called without an active exception"), so leave at once.
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_RANK_STOPPED)
    except (ValueError, TypeError, OSError, RuntimeError, OverflowError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    finally:
        if torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    if isinstance(result, dict) and result.get("status") == "interrupted":
        raise SystemExit(EXIT_INTERRUPTED)  # saved, but stopped early: not a finished run
    return result


if __name__ == "__main__":
    main()
