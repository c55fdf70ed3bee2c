"""The generation loop and its sampler: what the loop feeds, when it stops, what it draws."""

import pytest
import torch
from torch import nn

from phase2_architecture.src.generation import evaluating, sample_next_token, stream_tokens

V = 11


def recording_model(fed: list):
    """logits_fn whose next token is always (last id + 1) % V, recording the length of every input."""

    def logits_fn(ids, cache):
        fed.append(ids.shape[1])
        return nn.functional.one_hot((ids + 1) % V, V).float()  # [B, T, V]

    return logits_fn


def greedy(logits, idx):
    return logits.argmax(-1)


def test_without_a_cache_every_step_feeds_the_last_block_size_tokens():
    fed = []
    idx = torch.tensor([[1, 2, 3]])
    tokens = list(stream_tokens(recording_model(fed), idx, 6, greedy, block_size=5))
    assert [int(t) for t in tokens] == [4, 5, 6, 7, 8, 9]
    assert fed == [3, 4, 5, 5, 5, 5]  # the whole sequence until it fills block_size, then the last window


def test_zero_new_tokens_runs_nothing_and_bad_arguments_are_refused():
    fed = []
    assert list(stream_tokens(recording_model(fed), torch.tensor([[1]]), 0, greedy, block_size=4)) == []
    assert fed == []
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(stream_tokens(recording_model(fed), torch.tensor([[1]]), -1, greedy, block_size=4))
    with pytest.raises(ValueError, match="block_size"):
        list(stream_tokens(recording_model(fed), torch.tensor([[1]]), 2, greedy, block_size=0))
    with pytest.raises(ValueError, match="at least one token"):
        list(
            stream_tokens(recording_model(fed), torch.zeros(1, 0, dtype=torch.long), 2, greedy, block_size=4)
        )


def test_eos_rows_repeat_it_and_the_loop_stops_when_every_row_has_it():
    fed = []
    idx = torch.tensor([[7], [2]])  # row 0 reaches 9 after 2 steps, row 1 after 7
    tokens = torch.stack(
        list(stream_tokens(recording_model(fed), idx, 20, greedy, block_size=32, eos_token_id=9))
    )
    assert tokens[:, 0].tolist() == [
        8,
        9,
        9,
        9,
        9,
        9,
        9,
    ]  # finished: EOS again (the model would say 10, 0, ...)
    assert tokens[:, 1].tolist() == [3, 4, 5, 6, 7, 8, 9]  # stops right after the last row's EOS
    assert len(fed) == 7


def test_the_sampler_seen_ids_are_the_prompt_and_every_token_so_far():
    seen = []

    def sampler(logits, idx):
        seen.append(idx[0].tolist())
        return logits.argmax(-1)

    list(stream_tokens(recording_model([]), torch.tensor([[1, 2]]), 3, sampler, block_size=3))
    assert seen == [[1, 2], [1, 2, 3], [1, 2, 3, 4]]  # all of them, not only the window


def test_greedy_is_the_argmax_and_filters_run_after_temperature_and_top_k():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0]])
    assert sample_next_token(logits, temperature=0).tolist() == [1]
    given = []

    def keep_only_token_2(z):
        given.append(z.clone())
        return torch.where(torch.arange(4) == 2, z, torch.tensor(float("-inf")))

    g = torch.Generator().manual_seed(0)
    draws = [
        int(sample_next_token(logits, temperature=0.5, top_k=2, filters=(keep_only_token_2,), generator=g))
    ]
    assert draws == [2]  # the filter decided
    scaled = (logits - 3.0) / 0.5  # max subtracted, then divided by the temperature
    expected = scaled.masked_fill(torch.tensor([[True, False, False, True]]), float("-inf"))  # top-2 kept
    assert torch.equal(given[0], expected)


def test_top_k_sampling_draws_only_the_k_most_likely():
    logits = torch.tensor([[0.0, 1.0, 0.9, 0.8, -5.0]]).expand(500, 5)
    g = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits, top_k=2, generator=g)
    assert set(draws.tolist()) == {1, 2}  # 500 draws from two tokens of near-equal probability


def test_evaluating_switches_dropout_off_and_restores_the_mode_even_after_an_error():
    model = nn.Dropout(0.5).train()
    with pytest.raises(RuntimeError):
        with evaluating(model):
            assert not model.training
            raise RuntimeError("inside")
    assert model.training
