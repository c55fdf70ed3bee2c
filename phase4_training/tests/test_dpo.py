"""DPO: the loss equals its formula, log-probs are computed right, training raises the margin."""

import math

import pytest
import torch
import torch.nn.functional as F

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase4_training.src.dpo import dpo_loss, log_prob_margin, train_dpo
from phase4_training.src.log_probs import (
    completion_mask,
    frozen_reference,
    sequence_log_probs,
    token_log_probs,
)
from phase4_training.src.preference_data import (
    encode_pairs,
    feeling_examples,
    make_preference_pairs,
    story_tokenizer,
)


def tiny_gpt(vocab_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=40, n_layer=2, n_head=2, d_model=32))


def test_dpo_loss_on_hand_made_numbers():
    # policy prefers chosen by 1 nat more than the reference, and rejected by 1 nat less: margin 2
    loss, metrics = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5
    )
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)  # -log sigmoid(0.5 * 2)
    assert metrics["chosen_reward"].item() == pytest.approx(0.5) and metrics[
        "rejected_reward"
    ].item() == pytest.approx(-0.5)
    assert metrics["reward_accuracy"].item() == 1.0
    # identical policy and reference: loss = log 2 whatever the log-probs
    same = torch.tensor([-4.0, -9.0])
    assert dpo_loss(same, same - 1, same, same - 1, beta=0.1)[0].item() == pytest.approx(math.log(2.0))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(same, same, same, same, beta=0.0)


def test_dpo_loss_against_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=g, dtype=torch.double) * 5 for _ in range(4))
    beta = 0.3
    logits = beta * ((pc - rc) - (pr - rr))
    expected = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta)[0], expected)
    # gradient: d loss / d pc = -beta * sigmoid(-logits) / B  (checked numerically too)
    pc_ = pc.clone().requires_grad_()
    dpo_loss(pc_, pr, rc, rr, beta)[0].backward()
    torch.testing.assert_close(pc_.grad, -beta * torch.sigmoid(-logits) / 64)
    assert torch.autograd.gradcheck(
        lambda a, b: dpo_loss(a, b, rc, rr, beta)[0],
        (pc_.detach().requires_grad_(), pr.clone().requires_grad_()),
    )


def test_sequence_log_probs_against_the_models_own_cross_entropy():
    model = tiny_gpt(20)
    ids = torch.randint(0, 20, (3, 12))
    lengths, prompt_length = torch.tensor([12, 9, 6]), 4
    got = sequence_log_probs(model, ids, lengths, prompt_length)
    for b in range(3):
        targets = torch.full_like(ids[b : b + 1], -100)  # score only the completion's tokens
        targets[0, prompt_length - 1 : lengths[b] - 1] = ids[b, prompt_length : lengths[b]]
        _, mean_ce = model(ids[b : b + 1], targets)
        n_tokens = int(lengths[b]) - prompt_length
        assert got[b].item() == pytest.approx(-mean_ce.item() * n_tokens, rel=1e-5)
    mask = completion_mask(lengths, prompt_length, 12)
    assert mask.sum(dim=1).tolist() == [8, 5, 2]
    with pytest.raises(ValueError, match="completion token"):
        completion_mask(torch.tensor([4]), 4, 12)


def test_token_log_probs_are_causal():
    model = tiny_gpt(20)
    ids = torch.randint(0, 20, (2, 10))
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 20
    before, after = token_log_probs(model(ids)[0], ids), token_log_probs(model(changed)[0], changed)
    torch.testing.assert_close(before[:, :6], after[:, :6])  # positions predicting tokens 1..6 see only 0..5
    assert not torch.allclose(before[:, 6], after[:, 6])  # position 6 predicts the changed token 7


def test_dpo_raises_the_policy_margin_while_the_reference_stays_frozen():
    tokenizer = story_tokenizer()
    pairs = encode_pairs(make_preference_pairs(feeling_examples(150, seed=0), seed=0), tokenizer)
    held_out = encode_pairs(make_preference_pairs(feeling_examples(60, seed=1), seed=1), tokenizer)
    policy = tiny_gpt(tokenizer.vocab_size)
    reference = frozen_reference(policy)
    reference_weights = {k: v.clone() for k, v in reference.state_dict().items()}
    margin_before = log_prob_margin(policy, held_out)
    history = train_dpo(policy, reference, pairs, steps=15, batch_size=16, lr=1e-3, beta=0.1)
    margin_after = log_prob_margin(policy, held_out)
    assert margin_after > margin_before + 2.0
    assert history[-1]["loss"] < math.log(2.0) < history[0]["loss"] + 1e-3
    assert all(torch.equal(v, reference_weights[k]) for k, v in reference.state_dict().items())
    assert log_prob_margin(reference, held_out) == pytest.approx(margin_before)
    unfrozen = tiny_gpt(tokenizer.vocab_size)
    with pytest.raises(ValueError, match="frozen"):
        train_dpo(policy, unfrozen, pairs, steps=1)
