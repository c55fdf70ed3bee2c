"""Speculative decoding on trained character models: acceptance rate and speed-up vs the target alone.

    python phase5_production/benchmarks/bench_speculative.py
    python phase5_production/benchmarks/bench_speculative.py --target-steps 400 --num-draft 2 4 6

A target GPT and a much smaller draft GPT are trained on the same offline story corpus (Phase 3),
then the target generates greedily with its KV cache, and again with speculative decoding for each
draft length k. The outputs are checked to be identical; the table shows how many drafts the target
accepted and the wall-clock speed-up.
"""

from __future__ import annotations

import argparse
import time

import torch

from phase5_production.src.demo_models import story_corpus, train_char_gpt
from phase5_production.src.kv_cache import generate_with_cache
from phase5_production.src.speculative_decoding import speculative_generate


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-steps", type=int, default=200)
    parser.add_argument("--draft-steps", type=int, default=200)
    parser.add_argument("--target-d-model", type=int, default=192)
    parser.add_argument("--target-n-layer", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--num-draft", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    corpus = story_corpus()
    block = 256
    start = time.perf_counter()
    target = train_char_gpt(
        corpus,
        d_model=args.target_d_model,
        n_layer=args.target_n_layer,
        n_head=8,
        block_size=block,
        steps=args.target_steps,
        lr=1e-3,
    )
    draft = train_char_gpt(corpus, d_model=32, n_layer=1, n_head=2, block_size=block, steps=args.draft_steps)
    print(
        f"trained target ({target.num_parameters():,} params) and draft ({draft.num_parameters():,}) "
        f"in {time.perf_counter() - start:.0f} s"
    )
    prompt = torch.tensor([corpus.tokenizer.encode("Once upon a time, ")])
    if prompt.shape[1] + args.new_tokens > block:
        parser.error(f"--new-tokens must be at most {block - prompt.shape[1]}")
    generate_with_cache(target, prompt, 4, temperature=0)  # warm-up
    start = time.perf_counter()
    reference = generate_with_cache(target, prompt, args.new_tokens, temperature=0)
    t_target = time.perf_counter() - start
    print(f"target alone: {t_target:.3f} s for {args.new_tokens} tokens")
    print(f"{'k':>3} {'acceptance':>11} {'tokens/target pass':>19} {'time (s)':>9} {'speed-up':>9}")
    rows = []
    for k in args.num_draft:
        start = time.perf_counter()
        out, stats = speculative_generate(target, draft, prompt, args.new_tokens, num_draft=k)
        elapsed = time.perf_counter() - start
        if not torch.equal(out, reference):
            raise RuntimeError(f"speculative output differs from the target's greedy output (k={k})")
        rows.append({"k": k, "acceptance": stats.acceptance_rate, "speedup": t_target / elapsed})
        print(
            f"{k:>3} {stats.acceptance_rate:>11.2f} {stats.tokens_per_target_call:>19.2f} {elapsed:>9.3f} "
            f"{t_target / elapsed:>8.2f}x"
        )
    print("sample:", repr(corpus.tokenizer.decode(reference[0].tolist())[:120]))
    return rows


if __name__ == "__main__":
    main()
