"""Benchmark: the memory of the t1000 preset at full size on the CPU, against the plan (src/memory_plan.py).

    python sparse_moe_transformer/benchmarks/bench_memory.py                      # t1000, batch 4 x 256
    python sparse_moe_transformer/benchmarks/bench_memory.py --precisions fp32    # without bf16
    python sparse_moe_transformer/benchmarks/bench_memory.py --preset tiny --set vocab_size=300 \\
        --batch-size 2 --block-size 16                                            # a tiny run (the test)

Part 1, saved for the backward pass: one training forward per precision (fp32; bf16 autocast),
with and without activation checkpointing. The bytes autograd keeps (measure_saved_bytes: distinct
storages, parameters left out) beside the plan's activations +
autocast weight copies for a CPU run. With checkpointing, the figure is what the forward keeps plus
one rebuilt layer (the largest layer of the plain run), as the plan counts it.

Part 2, two training steps, in a fresh process so that its peak resident memory is its own: a
byte-level BPE with exactly vocab_size ids (50,257 for t1000) is trained here on generated text (no
download), the text is encoded, and the model takes two full optimizer steps (forward, backward,
clip, AdamW) on it, in fp32 at the given batch. Its peak resident memory (ru_maxrss) is printed
beside the plan's total for that run; the resident memory before the model was built (Python,
torch, tokenizer, text) is printed too, since the plan does not count it.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from phase3_components.src.hardware import hardware_facts, hardware_report
from phase3_components.src.synthetic_stories import generate_stories
from sparse_moe_transformer.src.memory_plan import format_memory_plan, measure_saved_bytes, plan_memory
from sparse_moe_transformer.src.text_tokenizers import train_bpe_tokenizer

MiB = 2**20
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# ----------------------------------------------------------------------------- the model's entry points
# Every use of train.py is in these three functions.


def build_model(preset: str, overrides: dict, seed: int = 0):
    """(config, model in train mode, its parameter count) for a preset with some fields replaced."""
    from sparse_moe_transformer.src.param_counts import count_parameters
    from sparse_moe_transformer.src.train import SparseMoETransformer, preset_config

    config = preset_config(preset, **overrides)
    torch.manual_seed(seed)
    return config, SparseMoETransformer(config).train(), count_parameters(config)


def set_checkpointing(model, enabled: bool) -> None:
    model.set_activation_checkpointing(enabled)


def run_training_steps(
    model,
    batches,
    precision: str,
    device: str = "cpu",
    activation_checkpointing=False,
    compile=False,
    optimizer: str = "adamw",
    ns_dtype: str = "auto",
) -> dict:
    """One optimizer step per (x, y) batch through the training loop's train_step, timed one by one.

    Returns the LM loss and the seconds of every step, and how many steps an fp16 GradScaler skipped
    (its scale fell: a gradient overflowed). The model must already be on `device`."""
    from sparse_moe_transformer.src.moe_optimizer import make_optimizer
    from sparse_moe_transformer.src.runtime import setup_runtime
    from sparse_moe_transformer.src.train import train_step
    from sparse_moe_transformer.src.train_settings import TrainSettings

    rt = setup_runtime(device, precision, ns_dtype)
    x0 = batches[0][0]
    settings = TrainSettings(
        batch_size=x0.shape[0],
        grad_accum_steps=1,
        seq_len=x0.shape[1],
        max_steps=len(batches),
        max_lr=3e-4,
        min_lr=3e-4,
        warmup_steps=0,
        precision=precision,
        activation_checkpointing=activation_checkpointing,
        compile=compile,
        optimizer=optimizer,
        ns_dtype=ns_dtype,
    )
    set_checkpointing(model, activation_checkpointing)
    step_model = torch.compile(model) if compile else model
    opt = make_optimizer(model, settings, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    losses, seconds, skipped = [], [], 0
    for x, y in batches:
        x, y = x.to(rt.device), y.to(rt.device)
        scale = scaler.get_scale() if scaler.is_enabled() else None
        sync(rt.device)
        t0 = time.perf_counter()
        out = train_step(step_model, opt, scaler, [(x, y)], settings, rt)
        losses.append(float(out["losses"][0]))  # waits for the step
        seconds.append(time.perf_counter() - t0)
        skipped += scale is not None and scaler.get_scale() < scale
    set_checkpointing(model, False)
    return {"losses": losses, "step_seconds": seconds, "skipped_steps": int(skipped)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- local text and tokenizer


def local_corpus(vocab_size: int, n_tokens: int, seed: int = 0):
    """(tokenizer with exactly vocab_size ids, int64 token stream of at least n_tokens), offline.

    The stream is phase 3's synthetic children's stories (learnable text). The stories alone use a
    few thousand distinct words, too few for 50,257 ids, so the BPE also trains on generated
    pseudo-words (as many distinct words as ids), which give it enough merges to fill the vocabulary.
    """
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(4, 9))) for _ in range(vocab_size)]
    filler = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(max(10, vocab_size // 25))]
    stories = generate_stories(n_tokens // 80 + 20, seed=seed)  # about 130 tokens per story
    tokenizer = train_bpe_tokenizer(stories + filler, vocab_size=vocab_size)
    if tokenizer.vocab_size != vocab_size:
        raise RuntimeError(
            f"the BPE reached {tokenizer.vocab_size} ids, not {vocab_size}: add generated words"
        )
    ids = [i for story in tokenizer.encode_batch(stories) for i in [*story, tokenizer.eot_id]]
    if len(ids) < n_tokens:
        raise RuntimeError(f"{len(ids)} tokens of stories, {n_tokens} needed: generate more stories")
    return tokenizer, torch.tensor(ids, dtype=torch.long)


def consecutive_batches(tokens: torch.Tensor, n_batches: int, batch_size: int, block_size: int):
    """n_batches (x, y) pairs [B, T] from consecutive windows of the stream (y = x shifted by one)."""
    span = batch_size * (block_size + 1)
    if tokens.numel() < n_batches * span:
        raise ValueError(f"need {n_batches * span} tokens for {n_batches} batches, got {tokens.numel()}")
    batches = []
    for i in range(n_batches):
        window = tokens[i * span : (i + 1) * span].view(batch_size, block_size + 1)
        batches.append((window[:, :-1].contiguous(), window[:, 1:].contiguous()))
    return batches


# ----------------------------------------------------------------------------- part 1: saved for backward


def saved_bytes_table(preset, overrides, batch_size, block_size, precisions) -> list[dict]:
    config, model, n_params = build_model(preset, overrides)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (batch_size, block_size + 1), generator=gen)
    idx, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()  # a slice would keep all T + 1 ids
    rows = []
    for precision in precisions:
        t0 = time.perf_counter()
        plain = measure_saved_bytes(model, idx, targets, AUTOCAST[precision])
        set_checkpointing(model, True)
        checkpointed = measure_saved_bytes(model, idx, targets, AUTOCAST[precision])
        set_checkpointing(model, False)
        seconds = time.perf_counter() - t0
        measured = {False: plain.total, True: checkpointed.total + max(plain.per_layer)}
        for ckpt in (False, True):
            plan = plan_memory(
                config,
                batch_size,
                block_size,
                n_params=n_params,
                precision=precision,
                activation_checkpointing=ckpt,
                on_gpu=False,
            )
            rows.append(
                {
                    "precision": precision,
                    "activation_checkpointing": ckpt,
                    "measured_bytes": measured[ckpt],
                    "plan_bytes": plan.saved_for_backward,
                    "plan_over_measured": plan.saved_for_backward / measured[ckpt],
                    "largest_layer_bytes": max(plain.per_layer),
                    "outside_layers_bytes": (checkpointed if ckpt else plain).outside_layers,
                    "forward_seconds_both": seconds,
                }
            )
    return rows


# ----------------------------------------------------------------------------- part 2: two training steps


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; elsewhere its peak so far)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return peak_resident_bytes()


def peak_resident_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def training_steps_report(preset, overrides, batch_size, block_size, steps) -> dict:
    """Run in its own process: tokenizer, text, model, `steps` fp32 optimizer steps, peak RSS."""
    from sparse_moe_transformer.src.train import preset_config

    vocab_size = preset_config(preset, **overrides).vocab_size
    t0 = time.perf_counter()
    tokenizer, tokens = local_corpus(vocab_size, steps * batch_size * (block_size + 1))
    corpus_s = time.perf_counter() - t0
    batches = consecutive_batches(tokens, steps, batch_size, block_size)
    rss_before_model = resident_bytes()
    config, model, n_params = build_model(preset, overrides)
    run = run_training_steps(model, batches, "fp32")
    plan = plan_memory(config, batch_size, block_size, n_params=n_params, precision="fp32", on_gpu=False)
    return {
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "max_token_id": int(tokens.max()),
        "corpus_seconds": corpus_s,
        "steps": steps,
        "losses": run["losses"],
        "step_seconds": run["step_seconds"],
        "rss_before_model_bytes": rss_before_model,
        "peak_rss_bytes": peak_resident_bytes(),
        "plan_total_bytes": plan.total,
        "plan_text": format_memory_plan(plan),
    }


# ----------------------------------------------------------------------------- main


def parse_sets(items: list[str]) -> dict:
    """['n_layer=1', 'dropout=0.0'] -> {'n_layer': 1, 'dropout': 0.0} (ints, or floats with a dot)."""
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set needs FIELD=VALUE, got {item!r}")
        overrides[name] = float(value) if "." in value else int(value)
    return overrides


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="t1000")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="Config override")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "fp16"), default=["fp32", "bf16"])
    parser.add_argument("--train-steps", type=int, default=2, help="part 2's optimizer steps (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    parser.add_argument("--part", choices=("all", "saved", "train"), default="all", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = parse_sets(args.set)
    shape = (args.preset, overrides, args.batch_size, args.block_size)

    if args.part == "train":  # the child process of part 2: print its JSON and stop
        print(json.dumps(training_steps_report(*shape, args.train_steps)))
        return None

    result = {"preset": args.preset, "overrides": overrides, "batch": [args.batch_size, args.block_size]}
    result["torch"], result["threads"] = torch.__version__, torch.get_num_threads()
    result["hardware"] = hardware_report("cpu")
    print(f"preset {args.preset} {overrides or ''}, batch {args.batch_size} x {args.block_size}, CPU")
    print(f"hardware: {hardware_facts('cpu').summary()}")
    rows = saved_bytes_table(*shape, args.precisions)
    result["saved_for_backward"] = rows
    print("\nsaved for the backward pass (activations + autocast weight copies):")
    print(f"  {'precision':<10}{'checkpointing':<15}{'measured':>12}{'plan':>12}{'plan/measured':>15}")
    for r in rows:
        print(
            f"  {r['precision']:<10}{'yes' if r['activation_checkpointing'] else 'no':<15}"
            f"{r['measured_bytes'] / MiB:>8.1f} MiB{r['plan_bytes'] / MiB:>8.1f} MiB"
            f"{r['plan_over_measured']:>15.3f}"
        )

    if args.train_steps > 0:
        cmd = [sys.executable, __file__, "--part", "train", "--preset", args.preset]
        cmd += [f"--set={item}" for item in args.set]
        cmd += ["--batch-size", str(args.batch_size), "--block-size", str(args.block_size)]
        cmd += ["--train-steps", str(args.train_steps), "--threads", str(args.threads)]
        child = subprocess.run(cmd, capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"the training-steps process failed:\n{child.stderr}")
        train = json.loads(child.stdout.strip().splitlines()[-1])
        result["training_steps"] = train
        rss, before = train["peak_rss_bytes"], train["rss_before_model_bytes"]
        print(
            f"\n{train['steps']} fp32 training steps in a fresh process, tokenizer of "
            f"{train['tokenizer_vocab_size']:,} ids (trained here in {train['corpus_seconds']:.1f} s), "
            f"losses {', '.join(f'{v:.3f}' for v in train['losses'])}, "
            f"seconds per step {', '.join(f'{v:.1f}' for v in train['step_seconds'])}"
        )
        print(f"  peak resident memory          {rss / MiB:9.1f} MiB")
        print(f"  resident before the model     {before / MiB:9.1f} MiB  (Python, torch, tokenizer, text)")
        print(f"  peak - before                 {(rss - before) / MiB:9.1f} MiB")
        print(f"  plan total (CPU, fp32)        {train['plan_total_bytes'] / MiB:9.1f} MiB")
        print(f"  (peak - before) / plan        {(rss - before) / train['plan_total_bytes']:7.3f}")
        print(train["plan_text"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
