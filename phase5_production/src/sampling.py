"""Turning next-token logits into a next token: temperature, top-k, top-p, repetition penalty.

A language model gives, for every position, a vector of logits z [V] (one score per vocabulary
entry). Decoding chooses one token from them. Each knob below reshapes the distribution
p = softmax(z) before a single draw:

    repetition penalty   z_j -> z_j / r  if z_j > 0,  z_j * r  if z_j <= 0   for tokens j already seen
                         (CTRL, Keskar et al. 2019; the Hugging Face rule: r > 1 always lowers p_j)
    temperature T        z -> z / T     (T < 1 sharpens, T > 1 flattens, T -> 0 becomes argmax)
    top-k                keep the k largest logits, set the rest to -inf
    top-p (nucleus)      keep the smallest set of tokens, taken by decreasing probability,
                         whose total probability reaches p (Holtzman et al. 2019)

Filters work on the last dimension of a tensor of any shape [..., V] and return a new tensor
(the input is never modified). Removed entries become -inf, so a softmax gives them probability 0.

`sample_next_token` chains them in the usual order (penalty, temperature, top-k, top-p) and draws
one token per row; temperature 0 means greedy decoding (argmax, no randomness). With a seeded
`torch.Generator` the draw is reproducible. Temperature, top-k and the draw are Phase 2's sampler
(`phase2_architecture/src/generation.py`, the one the GPT's `generate` uses); this module adds the
repetition penalty before it and top-p after top-k. `sampler(**knobs)` turns the knobs into the
next-token function of Phase 2's generation loop.
"""

from __future__ import annotations

from typing import Callable

import torch

from phase1_foundation.src.validation import check_number
from phase2_architecture.src.generation import apply_temperature, check_logits, top_k_filter
from phase2_architecture.src.generation import sample_next_token as sample_with_filters

__all__ = [
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "apply_repetition_penalty",
    "sample_next_token",
    "sampler",
]


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability mass reaches p.

    Sort the probabilities in decreasing order, q_1 >= q_2 >= ... and keep token i while the mass
    of the tokens before it, q_1 + ... + q_{i-1}, is still below p. The most likely token is
    always kept (its mass-before is 0), so the result is never empty; p = 1 keeps every token.
    """
    check_logits(logits)
    check_number("top_p", p, above=0, high=1)
    if p == 1:
        return logits.clone()
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)  # [..., V]
    sorted_probs = torch.softmax(sorted_logits.float(), dim=-1)  # [..., V]
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # [..., V], 0 for the first
    remove_sorted = mass_before >= p  # [..., V] True = outside the nucleus
    remove_sorted[..., 0] = False  # the most likely token stays even when p rounds to 0 in float32
    # Put the decision back in vocabulary order: remove[..., sorted_idx[j]] = remove_sorted[..., j].
    remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_repetition_penalty(
    logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Penalise tokens that already appear in previous_ids (CTRL / Hugging Face rule).

    logits [B, V], previous_ids [B, T] (token ids seen so far in each row; [T] is accepted for
    B = 1). For each seen token j of row b: z[b, j] / penalty if z[b, j] > 0, else z[b, j] * penalty.
    With penalty > 1 both cases lower the logit; penalty = 1 changes nothing; a token seen several
    times is penalised once.
    """
    check_logits(logits)
    check_number("repetition_penalty (1.0 = off)", penalty, above=0)
    if logits.dim() != 2:
        raise ValueError(
            f"logits must be [B, V] for the repetition penalty, got shape {tuple(logits.shape)}."
        )
    if not isinstance(previous_ids, torch.Tensor) or previous_ids.dtype != torch.long:
        raise TypeError("previous_ids must be a LongTensor [B, T] of token ids.")
    if previous_ids.dim() == 1:
        previous_ids = previous_ids.unsqueeze(0)  # [T] -> [1, T]
    if previous_ids.dim() != 2 or previous_ids.shape[0] != logits.shape[0]:
        raise ValueError(
            f"previous_ids must be [B, T] with B = {logits.shape[0]} (the rows of logits), "
            f"got shape {tuple(previous_ids.shape)}."
        )
    V = logits.shape[-1]
    if previous_ids.numel() and (previous_ids.min() < 0 or previous_ids.max() >= V):
        raise ValueError(f"previous_ids must be token ids in [0, {V}), got values outside that range.")
    if penalty == 1 or previous_ids.shape[1] == 0:
        return logits.clone()
    seen = logits.gather(-1, previous_ids)  # [B, T] the logits of the seen tokens
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)  # [B, T]
    return logits.scatter(-1, previous_ids, seen)  # duplicates write the same value


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    previous_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] (the last position of each row) -> next token ids, LongTensor [B].

    Order: repetition penalty on the raw logits, then temperature, top-k, top-p, softmax and one
    multinomial draw per row (using `generator`, so a seeded generator reproduces the draw).
    temperature == 0 is greedy: the argmax of the penalised logits, with no randomness.
    """
    if top_p is not None:
        check_number("top_p (or None)", top_p, above=0, high=1)
    check_number("repetition_penalty (1.0 = off)", repetition_penalty, above=0)
    if repetition_penalty != 1.0:
        if previous_ids is None:
            raise ValueError("repetition_penalty != 1 needs previous_ids (the token ids seen so far).")
        logits = apply_repetition_penalty(logits, previous_ids, repetition_penalty)
    nucleus = () if top_p is None else (lambda z: top_p_filter(z, top_p),)
    return sample_with_filters(
        logits, temperature=temperature, top_k=top_k, filters=nucleus, generator=generator
    )  # [B]


def sampler(**knobs) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The next_token_fn of Phase 2's `stream_tokens`: (logits [B, V], idx [B, T]) -> [B] by
    `sample_next_token(logits, **knobs)`, the repetition penalty seeing idx (every token so far)."""

    def next_token(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return sample_next_token(logits, previous_ids=idx, **knobs)

    return next_token
