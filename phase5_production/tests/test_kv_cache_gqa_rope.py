"""KV cache with grouped-query attention and RoPE: cached logits and generation equal the full model,
and the cache of a GQA model is n_head / n_kv_head times smaller (measured in bytes)."""

import pytest
import torch

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase5_production.src.kv_cache import KVCache, forward_with_cache, generate_with_cache

VARIANTS = [
    dict(pos="learned", n_kv_head=None),
    dict(pos="rope", n_kv_head=None),
    dict(pos="learned", n_kv_head=2),
    dict(pos="rope", n_kv_head=2),
    dict(pos="rope", n_kv_head=1, norm="rmsnorm", ffn="swiglu", bias=False),
]


def _gpt(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=4, d_model=32, **overrides))
    with torch.no_grad():  # peaked distributions: no near-ties in greedy decoding
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(10.0)
    return model.eval()


def _tokens(B, T, seed=1):
    return torch.randint(0, 23, (B, T), generator=torch.Generator().manual_seed(seed))


def cache_bytes(cache: KVCache) -> int:
    return sum(t.numel() * t.element_size() for t in cache.keys + cache.values if t is not None)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_incremental_cached_logits_equal_the_full_forward(overrides):
    model = _gpt(**overrides)
    idx = _tokens(2, 16)
    full, _ = model(idx)
    cache = KVCache.for_model(model)
    pieces, start = [], 0
    for size in [5, 1, 3] + [1] * 7:
        pieces.append(forward_with_cache(model, idx[:, start : start + size], cache))
        start += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_greedy_cached_generation_equals_uncached_past_block_size(overrides):
    model = _gpt(**overrides)
    idx = _tokens(2, 5, seed=3)
    cached = generate_with_cache(model, idx, 20, temperature=0)
    assert torch.equal(cached, model.generate(idx, 20, temperature=0))


def test_gqa_cache_stores_n_kv_head_heads_and_saves_bytes_in_proportion():
    sizes = {}
    for n_kv_head in (4, 2, 1):  # MHA, GQA with groups of 2, MQA
        model = _gpt(n_kv_head=n_kv_head)
        cache = KVCache.for_model(model)
        forward_with_cache(model, _tokens(3, 16), cache)
        assert cache.keys[0].shape == (3, n_kv_head, 16, 8)  # [B, H_kv, T, Dh]
        sizes[n_kv_head] = cache_bytes(cache)
    # 2 (k and v) * n_layer 2 * B 3 * H_kv * T 16 * Dh 8 * 4 bytes
    assert sizes[4] == 2 * 2 * 3 * 4 * 16 * 8 * 4
    assert sizes[4] == 2 * sizes[2] == 4 * sizes[1]


def test_rope_cache_holds_keys_rotated_to_their_absolute_positions():
    """Block 0 sees the same input for the same token; its cached key at position 1 is the key at
    position 0 (rotation by angle 0 = unrotated) rotated by one position step."""
    model = _gpt(pos="rope")
    cache = KVCache.for_model(model)
    forward_with_cache(model, torch.tensor([[7, 9]]), cache)  # position 0 holds token 7
    forward_with_cache(model, torch.tensor([[7]]), cache)  # position 2 holds token 7 again
    k = cache.keys[0][0]  # [H, 3, Dh]
    rope = model.blocks[0].attn.rope
    torch.testing.assert_close(k[:, 2:3], rope(k[:, 0:1], offset=2), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(k[:, 2], k[:, 0])
