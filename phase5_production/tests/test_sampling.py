"""Tests for phase5_production.src.sampling on hand-made distributions."""

import math

import pytest
import torch

from phase5_production.src.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)

NEG_INF = float("-inf")


def logits_of(probs):
    """Logits whose softmax is exactly `probs` (up to float rounding)."""
    return torch.tensor(probs, dtype=torch.float64).log()


# ---------------------------------------------------------------- temperature


def test_temperature_divides_logits_and_sharpens_or_flattens():
    z = torch.tensor([[2.0, 1.0, 0.0]])
    assert torch.equal(apply_temperature(z, 0.5), z * 2)
    p1 = torch.softmax(z, -1)
    p_cold = torch.softmax(apply_temperature(z, 0.5), -1)
    p_hot = torch.softmax(apply_temperature(z, 2.0), -1)
    assert p_cold[0, 0] > p1[0, 0] > p_hot[0, 0]  # T < 1 sharpens, T > 1 flattens


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "1", True])
def test_temperature_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(torch.zeros(1, 3), bad)


def test_temperature_zero_points_to_greedy():
    with pytest.raises(ValueError, match="greedy"):
        apply_temperature(torch.zeros(1, 3), 0)


def test_temperature_zero_is_argmax():
    z = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next_token(z, temperature=0), z.argmax(-1))


def test_low_temperature_approaches_greedy():
    z = torch.tensor([[1.0, 1.5, 0.2, 1.4]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next_token(z, temperature=0.01, generator=g) for _ in range(50)])
    assert (draws == 1).all()


# ---------------------------------------------------------------------- top-k


def test_top_k_keeps_exactly_the_k_largest():
    z = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = top_k_filter(z, 2)
    expected = torch.tensor([[NEG_INF, 3.0, NEG_INF, 2.0, NEG_INF], [5.0, 4.0, NEG_INF, NEG_INF, NEG_INF]])
    assert torch.equal(out, expected)
    assert torch.equal(z[0], torch.tensor([0.1, 3.0, -1.0, 2.0, 0.5]))  # input untouched


def test_top_k_of_one_dimensional_logits_and_k_at_least_vocab():
    z = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(top_k_filter(z, 1), torch.tensor([NEG_INF, NEG_INF, 3.0]))
    assert torch.equal(top_k_filter(z, 3), z)
    assert torch.equal(top_k_filter(z, 10), z)


def test_top_k_sampling_only_draws_the_top_k():
    z = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    allowed = torch.topk(z, 3, dim=-1).indices  # [4, 3]
    g = torch.Generator().manual_seed(2)
    for _ in range(100):
        tok = sample_next_token(z, top_k=3, generator=g)
        assert (allowed == tok[:, None]).any(-1).all()


@pytest.mark.parametrize("bad", [0, -2, 1.5, None, True])
def test_top_k_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(torch.zeros(1, 3), bad)


# ---------------------------------------------------------------------- top-p


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.25, 0.15, 0.1 (vocabulary order shuffled)
    z = logits_of([0.15, 0.5, 0.1, 0.25])
    # p = 0.5: the top token alone reaches 0.5
    assert torch.isfinite(top_p_filter(z, 0.5)).tolist() == [False, True, False, False]
    # p = 0.6: 0.5 < 0.6, so add 0.25 -> 0.75 >= 0.6
    assert torch.isfinite(top_p_filter(z, 0.6)).tolist() == [False, True, False, True]
    # p = 0.8: 0.75 < 0.8, add 0.15 -> 0.9
    assert torch.isfinite(top_p_filter(z, 0.8)).tolist() == [True, True, False, True]
    # p = 0.95: needs everything
    assert torch.isfinite(top_p_filter(z, 0.95)).all()
    # tiny p still keeps the most likely token
    assert torch.isfinite(top_p_filter(z, 1e-6)).tolist() == [False, True, False, False]
    # kept logits are unchanged
    kept = top_p_filter(z, 0.6)
    assert kept[1] == z[1] and kept[3] == z[3]


def test_top_p_is_per_row_and_matches_a_python_reference():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 30, generator=g) * 2
    p = 0.7
    out = top_p_filter(z, p)
    for row, out_row in zip(z, out):
        probs = torch.softmax(row, -1).tolist()
        order = sorted(range(len(probs)), key=lambda i: -probs[i])
        keep, mass = set(), 0.0
        for i in order:  # the smallest prefix whose mass reaches p
            keep.add(i)
            mass += probs[i]
            if mass >= p:
                break
        assert {i for i in range(len(probs)) if math.isfinite(out_row[i])} == keep


