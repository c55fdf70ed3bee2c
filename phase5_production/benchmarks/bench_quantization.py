"""Int8 weight quantization of a trained character GPT: size, errors, perplexity, vs torch dynamic int8.

    python phase5_production/benchmarks/bench_quantization.py
    python phase5_production/benchmarks/bench_quantization.py --steps 300 --d-model 128 --n-layer 4

Trains a GPT on the offline story corpus, then compares on held-out stories: the float model, the
hand-written per-channel int8 model (quantize_model) and PyTorch's dynamic int8 quantization
(when this torch build has it).
"""

from __future__ import annotations

import argparse
import time

import torch

from phase5_production.src.demo_models import story_corpus, train_char_gpt
from phase5_production.src.quantization import (
    format_report,
    linear_weight_bytes,
    quantization_report,
    quantize_model,
)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--val-tokens", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    corpus = story_corpus()
    start = time.perf_counter()
    model = train_char_gpt(corpus, d_model=args.d_model, n_layer=args.n_layer, steps=args.steps)
    print(
        f"trained a {model.num_parameters():,}-parameter GPT for {args.steps} steps "
        f"in {time.perf_counter() - start:.0f} s"
    )
    float_bytes, _ = linear_weight_bytes(model)
    _, int8_bytes = linear_weight_bytes(quantize_model(model))
    print(
        f"Linear weights: {float_bytes / 1024:.1f} KB float32 -> {int8_bytes / 1024:.1f} KB int8 + scales "
        f"({float_bytes / int8_bytes:.2f}x smaller); embeddings and norms stay float32"
    )
    rows = quantization_report(model, corpus.val_ids[: args.val_tokens])
    print(format_report(rows))
    return rows


if __name__ == "__main__":
    main()
