"""Speculative decoding: a small draft model guesses, the large target model checks in one pass.

Generating with a large model is slow because every token needs one full forward pass, and on
small batches that pass is dominated by reading the weights, not by the arithmetic: scoring
k+1 tokens at once costs barely more than scoring one. Speculative decoding (Leviathan et al.
2023; Chen et al. 2023) exploits this:

    1. the cheap DRAFT model proposes k tokens d_1..d_k autoregressively (k cheap passes)
    2. the TARGET model scores [last token, d_1..d_k] in ONE pass -> its distributions p_1..p_{k+1}
    3. accept the longest prefix of drafts the target agrees with, then emit one token of its own:
       greedy    accept d_i while d_i == argmax p_i; then emit argmax p_{n+1}
       sampling  accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection
                 emit a sample of norm(max(0, p_i - q_i)); if all k are accepted emit a sample of p_{k+1}

Every round emits between 1 and k+1 tokens for one target pass. The rule in step 3 makes the
output distribution exactly the target's (greedy: exactly the target's greedy text; sampling:
exactly distributed as sampling from the target) — the draft only changes the speed.

Both models keep a KV cache (`kv_cache.py`); rejected drafts are rolled back with `KVCache.crop`.
Batch size is 1 (different rows would accept different numbers of drafts).

    tokens, stats = speculative_generate(target, draft, idx, max_new_tokens=100, num_draft=4)
    stats.acceptance_rate, stats.tokens_per_target_call
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from phase1_foundation.src.validation import check_int
from phase2_architecture.src.gpt import GPT
from phase5_production.src.kv_cache import KVCache, forward_with_cache
from phase5_production.src.sampling import apply_temperature, top_k_filter, top_p_filter


@dataclass
class SpeculativeStats:
    """Counters of one speculative_generate call."""

    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the target accepted
    target_calls: int = 0  # target forward passes (prefill included)
    draft_calls: int = 0  # draft forward passes
    new_tokens: int = 0  # tokens emitted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        return self.new_tokens / self.target_calls if self.target_calls else 0.0


def sampling_probs(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """logits [..., V] -> the probabilities the sampler draws from (temperature, then top-k, then top-p)."""
    logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return F.softmax(logits, dim=-1)


def accept_or_resample(
    p: torch.Tensor, q: torch.Tensor, draft_token: int, generator: torch.Generator | None = None
) -> tuple[bool, int]:
    """The speculative sampling rule for one draft token x ~ q, with target distribution p (both [V]).

    Accept x with probability min(1, p[x] / q[x]); otherwise return a sample of the residual
    norm(max(0, p - q)). Then P(output = y) = p[y] for every y:
        q[y] min(1, p[y]/q[y]) = min(q[y], p[y])            (drafted y and accepted)
      + (1 - sum_z min(q[z], p[z])) * max(0, p[y]-q[y]) / sum_z max(0, p[z]-q[z])   (rejected, resampled)
    and the two sums are equal, so the second term is max(0, p[y] - q[y]); min + max(0, .) = p[y].
    Returns (accepted, token).
    """
    ratio = (p[draft_token] / q[draft_token]).item()  # q[x] > 0 because x was drawn from q
    u = torch.rand((), generator=generator).item()
    if u < min(1.0, ratio):
        return True, draft_token
    residual = torch.clamp(p - q, min=0.0)  # [V]
    if residual.sum() <= 0:  # only when p == q numerically; then the draft is always accepted anyway
        residual = p
    token = torch.multinomial(residual / residual.sum(), 1, generator=generator).item()
    return False, token


def _check_args(target: GPT, draft: GPT, idx: torch.Tensor, max_new_tokens: int, num_draft: int) -> None:
    if not isinstance(target, GPT) or not isinstance(draft, GPT):
        raise TypeError("target and draft must both be Phase 2 GPT models.")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(
            f"target and draft must share a vocabulary, got vocab_size {target.config.vocab_size} "
            f"and {draft.config.vocab_size}; train the draft with the target's tokenizer."
        )
    check_int("num_draft", num_draft, minimum=1)
    check_int("max_new_tokens", max_new_tokens, minimum=0)
    target._check_idx(idx, check_length=False)
    if idx.shape[0] != 1:
        raise ValueError(
            f"speculative decoding here runs one sequence at a time (batch 1), got batch {idx.shape[0]}."
        )
    limit = min(target.config.block_size, draft.config.block_size)
    if idx.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the context of "
            f"{limit} tokens; shorten the prompt or generate fewer tokens."
        )


def _draft_tokens(
    draft: GPT,
    seq: torch.Tensor,
    draft_cache: KVCache,
    k: int,
    stats: SpeculativeStats,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> tuple[list[int], list[torch.Tensor]]:
    """Step 1: the draft proposes k tokens, fed first whatever of seq [1, T] it has not seen yet.

    Returns the k tokens and, when sampling, the distribution q_i [V] each was drawn from (empty when greedy).
    """
    greedy = temperature == 0
    draft_logits = forward_with_cache(draft, seq[:, draft_cache.length :], draft_cache)[0, -1]  # [V]
    stats.draft_calls += 1
    drafts, draft_probs = [], []
    for i in range(k):
        if greedy:
            token = int(draft_logits.argmax())
        else:
            q = sampling_probs(draft_logits, temperature, top_k, top_p)  # [V]
            token = int(torch.multinomial(q, 1, generator=generator))
            draft_probs.append(q)
        drafts.append(token)
        if i < k - 1:
            step = torch.tensor([[token]], device=seq.device)  # [1, 1]
            draft_logits = forward_with_cache(draft, step, draft_cache)[0, -1]  # [V]
            stats.draft_calls += 1
    return drafts, draft_probs


def _score_drafts(
    target: GPT, seq: torch.Tensor, target_cache: KVCache, drafts: list[int], stats: SpeculativeStats
) -> torch.Tensor:
    """Step 2: one target pass over the unseen part of seq [1, T] + the k drafts.

    Returns the logits of p_1..p_{k+1}, [k+1, V].
    """
    unseen = seq[:, target_cache.length :]  # [1, >=1] tokens the target has not processed
    verify_in = torch.cat([unseen, torch.tensor([drafts], device=seq.device)], dim=1)  # [1, unseen + k]
    target_logits = forward_with_cache(target, verify_in, target_cache)[0, -(len(drafts) + 1) :]  # [k+1, V]
    stats.target_calls += 1
    return target_logits


def _accept_drafts(
    target_logits: torch.Tensor,
    drafts: list[int],
    draft_probs: list[torch.Tensor],
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Step 3: accept a prefix of the drafts, then one token from the target (logits [k+1, V]).

    Returns (number of drafts accepted, the token the target emits after them).
    """
    greedy = temperature == 0
    for i, token in enumerate(drafts):
        if greedy:
            choice = int(target_logits[i].argmax())
            if choice != token:
                return i, choice
        else:
            p = sampling_probs(target_logits[i], temperature, top_k, top_p)  # [V]
            ok, choice = accept_or_resample(p, draft_probs[i], token, generator)
            if not ok:
                return i, choice
    k = len(drafts)  # every draft accepted: the bonus token comes from p_{k+1}
    if greedy:
        return k, int(target_logits[k].argmax())
    p = sampling_probs(target_logits[k], temperature, top_k, top_p)  # [V]
    return k, int(torch.multinomial(p, 1, generator=generator))


