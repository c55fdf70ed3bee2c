"""Generation time with and without the KV cache, for growing numbers of new tokens.

    python phase5_production/benchmarks/bench_kv_cache.py
    python phase5_production/benchmarks/bench_kv_cache.py --lengths 32 64 128 256 --d-model 128 --n-layer 4

Without a cache, token t costs a forward pass over t tokens (total ~n^2/2 token-forwards for n
tokens); with it, one token (total n). The speed-up therefore grows roughly linearly with the
length. Both runs are greedy from the same 1-token prompt and must give identical tokens (checked).
Weights are random: the time of a forward pass does not depend on their values.
"""

from __future__ import annotations

import argparse
import time

import torch

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase5_production.src.kv_cache import generate_with_cache


def best_time(fn, repeats: int) -> float:
    """Fastest of `repeats` runs, in seconds (the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=65)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=args.vocab_size,
        block_size=max(args.lengths) + 1,
        n_layer=args.n_layer,
        n_head=args.n_head,
        d_model=args.d_model,
    )
    model = GPT(config).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    print(
        f"GPT d_model={args.d_model} n_layer={args.n_layer} n_head={args.n_head}, batch 1, greedy, "
        f"torch threads {torch.get_num_threads()}, best of {args.repeats}"
    )
    print(f"{'new tokens':>10} {'no cache (s)':>13} {'KV cache (s)':>13} {'speed-up':>9}")
    rows = []
    for n in args.lengths:
        uncached = model.generate(prompt, n, temperature=0)
        cached = generate_with_cache(model, prompt, n, temperature=0)
        if not torch.equal(uncached, cached):
            raise RuntimeError(f"cached and uncached generation differ at length {n}")
        t_plain = best_time(lambda n=n: model.generate(prompt, n, temperature=0), args.repeats)
        t_cache = best_time(lambda n=n: generate_with_cache(model, prompt, n, temperature=0), args.repeats)
        rows.append(
            {"new_tokens": n, "no_cache_s": t_plain, "cache_s": t_cache, "speedup": t_plain / t_cache}
        )
        print(f"{n:>10} {t_plain:>13.3f} {t_cache:>13.3f} {t_plain / t_cache:>8.1f}x")
    return rows


if __name__ == "__main__":
    main()
