"""PPO-RLHF: the clipped objective, KL-shaped rewards and GAE equal their formulas; reward rises."""

import copy

import pytest
import torch

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase4_training.src.log_probs import frozen_reference
from phase4_training.src.ppo_rlhf import (
    PolicyWithValueHead,
    PPOConfig,
    gae_advantages,
    kl_penalized_rewards,
    mean_reward,
    ppo_clipped_objective,
    sentiment_reward_fn,
    train_ppo,
)
from phase4_training.src.preference_data import feeling_examples, language_model_windows, story_tokenizer
from phase4_training.src.training_loop import TrainingConfig, train


def test_clipped_objective_on_hand_made_numbers():
    eps = 0.2
    ratios = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.1])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    # min(r A, clip(r) A) per element:
    #   r=1.5, A=+1: min(1.5, 1.2) = 1.2   (no extra credit beyond 1 + eps)
    #   r=0.5, A=+1: min(0.5, 0.8) = 0.5   (the pessimistic, unclipped value)
    #   r=0.5, A=-1: min(-0.5, -0.8) = -0.8
    #   r=1.5, A=-1: min(-1.5, -1.2) = -1.5
    #   r=1.1, A=+2: min(2.2, 2.2) = 2.2   (inside the trust region: plain ratio * A)
    expected = -(1.2 + 0.5 - 0.8 - 1.5 + 2.2) / 5
    old = torch.log(torch.tensor([0.2, 0.4, 0.1, 0.3, 0.5]))
    new = (old + torch.log(ratios)).requires_grad_()
    loss = ppo_clipped_objective(new, old, advantages, clip_eps=eps)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # clipped terms give no gradient; the others give -r * A / n (d ratio / d log pi = ratio)
    expected_grad = torch.tensor([0.0, -0.5, 0.0, 1.5, -2.2]) / 5
    torch.testing.assert_close(new.grad, expected_grad)
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_clipped_objective(new, old, advantages, clip_eps=1.5)


def test_kl_penalized_rewards_on_hand_made_numbers():
    scores = torch.tensor([1.0, -1.0])
    policy = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -1.0]])
    reference = torch.tensor([[-1.5, -2.0, -1.0], [-2.0, -1.0, -2.0]])
    rewards = kl_penalized_rewards(scores, policy, reference, kl_coef=0.1)
    expected = torch.tensor([[-0.05, 0.0, -0.05 + 1.0], [0.1, 0.0, -0.1 - 1.0]])
    torch.testing.assert_close(rewards, expected)


def test_gae_against_the_direct_sum():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    gamma, lam = 0.9, 0.8
    advantages, returns = gae_advantages(rewards, values, gamma, lam)
    next_values = torch.cat([values[:, 1:], torch.zeros(4, 1)], dim=1)
    deltas = rewards + gamma * next_values - values
    for t in range(6):  # A_t = sum_l (gamma lam)^l delta_{t+l}
        direct = sum((gamma * lam) ** l * deltas[:, t + l] for l in range(6 - t))
        torch.testing.assert_close(advantages[:, t], direct)
    torch.testing.assert_close(returns, advantages + values)
    # lam = 1, gamma = 1: the advantage is the Monte-Carlo return minus the value
    advantages, _ = gae_advantages(rewards, values, 1.0, 1.0)
    torch.testing.assert_close(advantages, rewards.flip(1).cumsum(1).flip(1) - values)


def test_policy_logits_equal_the_gpt_and_the_value_head_is_detached():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, d_model=16))
    policy = PolicyWithValueHead(gpt)
    ids = torch.randint(0, 20, (2, 9))
    logits, values = policy(ids)
    torch.testing.assert_close(logits, gpt(ids)[0])
    assert values.shape == (2, 9)
    values.sum().backward()
    assert all(p.grad is None for p in gpt.parameters())
    assert policy.value_head.weight.grad is not None


def test_ppo_raises_the_reward_of_a_pretrained_policy():
    tokenizer = story_tokenizer()
    examples = feeling_examples(200, seed=0)
    windows = language_model_windows(examples, tokenizer)  # [N, 36]: prompt + the story's next 12 chars

    # 1. "pretrain" (supervised) a tiny GPT with the Phase 4 training loop: it learns to write
    #    feeling words after a prompt, positive or negative as often as the stories do
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=40, n_layer=2, n_head=2, d_model=48))

    def get_batch(split):
        rows = torch.randint(0, len(windows), (32,))
        return windows[rows, :-1], windows[rows, 1:]

    train(gpt, get_batch, TrainingConfig(max_steps=80, max_lr=1e-2, min_lr=1e-3, warmup_steps=10))

    # 2. PPO against the programmatic reward, KL-penalised towards the supervised model
    reward_fn = sentiment_reward_fn(tokenizer)
    held_out_prompts = torch.tensor([tokenizer.encode(ex.prompt) for ex in feeling_examples(60, seed=1)])
    before = mean_reward(gpt, held_out_prompts, reward_fn, max_new_tokens=8, seed=0)
    reference = frozen_reference(gpt)
    reference_weights = copy.deepcopy(reference.state_dict())
    policy = PolicyWithValueHead(copy.deepcopy(gpt))
    prompt_pool = windows[:, :24]
    config = PPOConfig(iterations=10, batch_size=32, minibatch_size=16, ppo_epochs=2, lr=1e-3, kl_coef=0.05)
    history = train_ppo(policy, reference, prompt_pool, reward_fn, config)
    after = mean_reward(policy.gpt, held_out_prompts, reward_fn, max_new_tokens=8, seed=0)

    assert after > before + 0.4, (before, after)
    assert history[-1]["mean_score"] > history[0]["mean_score"]
    assert history[-1]["kl"] > 0  # the policy moved away from the reference ...
    assert all(
        torch.equal(v, reference_weights[k]) for k, v in reference.state_dict().items()
    )  # ... which did not


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="minibatch_size"):
        PPOConfig(batch_size=8, minibatch_size=16)
    with pytest.raises(ValueError, match="clip_eps"):
        PPOConfig(clip_eps=0.0)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, d_model=16))
    policy, reward_fn = (
        PolicyWithValueHead(copy.deepcopy(gpt)),
        lambda prompts, completions: torch.zeros(len(prompts)),
    )
    with pytest.raises(ValueError, match="frozen"):
        train_ppo(
            policy,
            gpt,
            torch.zeros(4, 4, dtype=torch.long),
            reward_fn,
            PPOConfig(batch_size=4, minibatch_size=4),
        )
    with pytest.raises(ValueError, match="block_size"):
        train_ppo(policy, frozen_reference(gpt), torch.zeros(4, 12, dtype=torch.long), reward_fn, PPOConfig())