def test_top_p_one_keeps_everything():
    z = torch.randn(3, 20)
    assert torch.equal(top_p_filter(z, 1.0), z)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.01, float("nan"), "0.9"])
def test_top_p_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(torch.zeros(1, 3), bad)


# -------------------------------------------------------- repetition penalty


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    z = torch.tensor([[2.0, -1.0, 0.5, -3.0], [1.0, 1.0, 1.0, 1.0]])
    prev = torch.tensor([[0, 1, 1], [3, 3, 3]])  # repeats are penalised once
    out = apply_repetition_penalty(z, prev, 2.0)
    expected = torch.tensor([[1.0, -2.0, 0.5, -3.0], [1.0, 1.0, 1.0, 0.5]])
    assert torch.equal(out, expected)
    assert torch.equal(apply_repetition_penalty(z, prev, 1.0), z)


def test_repetition_penalty_matches_hugging_face():
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(4)
    z = torch.randn(3, 40, generator=g)
    prev = torch.randint(0, 40, (3, 12), generator=g)
    hf = transformers.RepetitionPenaltyLogitsProcessor(1.3)(prev, z.clone())
    torch.testing.assert_close(apply_repetition_penalty(z, prev, 1.3), hf)


def test_repetition_penalty_lowers_the_probability_of_seen_tokens():
    z = torch.tensor([[1.0, 0.9, -0.2]])
    out = sample_next_token(z, temperature=0, repetition_penalty=2.0, previous_ids=torch.tensor([[0]]))
    assert out.item() == 1  # token 0 was the argmax before the penalty


def test_repetition_penalty_errors():
    z = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="repetition_penalty"):
        apply_repetition_penalty(z, torch.zeros(2, 1, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="in \\[0, 5\\)"):
        apply_repetition_penalty(z, torch.tensor([[1], [5]]), 1.2)
    with pytest.raises(ValueError, match="B = 2"):
        apply_repetition_penalty(z, torch.zeros(3, 1, dtype=torch.long), 1.2)
    with pytest.raises(TypeError, match="LongTensor"):
        apply_repetition_penalty(z, torch.zeros(2, 1), 1.2)
    with pytest.raises(ValueError, match="previous_ids"):
        sample_next_token(z, repetition_penalty=1.2)


# ------------------------------------------------------------------ sampling


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    z = torch.randn(8, 100, generator=torch.Generator().manual_seed(5))

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([sample_next_token(z, top_k=50, top_p=0.9, generator=g) for _ in range(5)])

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


def test_sampling_frequencies_match_the_filtered_distribution():
    # probabilities 0.5, 0.3, 0.15, 0.05; top_p = 0.7 keeps {0, 1} -> renormalised 0.625 / 0.375
    z = logits_of([[0.5, 0.3, 0.15, 0.05]]).float()
    g = torch.Generator().manual_seed(6)
    draws = torch.stack([sample_next_token(z.expand(2000, 4), top_p=0.7, generator=g) for _ in range(2)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / draws.numel()
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0].item() - 0.625) < 0.03  # 4000 draws: std ~ 0.008


def test_sample_next_token_shape_and_argument_errors():
    z = torch.randn(3, 7)
    out = sample_next_token(z, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3,) and out.dtype == torch.long
    with pytest.raises(ValueError, match="\\[B, V\\]"):
        sample_next_token(torch.randn(7))
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(z, temperature=-0.5)
    with pytest.raises(ValueError, match="top_k"):
        sample_next_token(z, temperature=0, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        sample_next_token(z, top_p=2.0)
    with pytest.raises(TypeError, match="floating-point"):
        sample_next_token(torch.zeros(2, 3, dtype=torch.long))


def test_a_tiny_temperature_is_the_argmax_not_nan():
    # logits / 1e-40 overflows to +-inf; inf - inf would be NaN inside the softmax without the max shift
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0)) * 5
    token = sample_next_token(logits, temperature=1e-40, generator=torch.Generator().manual_seed(1))
    assert torch.equal(token, logits.argmax(-1))


def test_a_top_p_below_float32s_smallest_value_keeps_the_most_likely_token():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    kept = top_p_filter(logits, 1e-320)  # rounds to 0.0 in float32
    assert torch.equal(torch.isfinite(kept).sum(-1), torch.ones(3, dtype=torch.long))
    assert torch.equal(kept.argmax(-1), logits.argmax(-1))
