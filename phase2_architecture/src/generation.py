"""Generating text: the one decoding loop of the repository, and the sampler it starts with.

A language model maps tokens idx [B, T] to logits [B, T, V]; the last row, logits[:, -1], scores
every candidate for token T. Generation repeats: score, choose one token per row, append it.

    stream_tokens(logits_fn, idx, max_new_tokens, next_token_fn, block_size=..., cache=None)
        prefill   logits = logits_fn(idx, cache)[:, -1]          the whole prompt, once   [B, V]
        step      token  = next_token_fn(logits, idx)            one id per row           [B]
                  yield token; idx = idx + token
                  logits = logits_fn(token, cache)[:, -1]        with a cache: the new token only
                         = logits_fn(idx, None)[:, -1]           without one: the whole sequence again

The loop knows nothing about a model's layers: `logits_fn(ids, cache)` runs the model, and `cache`
is whatever object it keeps keys and values in (Phase 5's `KVCache`; with it each step feeds one
token instead of the whole sequence, the same tokens far faster). The Phase 2 GPT generates without a
cache, Phase 5's `generate_with_cache` and the Sparse MoE model with one: all three run this loop.

The context limit. A model is trained on block_size positions; positions past that were never
trained (a learned position table has no row for them, and RoPE angles past it were never seen), so
generation refuses before the first step when prompt + max_new_tokens > block_size, with a
ValueError naming both numbers and the fix (shorten the prompt, ask for fewer tokens, or train with
a larger block_size). Sliding the window instead would shift every token's position at each step,
producing text the model was never trained to continue.

EOS. With eos_token_id, a row that produced it keeps producing it (so the batch stays rectangular),
and the loop stops as soon as every row has.

The sampler (`sample_next_token`): temperature 0 is greedy (argmax); otherwise the logits are divided
by the temperature, optionally cut to the top k, and one token is drawn from the softmax. Phase 5's
sampler adds top-p and the repetition penalty on top of this one.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from phase1_foundation.src.validation import check_int, check_number

LogitsFn = Callable[[torch.Tensor, object], torch.Tensor]  # (ids [B, T], cache) -> logits [B, T, V]
NextTokenFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits [B, V], idx) -> [B]


# ----------------------------------------------------------------------------- the sampler


def check_logits(logits: torch.Tensor) -> None:
    """logits must be a floating-point tensor [..., V] with V > 0."""
    if not isinstance(logits, torch.Tensor) or not torch.is_floating_point(logits):
        raise TypeError(
            f"logits must be a floating-point torch.Tensor [..., V], got {type(logits).__name__}."
        )
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(
            f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}."
        )


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [..., V] -> logits / temperature.

    softmax(z / T): T = 1 leaves the distribution unchanged, T < 1 sharpens it, T > 1 flattens it.
    T = 0 is the limit "always the argmax"; it cannot be written as a division, so greedy decoding
    is handled by `sample_next_token(..., temperature=0)`.
    """
    check_logits(logits)
    check_number("temperature", temperature, low=0)
    if temperature == 0:
        raise ValueError(
            "temperature 0 means greedy decoding and cannot be applied as a division; "
            "use sample_next_token(..., temperature=0) or logits.argmax(-1)."
        )
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of every row [..., V]; set the others to -inf.

    Tokens tied with the k-th largest logit are all kept (as in nanoGPT), so a row may keep more
    than k entries only when there are exact ties. k >= V keeps every token (there are not more
    than k to choose from).
    """
    check_logits(logits)
    check_int("top_k", k, minimum=1)
    if k >= logits.shape[-1]:
        return logits.clone()
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # [..., 1]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    filters: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> next token ids, LongTensor [B].

    temperature == 0: the argmax (greedy, no randomness). Otherwise: temperature, top-k, then each
    of `filters` (functions logits -> logits that set removed tokens to -inf, e.g. Phase 5's top-p),
    softmax and one multinomial draw per row with `generator` (seeded: reproducible).
    """
    check_logits(logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V] (one row per sequence), got shape {tuple(logits.shape)}.")
    check_number("temperature (0 = greedy)", temperature, low=0)
    if top_k is not None:
        check_int("top_k (or None)", top_k, minimum=1)
    if temperature == 0:
        return logits.argmax(dim=-1)  # [B] greedy
    # Subtract each row's max first (softmax does not change): the best logit becomes 0 and the others
    # negative, so even a tiny temperature (1e-40) divides into -inf at worst, never inf - inf = NaN.
    logits = apply_temperature(logits.float() - logits.float().amax(dim=-1, keepdim=True), temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    for keep in filters:
        logits = keep(logits)
    probs = torch.softmax(logits, dim=-1)  # [B, V]
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # [B]


# ----------------------------------------------------------------------------- the loop


def check_context(prompt_length: int, max_new_tokens: int, block_size: int) -> None:
    """Refuse a generation whose prompt + new tokens would run past the trained context."""
    if prompt_length + max_new_tokens > block_size:
        raise ValueError(
            f"prompt length {prompt_length} + max_new_tokens {max_new_tokens} exceeds block_size "
            f"{block_size}: positions past block_size were never trained; shorten the prompt to at most "
            f"{max(block_size - max_new_tokens, 0)} tokens, ask for at most "
            f"{max(block_size - prompt_length, 0)} new tokens, or train a model with a larger block_size."
        )


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode (no dropout) inside the block; the previous train/eval mode restored after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def stream_tokens(
    logits_fn: LogitsFn,
    idx: torch.Tensor,
    max_new_tokens: int,
    next_token_fn: NextTokenFn,
    *,
    block_size: int,
    cache: object | None = None,
    eos_token_id: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield up to max_new_tokens next tokens, each a LongTensor [B] (see the module docstring).

    logits_fn(ids [B, T], cache) -> logits [B, T, V]: the model; with a cache it is given only the
    tokens the cache has not seen (the prompt first, then one token per step) and must append them.
    next_token_fn(logits [B, V], idx [B, T]) -> [B]: the sampler (idx: every token so far).
    Raises ValueError before any work when idx.shape[1] + max_new_tokens > block_size.
    The caller puts the model in eval mode (`evaluating`).
    """
    check_int("max_new_tokens", max_new_tokens, minimum=0)
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError("idx must be a LongTensor [B, T] with at least one token per row.")
    check_context(idx.shape[1], max_new_tokens, block_size)
    if max_new_tokens == 0:
        return
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)  # [B] rows past EOS
    logits = logits_fn(idx, cache)[:, -1]  # prefill -> [B, V]
    for step in range(max_new_tokens):
        next_token = next_token_fn(logits, idx)  # [B]
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished, eos_token_id)  # finished rows repeat EOS
            finished |= next_token == eos_token_id
        yield next_token
        idx = torch.cat([idx, next_token[:, None]], dim=1)  # [B, T + 1]
        if step == max_new_tokens - 1 or bool(finished.all()):
            return
        new_ids = idx if cache is None else next_token[:, None]  # the cache already holds the rest
        logits = logits_fn(new_ids, cache)[:, -1]  # [B, V]
