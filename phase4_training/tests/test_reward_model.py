"""Reward model: the Bradley–Terry loss, last-real-token scoring, and learning the preference."""

import math

import pytest
import torch
import torch.nn.functional as F

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase4_training.src.preference_data import (
    encode_pairs,
    feeling_examples,
    make_preference_pairs,
    story_tokenizer,
)
from phase4_training.src.reward_model import (
    RewardModel,
    bradley_terry_loss,
    gpt_hidden_states,
    preference_accuracy,
    train_reward_model,
)


def tiny_backbone(vocab_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=40, n_layer=2, n_head=2, d_model=32))


def test_bradley_terry_loss_on_hand_made_numbers():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = (math.log1p(math.exp(-2.0)) + math.log(2.0) + math.log1p(math.exp(2.0))) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    # independent: the logistic loss of a classifier whose logit is the reward difference, label 1
    r_c, r_r = torch.randn(50) * 10, torch.randn(50) * 10
    reference = F.binary_cross_entropy_with_logits(r_c - r_r, torch.ones(50))
    torch.testing.assert_close(bradley_terry_loss(r_c, r_r), reference)
    # only the difference matters
    torch.testing.assert_close(bradley_terry_loss(r_c + 7.0, r_r + 7.0), reference)
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(4))


def test_hidden_states_are_what_the_lm_head_reads():
    gpt = tiny_backbone(30)
    ids = torch.randint(0, 30, (3, 12))
    torch.testing.assert_close(gpt.lm_head(gpt_hidden_states(gpt, ids)), gpt(ids)[0])


def test_reward_reads_the_last_real_token_and_ignores_padding():
    model = RewardModel(tiny_backbone(30))
    ids = torch.randint(1, 30, (2, 10))
    lengths = torch.tensor([6, 10])
    reward = model(ids, lengths)
    assert reward.shape == (2,)
    padded = ids.clone()
    padded[0, 6:] = torch.randint(1, 30, (4,))  # garbage after the end: causal, so no effect
    torch.testing.assert_close(model(padded, lengths), reward)
    changed = ids.clone()
    changed[0, 2] = (changed[0, 2] % 29) + 1  # a real token before the end changes the reward
    assert model(changed, lengths)[0] != reward[0]
    with pytest.raises(ValueError, match="lengths"):
        model(ids, torch.tensor([0, 10]))


def test_reward_model_learns_the_preference_on_held_out_pairs():
    tokenizer = story_tokenizer()
    train_pairs = encode_pairs(make_preference_pairs(feeling_examples(200, seed=0), seed=0), tokenizer)
    held_out = encode_pairs(
        make_preference_pairs(feeling_examples(80, seed=1), seed=1), tokenizer
    )  # other stories
    model = RewardModel(tiny_backbone(tokenizer.vocab_size))
    before = preference_accuracy(model, held_out)
    history = train_reward_model(
        model, train_pairs, steps=80, batch_size=32, lr=3e-3, seed=0, val_pairs=held_out
    )
    after = preference_accuracy(model, held_out)
    assert [r["step"] for r in history if "val_accuracy" in r] == [79]  # eval_interval=0: only the last step
    assert history[-1]["val_accuracy"] == after
    assert after > 0.85 and after > before + 0.1  # chance is 0.5
    assert history[-1]["loss"] < history[0]["loss"] / 2
    # the unused LM head is not trained
    assert all(
        id(p) not in {id(q) for q in model.backbone.lm_head.parameters()} for p in model.parameters_to_train()
    )
