"""A KV cache for the Phase 2 GPT, written from scratch.

Without a cache, generating token t+1 re-runs the model on all t tokens of the context, although
the keys and values of tokens 0..t-1 are exactly what they were one step ago (causal attention:
an earlier token never sees a later one, so nothing about it changes). Generating n tokens costs
O(n^2) token-forwards, and attention O(n^3) work in total.

The cache keeps, for every layer, the keys and values already computed:

    cache.keys[l], cache.values[l]      [B, H_kv, T_cached, Dh]   (H_kv = H without grouped-query attention)

and a cached forward pass feeds only the NEW tokens x_new [B, T_new]:

    positions       offset .. offset+T_new-1           offset = T_cached (learned absolute positions)
    per block l     q, k, v = projections of ln1(x)    each [B, H, T_new, Dh]
                    K = cat(cache.K, k), V = cat(cache.V, v)     [B, H, T_cached+T_new, Dh]
                    attention of q over K, V with the mask
                        new query i (absolute position offset+i) may attend key j  iff  j <= offset+i
                    (a causal mask shifted by `offset`: one row of all-True for a single new token,
                    the ordinary causal triangle plus a fully visible prefix for a multi-token prefill)

With grouped-query attention (GPTConfig.n_kv_head) the cache stores only the H_kv shared key/value
heads, H / H_kv times fewer bytes, and repeats them for the query heads after reading. With RoPE
(GPTConfig.pos="rope") there is no position table: keys are cached already rotated to their
absolute positions, and the new queries and keys are rotated at positions offset, offset+1, ...

Every block is run with its own modules (ln1, attn.q_proj/k_proj/v_proj, split_heads,
merge_heads, out_proj, ln2, ffn) and Phase 1's `scaled_dot_product_attention`, so the logits
equal the full forward's logits (tested to ~1e-5).

Generation is Phase 2's loop (`phase2_architecture/src/generation.py`, `stream_tokens`), the one
`GPT.generate` runs without a cache; here it gets this cache and `forward_with_cache`, so it feeds
the prompt once and then one token per step. Same tokens as `GPT.generate`, far fewer operations.

The context limit: positions are learned for 0..block_size-1, so the cache holds at most
block_size tokens; `forward_with_cache` raises a ValueError past it. The generation loop then slides
the window like the uncached `GPT.generate` does (keep the last block_size tokens), and because every
token's position changes when the window slides, it empties the cache and prefills the window again.
The output stays identical to uncached generation; beyond block_size each new token costs one
full-window forward.

    tokens = generate_with_cache(model, idx, max_new_tokens=100, temperature=0.8, top_k=20)
    for token in stream_with_cache(model, idx, 100): ...        # one [B] tensor per step

Run `python phase5_production/benchmarks/bench_kv_cache.py` to see the speed-up grow with length.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from phase1_foundation.src.attention_mechanism import scaled_dot_product_attention
from phase1_foundation.src.validation import check_int
from phase2_architecture.src.generation import evaluating, stream_tokens
from phase2_architecture.src.gpt import GPT
from phase2_architecture.src.rotary_attention import RotaryMultiHeadAttention
from phase5_production.src.sampling import sampler


class KVCache:
    """Per-layer keys and values [B, H_kv, T, Dh] of every token the model has seen so far."""

    def __init__(self, n_layer: int, block_size: int):
        self.n_layer = check_int("n_layer", n_layer, minimum=1)
        self.block_size = check_int("block_size", block_size, minimum=1)  # the most tokens it will hold
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    @classmethod
    def for_model(cls, model: GPT) -> KVCache:
        return cls(model.config.n_layer, model.config.block_size)

    @property
    def length(self) -> int:
        """Number of cached tokens (positions 0 .. length-1)."""
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new keys/values [B, H_kv, T_new, Dh] of `layer`; return all [B, H_kv, T_total, Dh]."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)  # [B, H_kv, T_cached + T_new, Dh]
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def crop(self, length: int) -> None:
        """Forget every token from position `length` on (used to roll back rejected speculative drafts)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} tokens to {length}.")
        for layer in range(self.n_layer):
            if self.keys[layer] is not None:
                if length == 0:
                    self.keys[layer] = self.values[layer] = None
                else:
                    self.keys[layer] = self.keys[layer][:, :, :length]
                    self.values[layer] = self.values[layer][:, :, :length]

    def reset(self) -> None:
        self.crop(0)


def shifted_causal_mask(t_new: int, offset: int, device=None) -> torch.Tensor:
    """[T_new, offset + T_new] bool: new query i (position offset+i) may attend key j iff j <= offset+i."""
    query_pos = torch.arange(offset, offset + t_new, device=device)[:, None]  # [T_new, 1]
    key_pos = torch.arange(offset + t_new, device=device)[None, :]  # [1, T_total]
    return key_pos <= query_pos  # [T_new, T_total]


