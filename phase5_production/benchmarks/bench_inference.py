"""Latency per token and throughput of KV-cached generation for batch sizes 1..N, as a table and a plot.

    python phase5_production/benchmarks/bench_inference.py --png /tmp/inference.png
    python phase5_production/benchmarks/bench_inference.py --batch-sizes 1 2 4 8 16 32 --int8 --png out.png

For each batch size B the model generates `--new-tokens` tokens for B prompts at once:
    latency per token   = total time / new tokens          (one decoding step, every row advances)
    throughput          = B * new tokens / total time      (tokens per second, all rows)
Larger batches reuse each weight read for B rows, so throughput rises while the per-step latency
grows slowly — until the machine's arithmetic is saturated. `--int8` adds the hand-written int8
model (quantize_model) for comparison; `--checkpoint` benchmarks a checkpoint written by server.py.
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from phase2_architecture.src.gpt import GPT, GPTConfig  # noqa: E402
from phase5_production.src.kv_cache import generate_with_cache  # noqa: E402
from phase5_production.src.quantization import quantize_model  # noqa: E402


def measure(model: GPT, batch_size: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    prompt = torch.randint(
        0, model.config.vocab_size, (batch_size, prompt_len), generator=torch.Generator().manual_seed(0)
    )
    generate_with_cache(model, prompt, 2, temperature=0)  # warm-up (first calls allocate memory)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        generate_with_cache(model, prompt, new_tokens, temperature=0)
        best = min(best, time.perf_counter() - start)
    return {
        "batch_size": batch_size,
        "latency_ms_per_token": 1000 * best / new_tokens,
        "throughput_tok_s": batch_size * new_tokens / best,
    }


def main(argv=None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", required=True, help="where to write the plot")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--checkpoint", default=None, help="a server.py checkpoint (default: random GPT)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--int8", action="store_true", help="also measure the int8 quantized model")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.batch_sizes) or args.new_tokens < 1 or args.prompt_len < 1:
        parser.error("batch sizes, --new-tokens and --prompt-len must be positive")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        from phase5_production.src.served_models import load_served_checkpoint

        model, _ = load_served_checkpoint(args.checkpoint)
    else:
        torch.manual_seed(0)
        model = GPT(
            GPTConfig(vocab_size=65, block_size=256, n_layer=args.n_layer, n_head=4, d_model=args.d_model)
        )
    if args.prompt_len + args.new_tokens > model.config.block_size:
        parser.error(f"--prompt-len + --new-tokens must fit in block_size {model.config.block_size}")
    model.eval()
    variants = {"float32": model}
    if args.int8:
        variants["int8"] = quantize_model(model)
    c = model.config
    print(
        f"GPT d_model={c.d_model} n_layer={c.n_layer}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, "
        f"greedy with KV cache, torch threads {torch.get_num_threads()}, best of {args.repeats}"
    )
    print(f"{'variant':>8} {'batch':>6} {'ms / token':>11} {'tokens / s':>11}")
    results: dict[str, list[dict]] = {}
    for name, m in variants.items():
        results[name] = []
        for b in args.batch_sizes:
            r = measure(m, b, args.prompt_len, args.new_tokens, args.repeats)
            results[name].append(r)
            print(f"{name:>8} {b:>6} {r['latency_ms_per_token']:>11.2f} {r['throughput_tok_s']:>11.0f}")

    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in results.items():
        sizes = [r["batch_size"] for r in rows]
        ax_lat.plot(sizes, [r["latency_ms_per_token"] for r in rows], "o-", label=name)
        ax_thr.plot(sizes, [r["throughput_tok_s"] for r in rows], "o-", label=name)
    for ax, title in ((ax_lat, "latency per decoding step (ms)"), (ax_thr, "throughput (tokens / s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=100)
    print(f"plot written to {args.png}")
    return results


if __name__ == "__main__":
    main()
