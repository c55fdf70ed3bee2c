"""Perplexity against a hand computation on a model whose probabilities we know exactly."""

import math

import pytest
import torch
from torch import nn

from phase5_production.src.evaluation import (
    perplexity,
    perplexity_from_batches,
    stream_to_windows,
    total_nll,
)


class BigramTable(nn.Module):
    """logits for the next token = a fixed row of a table, chosen by the current token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, idx, targets=None):
        return self.table[idx], None  # [B, T, V]


def _hand_nll(table: torch.Tensor, stream: list[int]) -> float:
    """Mean of -log softmax(table[a])[b] over consecutive pairs (a, b), with Python floats."""
    total = 0.0
    for a, b in zip(stream[:-1], stream[1:]):
        row = table[a].tolist()
        log_z = math.log(sum(math.exp(z) for z in row))
        total += log_z - row[b]
    return total / (len(stream) - 1)


def test_perplexity_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(5, 5, generator=g, dtype=torch.float64)
    model = BigramTable(table)
    stream = torch.randint(
        0, 5, (103,), generator=g
    ).tolist()  # 102 predictions, windows of 10 (last partial)
    result = perplexity(model, stream, block_size=10, batch_size=4)
    nll = _hand_nll(table, stream)
    assert result["tokens"] == 102
    assert result["nll"] == pytest.approx(nll, rel=1e-9)
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-9)


def test_uniform_model_has_perplexity_vocab_size():
    model = BigramTable(torch.zeros(7, 7))
    assert perplexity(model, list(range(7)) * 5, block_size=8)["perplexity"] == pytest.approx(7.0, rel=1e-6)


def test_every_token_after_the_first_is_scored_exactly_once():
    stream = list(range(1, 24))  # 23 tokens
    batches = stream_to_windows(stream, block_size=5, batch_size=2)
    scored = torch.cat([y[y != -100] for _, y in batches]).tolist()
    assert scored == stream[1:]
    for x, y in batches:  # y is x shifted by one inside each window
        keep = y != -100
        assert torch.equal(x[:, 1:][keep[:, :-1] & keep[:, 1:]], y[:, :-1][keep[:, :-1] & keep[:, 1:]])


def test_ignored_targets_are_left_out_of_the_mean():
    table = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    model = BigramTable(table)
    x = torch.tensor([[0, 1, 2, 3]])
    y = torch.tensor([[1, -100, 3, -100]])
    nll_sum, count = total_nll(model, x, y)
    expected = -(torch.log_softmax(table[0], -1)[1] + torch.log_softmax(table[2], -1)[3]).item()
    assert count == 2
    assert nll_sum == pytest.approx(expected, rel=1e-5)
    assert perplexity_from_batches(model, [(x, y)])["nll"] == pytest.approx(expected / 2, rel=1e-5)


def test_bad_inputs_are_rejected():
    model = BigramTable(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, [1], block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        perplexity(model, [1, 2, 0], block_size=0)
    with pytest.raises(ValueError, match="pass block_size"):
        perplexity(model, [1, 2, 0])
    with pytest.raises(ValueError, match="no scored tokens"):
        perplexity_from_batches(model, [(torch.zeros(1, 2, dtype=torch.long), torch.full((1, 2), -100))])
    with pytest.raises(ValueError, match="same shape"):
        total_nll(model, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