def cached_self_attention(
    attn: nn.Module, x: torch.Tensor, cache: KVCache, layer: int, offset: int
) -> torch.Tensor:
    """Phase 1 MultiHeadAttention on new tokens x [B, T_new, C] at positions offset.., attending to
    the `offset` cached keys of `layer` plus the new ones."""
    q = attn.split_heads(attn.q_proj(x))  # [B, H, T_new, Dh]
    k = attn.split_kv_heads(attn.k_proj(x))  # [B, H_kv, T_new, Dh]
    v = attn.split_kv_heads(attn.v_proj(x))  # [B, H_kv, T_new, Dh]
    if isinstance(attn, RotaryMultiHeadAttention):  # RoPE: rotate by the absolute positions offset..
        q, k = attn.rope(q, offset), attn.rope(k, offset)
    k_all, v_all = cache.append(layer, k, v)  # [B, H_kv, offset + T_new, Dh] (only H_kv heads stored)
    k_all, v_all = attn.repeat_kv(k_all), attn.repeat_kv(v_all)  # [B, H, offset + T_new, Dh]
    mask = shifted_causal_mask(x.shape[1], offset, device=x.device)  # [T_new, offset + T_new]
    out, _ = scaled_dot_product_attention(q, k_all, v_all, mask)  # [B, H, T_new, Dh]
    return attn.out_proj(attn.merge_heads(out))  # [B, T_new, C]


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, GPT):
        raise TypeError(f"the KV cache is written for the Phase 2 GPT, got {type(model).__name__}.")
    if model.training:
        raise ValueError(
            "call model.eval() before a cached forward: dropout would make cached and full passes differ."
        )
    for block in model.blocks:
        if not (block.norm_first and block.causal):
            raise ValueError("the KV cache needs pre-norm causal blocks (the GPT's default).")


@torch.no_grad()
def forward_with_cache(model: GPT, idx_new: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed new tokens idx_new [B, T_new] after the cached ones; return their logits [B, T_new, V]."""
    _check_model(model)
    model._check_idx(idx_new, check_length=False)
    t_new, offset = idx_new.shape[1], cache.length
    if offset + t_new > model.config.block_size:
        raise ValueError(
            f"the cache holds {offset} tokens and {t_new} more would exceed block_size "
            f"{model.config.block_size}; crop the context and rebuild the cache (the generation loop does)."
        )
    if cache.keys[0] is not None and cache.keys[0].shape[0] != idx_new.shape[0]:
        raise ValueError(
            f"batch size {idx_new.shape[0]} differs from the cached batch {cache.keys[0].shape[0]}."
        )
    x = model.tok_emb(idx_new)  # [B, T_new, C]
    if model.pos_emb is not None:  # learned positions offset .. offset+T_new-1 (RoPE: inside attention)
        x = x + model.pos_emb.positions(t_new, offset=offset)  # [T_new, C]
    x = model.drop(x)  # [B, T_new, C]
    for layer, block in enumerate(model.blocks):
        x = x + cached_self_attention(block.attn, block.ln1(x), cache, layer, offset)  # pre-norm residual
        x = x + block.ffn(block.ln2(x))
    return model.lm_head(model.ln_f(x))  # [B, T_new, V]


def stream_with_cache(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
    **sampling,
) -> Iterator[torch.Tensor]:
    """Yield up to max_new_tokens next tokens, each a LongTensor [B], using a KV cache.

    The loop is Phase 2's `stream_tokens` (the one GPT.generate runs without a cache): the prompt is
    prefilled into a fresh KVCache and every step feeds one token. Sampling is `sample_next_token`
    with the keyword arguments temperature, top_k, top_p, repetition_penalty, generator (the penalty
    sees the prompt and everything generated so far). Past block_size the window slides, as in
    GPT.generate. The model is in eval mode while the generator runs and its previous mode is
    restored when it finishes (or is closed).
    """
    model._check_idx(idx, check_length=False)  # longer prompts: the loop keeps the last window

    def logits_fn(ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return forward_with_cache(model, ids, cache)  # [B, T_new, V]

    with evaluating(model):
        yield from stream_tokens(
            logits_fn,
            idx,
            max_new_tokens,
            sampler(**sampling),
            block_size=model.config.block_size,
            cache=KVCache.for_model(model),
            eos_token_id=eos_token_id,
        )


def generate_with_cache(model: GPT, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """idx [B, T] -> [B, T + n], n <= max_new_tokens; the contract of GPT.generate, with a KV cache.

    Keyword arguments: temperature, top_k, top_p, repetition_penalty, generator, eos_token_id.
    """
    new_tokens = [token[:, None] for token in stream_with_cache(model, idx, max_new_tokens, **kwargs)]
    return torch.cat([idx, *new_tokens], dim=1)
