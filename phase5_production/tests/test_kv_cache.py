"""KV cache: cached logits equal the full forward, cached generation equals uncached generation."""

import pytest
import torch

from phase1_foundation.src.attention_mechanism import causal_mask
from phase2_architecture.src.generation import stream_tokens
from phase2_architecture.src.gpt import GPT, GPTConfig
from phase5_production.src.kv_cache import (
    KVCache,
    forward_with_cache,
    generate_with_cache,
    shifted_causal_mask,
    stream_with_cache,
)

CONFIGS = [
    dict(norm="layernorm", ffn="gelu"),
    dict(norm="rmsnorm", ffn="swiglu", bias=False, tie_weights=True),
]


def _gpt(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = dict(vocab_size=23, block_size=16, n_layer=2, n_head=4, d_model=32)
    config.update(overrides)
    model = GPT(GPTConfig(**config))
    with torch.no_grad():  # larger weights than GPT-2's init: peaked distributions, no near-ties in argmax
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(10.0)
    return model.eval()


def _tokens(B, T, V=23, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_shifted_causal_mask_is_the_bottom_rows_of_the_causal_mask():
    for t_new, offset in [(1, 0), (5, 0), (1, 7), (3, 4)]:
        full = causal_mask(offset + t_new)  # [T, T]
        assert torch.equal(shifted_causal_mask(t_new, offset), full[offset:])


@pytest.mark.parametrize("overrides", CONFIGS)
def test_prefill_logits_equal_full_forward(overrides):
    model = _gpt(**overrides)
    idx = _tokens(3, 16)  # a full block, several sequences
    full, _ = model(idx)
    cached = forward_with_cache(model, idx, KVCache.for_model(model))
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", CONFIGS)
def test_incremental_steps_equal_full_forward(overrides):
    """Prefill 5 tokens, then 1, then a chunk of 3, then 1 at a time: each matches the full pass."""
    model = _gpt(**overrides)
    idx = _tokens(2, 16)
    full, _ = model(idx)  # [B, 16, V]
    cache = KVCache.for_model(model)
    pieces, start = [], 0
    for size in [5, 1, 3] + [1] * 7:
        pieces.append(forward_with_cache(model, idx[:, start : start + size], cache))
        start += size
        assert cache.length == start
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.keys[0].shape == (2, 4, 16, 8)  # [B, H, T, Dh]


def test_cached_forward_is_causal():
    model = _gpt()
    idx = _tokens(1, 10)
    changed = idx.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 23  # change only positions 6..9
    a = forward_with_cache(model, idx, KVCache.for_model(model))
    b = forward_with_cache(model, changed, KVCache.for_model(model))
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_crop_rolls_the_cache_back():
    model = _gpt()
    idx = _tokens(1, 12)
    cache = KVCache.for_model(model)
    forward_with_cache(model, idx[:, :8], cache)
    cache.crop(5)
    assert cache.length == 5
    again = forward_with_cache(model, idx[:, 5:12], cache)
    full, _ = model(idx)
    torch.testing.assert_close(again, full[:, 5:12], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="crop"):
        cache.crop(20)


@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("prompt_len,new_tokens", [(1, 10), (4, 12), (6, 30)])
def test_greedy_generation_matches_uncached(overrides, prompt_len, new_tokens):
    """(4, 12) ends exactly at block_size 16; (6, 30) runs past it: the window slides as in GPT.generate."""
    model = _gpt(**overrides)
    idx = _tokens(2, prompt_len, seed=prompt_len)
    expected = model.generate(idx, new_tokens, temperature=0)
    got = generate_with_cache(model, idx, new_tokens, temperature=0)
    assert got.shape == (2, prompt_len + new_tokens)
    assert torch.equal(got, expected)


def test_long_prompt_is_cropped_like_uncached_generate():
    model = _gpt()
    idx = _tokens(1, 40)  # longer than block_size 16
    assert torch.equal(
        generate_with_cache(model, idx, 5, temperature=0), model.generate(idx, 5, temperature=0)
    )


def test_eos_stops_cached_generation_as_it_stops_uncached_generation():
    model = _gpt()
    idx = _tokens(2, 3, seed=2)
    greedy = generate_with_cache(model, idx, 12, temperature=0)
    eos = int(greedy[0, 6])  # row 0 reaches it by its 4th new token
    cached = generate_with_cache(model, idx, 12, temperature=0, eos_token_id=eos)
    assert torch.equal(cached, model.generate(idx, 12, temperature=0, eos_token_id=eos))
    first = int((cached[0, 3:] == eos).nonzero()[0])
    assert torch.equal(cached[0, : 3 + first + 1], greedy[0, : 3 + first + 1])
    assert (cached[0, 3 + first :] == eos).all()  # a finished row repeats EOS while others go on
    alone = generate_with_cache(model, idx[:1], 12, temperature=0, eos_token_id=eos)
    assert alone.shape == (1, 3 + first + 1)  # one row: generation stops right after its EOS


def test_a_cached_step_feeds_one_token_until_the_window_is_full_then_re_prefills_it():
    model = _gpt()
    fed = []

    def logits_fn(ids, cache):
        fed.append((ids.shape[1], cache.length))
        return forward_with_cache(model, ids, cache)

    cache = KVCache.for_model(model)
    steps = stream_tokens(logits_fn, _tokens(2, 12), 8, lambda z, _: z.argmax(-1), block_size=16, cache=cache)
    assert len(list(steps)) == 8
    # prefill 12, one token per step up to 16 cached, then the window (16 tokens) into an emptied cache
    assert fed == [(12, 0), (1, 12), (1, 13), (1, 14), (1, 15), (16, 0), (16, 0), (16, 0)]


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = _gpt()
    idx = _tokens(2, 3)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = generate_with_cache(model, idx, 12, temperature=1.0, top_p=0.9, generator=g1)
    b = generate_with_cache(model, idx, 12, temperature=1.0, top_p=0.9, generator=g2)
    assert torch.equal(a, b)
    top1 = generate_with_cache(model, idx, 12, temperature=0.7, top_k=1)
    assert torch.equal(top1, generate_with_cache(model, idx, 12, temperature=0))


def test_stream_yields_one_token_per_step_and_restores_train_mode():
    model = _gpt()
    model.train()
    steps = list(stream_with_cache(model, _tokens(2, 2), 4, temperature=0))
    assert len(steps) == 4 and all(t.shape == (2,) and t.dtype == torch.long for t in steps)
    assert model.training
    assert generate_with_cache(model, _tokens(1, 2), 0).shape == (1, 2)


def test_bad_inputs_raise_clear_errors():
    model = _gpt()
    cache = KVCache.for_model(model)
    forward_with_cache(model, _tokens(1, 10), cache)
    with pytest.raises(ValueError, match="exceed block_size"):
        forward_with_cache(model, _tokens(1, 7), cache)
    with pytest.raises(ValueError, match="batch size"):
        forward_with_cache(model, _tokens(2, 1), cache)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        forward_with_cache(model, _tokens(1, 2), KVCache.for_model(model))
    model.eval()
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_with_cache(model, _tokens(1, 2), -1)
    with pytest.raises(ValueError, match="token ids"):
        generate_with_cache(model, torch.tensor([[99]]), 2)
    with pytest.raises(TypeError, match="Phase 2 GPT"):
        forward_with_cache(torch.nn.Linear(2, 2), _tokens(1, 2), cache)
