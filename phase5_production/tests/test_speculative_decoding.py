"""Speculative decoding: greedy output equals the target's; sampling follows the target's distribution."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase5_production.src.kv_cache import generate_with_cache
from phase5_production.src.speculative_decoding import accept_or_resample, speculative_generate

V = 11


def _gpt(seed, d_model, n_layer, vocab_size=V, block_size=48, scale=8.0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(
        GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=2, d_model=d_model)
    )
    with torch.no_grad():  # peaked distributions: random models then disagree often but not always
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    return model.eval()


@pytest.fixture(scope="module")
def target():
    return _gpt(0, d_model=32, n_layer=2)


@pytest.fixture(scope="module")
def draft():
    return _gpt(1, d_model=16, n_layer=1)


@pytest.fixture(scope="module")
def noisy_draft(target):
    """The target with noise on every weight: agrees with it often, not always (both branches run)."""
    model = copy.deepcopy(target)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("num_draft", [1, 3, 6])
def test_greedy_output_is_exactly_the_targets(target, noisy_draft, num_draft):
    idx = torch.tensor([[1, 4, 2]])
    expected = target.generate(idx, 30, temperature=0)
    got, stats = speculative_generate(target, noisy_draft, idx, 30, num_draft=num_draft)
    assert torch.equal(got, expected)
    assert stats.new_tokens == 30
    assert 0 < stats.accepted < stats.proposed, "the draft should agree sometimes, not always"
    # every round emits accepted drafts + 1 token, so the number of rounds is fixed by the acceptances
    assert stats.target_calls <= 30 - stats.accepted + 1


def test_greedy_output_with_an_unrelated_draft(target, draft):
    idx = torch.tensor([[5]])
    got, stats = speculative_generate(target, draft, idx, 25, num_draft=4)
    assert torch.equal(got, generate_with_cache(target, idx, 25, temperature=0))
    assert stats.new_tokens == 25


def test_identical_draft_is_always_accepted(target):
    idx = torch.tensor([[3]])
    got, stats = speculative_generate(target, target, idx, 20, num_draft=4)
    assert torch.equal(got, generate_with_cache(target, idx, 20, temperature=0))
    assert stats.acceptance_rate == 1.0
    assert stats.target_calls == 4  # rounds of 5 tokens (4 accepted drafts + 1 bonus): 20 / 5
    assert stats.tokens_per_target_call == 5.0


def test_sampling_with_identical_draft_accepts_everything(target):
    g = torch.Generator().manual_seed(0)
    out, stats = speculative_generate(
        target, target, torch.tensor([[2]]), 15, num_draft=3, temperature=1.0, generator=g
    )
    assert stats.acceptance_rate == 1.0
    assert out.shape == (1, 16)


def test_accept_or_resample_reproduces_the_target_distribution():
    """Draw x ~ q, apply the rule: the output must be distributed as p (statistical check)."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])  # a bad draft: mostly proposes unlikely tokens
    g = torch.Generator().manual_seed(0)
    n = 20000
    drafts = torch.multinomial(q, n, replacement=True, generator=g)
    counts = torch.zeros(4)
    accepted = 0
    for x in drafts.tolist():
        ok, token = accept_or_resample(p, q, x, g)
        counts[token] += 1
        accepted += ok
    freq = counts / n
    assert (freq - p).abs().max() < 0.015, freq  # 4+ standard errors
    # acceptance probability is sum_x min(p, q) = 0.1 + 0.2 + 0.15 + 0.05 = 0.5
    assert abs(accepted / n - 0.5) < 0.015


@pytest.mark.parametrize(
    "draft_kind, num_draft",
    [
        ("unrelated", 2),  # both tokens drafted: accepted or resampled
        ("unrelated", 1),  # the second token is the bonus whenever the first draft is accepted
        ("identical", 1),  # always accepted: the second token is always the bonus, sampled from p_2
    ],
)
def test_sampled_sequences_follow_the_target_joint_distribution(draft_kind, num_draft):
    """End to end on a 3-token vocabulary: P(t1, t2) from speculative sampling vs the exact target."""
    target = _gpt(2, d_model=16, n_layer=1, vocab_size=3, scale=3.0)
    draft = target if draft_kind == "identical" else _gpt(3, d_model=8, n_layer=1, vocab_size=3, scale=3.0)
    idx = torch.tensor([[0]])
    # exact target probabilities of every two-token continuation
    with torch.no_grad():
        p1 = F.softmax(target(idx)[0][0, -1], dim=-1)  # [3]
        exact = {}
        for a, b in itertools.product(range(3), repeat=2):
            p2 = F.softmax(target(torch.tensor([[0, a]]))[0][0, -1], dim=-1)
            exact[(a, b)] = (p1[a] * p2[b]).item()
    g = torch.Generator().manual_seed(0)
    n = 600
    counts = dict.fromkeys(exact, 0)
    for _ in range(n):
        out, _ = speculative_generate(
            target, draft, idx, 2, num_draft=num_draft, temperature=1.0, generator=g
        )
        counts[tuple(out[0, 1:].tolist())] += 1
    worst = max(abs(counts[key] / n - exact[key]) for key in exact)
    assert worst < 0.07, (counts, exact)  # > 3.5 standard errors (sqrt(0.25 / 600) = 0.02)


def test_bad_inputs_are_rejected(target, draft):
    with pytest.raises(ValueError, match="batch 1"):
        speculative_generate(target, draft, torch.zeros(2, 3, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, _gpt(4, d_model=16, n_layer=1, vocab_size=V + 1), torch.tensor([[1]]), 5)
    with pytest.raises(ValueError, match="context"):
        speculative_generate(target, draft, torch.tensor([[1] * 40]), 20)
    with pytest.raises(ValueError, match="num_draft"):
        speculative_generate(target, draft, torch.tensor([[1]]), 5, num_draft=0)
