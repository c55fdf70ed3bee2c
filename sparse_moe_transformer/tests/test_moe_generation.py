"""Generation: KV cache == recomputation, seeded sampling reproducible, EOS stop, streaming, errors."""

import pytest
import torch

from sparse_moe_transformer.src.train import SparseMoETransformer, preset_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SparseMoETransformer(preset_config("tiny", dropout=0.1))


def greedy_by_recomputation(model, ids, n):
    model.eval()
    with torch.no_grad():
        for _ in range(n):
            next_id = model(ids[:, -model.config.block_size :]).logits[:, -1].argmax(-1)  # the last window
            ids = torch.cat([ids, next_id[:, None]], 1)
    model.train()
    return ids


def test_kv_cache_greedy_equals_recomputing_the_prefix(model):
    prompt = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(1))
    with_cache = model.generate(prompt, 20, temperature=0)
    without = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert model.training  # generate ran in eval mode (dropout 0.1 off) and restored training mode
    assert with_cache.shape == (3, 25)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache, greedy_by_recomputation(model, prompt, 20))


def test_seeded_sampling_is_reproducible(model):
    prompt = torch.tensor([[1, 2, 3]])
    kw = dict(temperature=1.0, top_k=20, top_p=0.95, repetition_penalty=1.2)
    a = model.generate(prompt, 15, seed=7, **kw)
    assert torch.equal(a, model.generate(prompt, 15, seed=7, **kw))
    assert torch.equal(a, model.generate(prompt, 15, seed=7, use_cache=False, **kw))
    assert not torch.equal(a, model.generate(prompt, 15, seed=8, **kw))


def test_stream_yields_the_same_tokens_one_at_a_time(model):
    prompt = torch.tensor([[4, 5]])
    steps = list(model.stream_generate(prompt, 6, temperature=0))
    assert len(steps) == 6 and all(s.shape == (1,) for s in steps)
    assert torch.equal(
        torch.cat([prompt, torch.stack(steps, 1)], 1), model.generate(prompt, 6, temperature=0)
    )


def test_eos_stops_generation(model):
    prompt = torch.tensor([[4, 5]])
    greedy = model.generate(prompt, 10, temperature=0)
    eos = int(greedy[0, 5])  # make the 4th generated token the EOS
    first = (greedy[0, 2:] == eos).nonzero()[0].item()
    out = model.generate(prompt, 10, temperature=0, eos_token_id=eos)
    assert out.shape[1] == 2 + first + 1 and out[0, -1] == eos
    assert torch.equal(out, greedy[:, : out.shape[1]])


def test_finished_rows_keep_emitting_eos(model):
    prompt = torch.tensor([[4, 5], [9, 10]])
    greedy = model.generate(prompt, 8, temperature=0)
    eos = int(greedy[0, 3])
    out = model.generate(prompt, 8, temperature=0, eos_token_id=eos)
    row0 = out[0, 2:]
    first = (row0 == eos).nonzero()[0].item()
    assert (row0[first:] == eos).all()


def test_generation_past_block_size_slides_the_window_with_and_without_cache(model):
    prompt = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(2))
    with_cache = model.generate(prompt, 12, temperature=0)  # 30 + 12 > block_size 32
    assert with_cache.shape == (2, 42)
    assert torch.equal(with_cache, model.generate(prompt, 12, temperature=0, use_cache=False))
    assert torch.equal(with_cache, greedy_by_recomputation(model, prompt, 12))  # the last 32 tokens
    long_prompt = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(3))
    assert torch.equal(
        model.generate(long_prompt, 3, temperature=0), greedy_by_recomputation(model, long_prompt, 3)
    )


def test_generation_errors(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, eos_token_id=97)
    with pytest.raises(ValueError, match="token ids"):
        model.generate(torch.tensor([[100]]), 2)
    with pytest.raises(ValueError, match="token ids"):  # outside the last window, but still checked
        model.generate(torch.tensor([[100] + [1] * 40]), 2)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, top_p=0)
    assert torch.equal(model.generate(torch.tensor([[3]]), 0), torch.tensor([[3]]))