@torch.no_grad()
def speculative_generate(
    target: GPT,
    draft: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    num_draft: int = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """idx [1, T] -> ([1, T + max_new_tokens], stats). temperature 0 = greedy (the target's exact output)."""
    _check_args(target, draft, idx, max_new_tokens, num_draft)
    sampler = (temperature, top_k, top_p, generator)
    modes = (target.training, draft.training)
    target.eval()
    draft.eval()
    stats = SpeculativeStats()
    target_cache, draft_cache = KVCache.for_model(target), KVCache.for_model(draft)
    seq = idx  # [1, T]; invariant: both caches hold a prefix of seq that excludes at least its last token
    end = idx.shape[1] + max_new_tokens
    try:
        while seq.shape[1] < end:
            k = min(num_draft, end - seq.shape[1])
            seen = seq.shape[1]
            drafts, draft_probs = _draft_tokens(draft, seq, draft_cache, k, stats, *sampler)  # 1
            target_logits = _score_drafts(target, seq, target_cache, drafts, stats)  # 2: [k+1, V]
            accepted, next_token = _accept_drafts(target_logits, drafts, draft_probs, *sampler)  # 3
            stats.proposed += k
            stats.accepted += accepted
            new = torch.tensor([drafts[:accepted] + [next_token]], device=seq.device)  # [1, accepted + 1]
            seq = torch.cat([seq, new], dim=1)
            # 4. roll the caches back to the confirmed tokens (seq before this round + accepted drafts)
            target_cache.crop(seen + accepted)
            draft_cache.crop(min(draft_cache.length, seen + accepted))
    finally:
        target.train(modes[0])
        draft.train(modes[1])
    seq = seq[:, :end]  # the last round may emit one token more than asked
    stats.new_tokens = seq.shape[1] - idx.shape[1]
    return seq, stats
