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
`torch.Generator` the draw is reproducible.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "apply_repetition_penalty",
    "sample_next_token",
]


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or not torch.is_floating_point(logits):
        raise TypeError(
            f"logits must be a floating-point torch.Tensor [..., V], got {type(logits).__name__}."
        )
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(
            f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}."
        )


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [..., V] -> logits / temperature.

    softmax(z / T): T = 1 leaves the distribution unchanged, T < 1 sharpens it, T > 1 flattens it.
    T = 0 is the limit "always the argmax"; it cannot be written as a division, so greedy decoding
    is handled by `sample_next_token(..., temperature=0)`.
    """
    _check_logits(logits)
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}.")
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
    _check_logits(logits)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"top_k must be a positive integer (or None to disable it), got {k!r}.")
    if k >= logits.shape[-1]:
        return logits.clone()
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # [..., 1]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability mass reaches p.

    Sort the probabilities in decreasing order, q_1 >= q_2 >= ... and keep token i while the mass
    of the tokens before it, q_1 + ... + q_{i-1}, is still below p. The most likely token is
    always kept (its mass-before is 0), so the result is never empty; p = 1 keeps every token.
    """
    _check_logits(logits)
    if not _is_number(p) or not (0 < p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] (or None to disable it), got {p!r}.")
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
    _check_logits(logits)
    if not _is_number(penalty) or not math.isfinite(penalty) or penalty <= 0:
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0 = off), got {penalty!r}.")
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
    _check_logits(logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V] (one row per sequence), got shape {tuple(logits.shape)}.")
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}.")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer (or None to disable it), got {top_k!r}.")
    if top_p is not None and (not _is_number(top_p) or not (0 < top_p <= 1)):
        raise ValueError(f"top_p must be a number in (0, 1] (or None to disable it), got {top_p!r}.")

    if repetition_penalty != 1.0:
        if previous_ids is None:
            raise ValueError("repetition_penalty != 1 needs previous_ids (the token ids seen so far).")
        logits = apply_repetition_penalty(logits, previous_ids, repetition_penalty)
    elif not _is_number(repetition_penalty):
        raise ValueError(
            f"repetition_penalty must be a finite number > 0 (1.0 = off), got {repetition_penalty!r}."
        )

    if temperature == 0:
        return logits.argmax(dim=-1)  # [B] greedy

    # Subtract each row's max first (softmax does not change): the best logit becomes 0 and the others
    # negative, so even a tiny temperature (1e-40) divides into -inf at worst, never inf - inf = NaN.
    logits = apply_temperature(logits.float() - logits.float().amax(dim=-1, keepdim=True), temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits.float(), dim=-1)  # [B, V]
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # [B]
