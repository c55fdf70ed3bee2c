"""Benchmark: generation tokens/s with and without the KV cache.

    python sparse_moe_transformer/benchmarks/bench_generation.py [--preset cpu-demo] [--new-tokens 100]

A freshly initialised model (speed does not depend on the weights) generates greedily from a
16-token prompt; both paths produce the same tokens (checked here, and in the tests). Without
the cache every step recomputes the whole prefix, so its cost grows with the length; with the
cache each step runs one token through the layers against the cached keys and values.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from phase3_components.src.hardware import hardware_facts
from sparse_moe_transformer.src.train import SparseMoETransformer, preset_config


def tokens_per_second(model, prompt, new_tokens, use_cache, repeats):
    rates, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
        rates.append(prompt.shape[0] * new_tokens / (time.perf_counter() - t0))
    return statistics.median(rates), out


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = preset_config(args.preset)
    model = SparseMoETransformer(config).eval()
    prompt = torch.randint(0, config.vocab_size, (args.batch_size, args.prompt_len))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; preset {args.preset}, batch "
        f"{args.batch_size}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy"
    )
    print(f"hardware: {hardware_facts('cpu').summary()}")
    model.generate(prompt, 4, temperature=0)  # warm-up
    cached, out_cached = tokens_per_second(model, prompt, args.new_tokens, True, args.repeats)
    full, out_full = tokens_per_second(model, prompt, args.new_tokens, False, args.repeats)
    print(f"  with KV cache     {cached:8.1f} tokens/s")
    print(f"  without (recompute prefix) {full:8.1f} tokens/s")
    print(f"  speed-up {cached / full:.2f}x; same tokens: {torch.equal(out_cached, out_full)}")


if __name__ == "__main__":
    main()
