"""Generating text: the one decoding loop of the repository, and the sampler it starts with.

A language model maps tokens idx [B, T] to logits [B, T, V]; the last row, logits[:, -1], scores
every candidate for token T. Generation repeats: score, choose one token per row, append it.

    stream_tokens(logits_fn, idx, max_new_tokens, next_token_fn, block_size=..., cache=None)
        prefill   logits = logits_fn(idx[:, -block_size:], cache)[:, -1]   the prompt, once      [B, V]
        step      token  = next_token_fn(logits, idx)                        one id per row        [B]
                  yield token; idx = idx + token
                  logits = logits_fn(token, cache)[:, -1]             with a cache: the new token only
                         = logits_fn(idx[:, -block_size:], None)[:, -1]   without: the whole window again

The loop knows nothing about a model's layers: `logits_fn(ids, cache)` runs the model, and `cache`
is whatever object it keeps keys and values in (Phase 5's `KVCache`; with it each step feeds one
token instead of the whole sequence, the same tokens far faster). The Phase 2 GPT generates without a
cache, Phase 5's `generate_with_cache` and the Sparse MoE model with one: all three run this loop.

Past the context (block_size). A model is trained on windows of at most block_size tokens cut
anywhere from its text, at positions 0..block_size-1. So once prompt + generated tokens exceed
block_size, every step runs the model on the LAST block_size tokens, at positions 0..block_size-1
again (as nanoGPT's generate does): no position is ever one the model was not trained on, and a
window that starts mid-text is exactly what training showed it. The price: tokens that slid out are
forgotten, and with a cache every step past block_size re-prefills the whole window (each token's
position changed by one, so its cached keys are stale): O(block_size) work per token instead of O(1).
The HTTP server (Phase 5's batching engine) slides the same way for every model it serves.

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
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"top_k must be a positive integer (or None to disable it), got {k!r}.")
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

    logits_fn(ids [B, T], cache) -> logits [B, T, V]: the model, never given more than block_size
    tokens. With a cache it is given only the tokens the cache has not seen (a window first, then
    one token per step) and must append them; `cache.reset()` empties it when the window slides.
    next_token_fn(logits [B, V], idx [B, T]) -> [B]: the sampler (idx: every token so far).
    The caller puts the model in eval mode (`evaluating`).
    """
    check_int("max_new_tokens", max_new_tokens, minimum=0)
    check_int("block_size", block_size, minimum=1)
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError("idx must be a LongTensor [B, T] with at least one token per row.")
    if max_new_tokens == 0:
        return
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)  # [B] rows past EOS
    logits = logits_fn(idx[:, -block_size:], cache)[:, -1]  # prefill the last window -> [B, V]
    cached = min(idx.shape[1], block_size)  # tokens the cache holds (when there is one)
    for step in range(max_new_tokens):
        next_token = next_token_fn(logits, idx)  # [B]
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished, eos_token_id)  # finished rows repeat EOS
            finished |= next_token == eos_token_id
        yield next_token
        idx = torch.cat([idx, next_token[:, None]], dim=1)  # [B, T + 1]
        if step == max_new_tokens - 1 or bool(finished.all()):
            return
        if cache is not None and cached < block_size:  # the usual cached step: the new token only
            logits = logits_fn(next_token[:, None], cache)[:, -1]  # [B, V]
            cached += 1
            continue
        if cache is not None:  # the window slides: every token moves one position, so re-prefill
            cache.reset()
        logits = logits_fn(idx[:, -block_size:], cache)[:, -1]  # [B, V]
