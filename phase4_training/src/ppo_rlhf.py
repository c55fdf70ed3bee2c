"""RLHF with PPO, compactly: sample, score, penalise drifting from the reference, clipped updates.

One iteration (InstructGPT's recipe, as in TRL's PPOTrainer, at toy scale):

1. Rollout. Sample a completion y (N tokens) for each prompt x from the current policy.
2. Score.   reward = r(x, y) from a reward model (or a programmatic reward), given at the last token.
3. KL.      per token, kl_t = log pi(y_t | .) - log pi_ref(y_t | .) under the frozen reference
            (the model we started from). The reward the RL algorithm sees is
                r_t = -kl_coef * kl_t            (+ r(x, y) on the last token)
            so the policy gains reward only by changes that are worth their distance from the
            reference: without it, it would find and exploit the reward model's blind spots.
4. Advantages. A value head V(s_t) predicts the return from each position; generalised advantage
            estimation (GAE) turns rewards and values into advantages
                delta_t = r_t + gamma V(s_{t+1}) - V(s_t),     A_t = delta_t + gamma lambda A_{t+1}
            (how much better this token turned out than expected), normalised over the batch.
5. PPO update. A few epochs of minibatch steps on the clipped surrogate objective
                ratio_t = pi(y_t | .) / pi_old(y_t | .)
                L_clip  = mean_t min(ratio_t A_t, clip(ratio_t, 1 - eps, 1 + eps) A_t)
            maximised (we minimise -L_clip), plus vf_coef * (V(s_t) - return_t)^2 for the value head.
            The clip removes the incentive to move the probability of a token by more than a
            factor 1 +- eps away from where the rollout was sampled: many small safe steps per batch.

The value head here is a linear layer on the policy's final hidden states, detached: a learned
baseline that cannot disturb the language model it reads from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from phase1_foundation.src.validation import check_int
from phase2_architecture.src.gpt import GPT
from phase3_components.src.char_tokenizer import CharTokenizer
from phase4_training.src.log_probs import check_frozen, token_log_probs
from phase4_training.src.preference_data import sentiment_reward
from phase4_training.src.reward_model import RewardModel, gpt_hidden_states

RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (prompts [B, P], completions [B, N]) -> [B]


# ---------------------------------------------------------------------------------------------
# The math, as small functions
# ---------------------------------------------------------------------------------------------


def ppo_clipped_objective(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip_eps: float = 0.2
) -> torch.Tensor:
    """-mean(min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)): the PPO policy loss (to minimise)."""
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}; 0.1 to 0.3 is usual")
    ratio = torch.exp(log_probs - old_log_probs)  # pi / pi_old, computed in log space
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -torch.minimum(unclipped, clipped).mean()


def kl_penalized_rewards(
    scores: torch.Tensor, policy_log_probs: torch.Tensor, reference_log_probs: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards [B, N]: -kl_coef * (log pi - log pi_ref), plus the score [B] on the last token."""
    rewards = -kl_coef * (policy_log_probs - reference_log_probs)  # [B, N]
    rewards[:, -1] += scores
    return rewards


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over [B, N] rewards and values; returns (advantages, returns).

    Walks backwards: A_t = delta_t + gamma * lam * A_{t+1}, delta_t = r_t + gamma * V_{t+1} - V_t,
    with V_N = 0 (the episode ends after the last token). returns = A + V (the value head's target).
    """
    B, N = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros(B, device=rewards.device)
    for t in reversed(range(N)):
        next_value = values[:, t + 1] if t + 1 < N else torch.zeros(B, device=rewards.device)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    return advantages, advantages + values


def whiten(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance: keeps the policy-gradient scale steady whatever the reward scale."""
    return (x - x.mean()) / (x.std() + eps)


# ---------------------------------------------------------------------------------------------
# Policy with a value head, reward functions
# ---------------------------------------------------------------------------------------------


class PolicyWithValueHead(nn.Module):
    """A GPT policy and a linear value head reading its (detached) final hidden states."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt
        self.value_head = nn.Linear(gpt.config.d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, T] -> (next-token logits [B, T, V], values [B, T])."""
        hidden = gpt_hidden_states(self.gpt, ids)  # [B, T, C]
        logits = self.gpt.lm_head(hidden)  # [B, T, V]
        values = self.value_head(hidden.detach()).squeeze(-1)  # [B, T]
        return logits, values


def sentiment_reward_fn(tokenizer: CharTokenizer) -> RewardFn:
    """The programmatic reward: +1 / -1 / 0 for a positive / negative / no feeling word first."""

    def reward(prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        return torch.tensor([sentiment_reward(tokenizer.decode(c.tolist())) for c in completions])

    return reward


def reward_model_fn(reward_model: RewardModel) -> RewardFn:
    """The learned reward: r(x, y) from a trained RewardModel on prompt + completion."""

    @torch.no_grad()
    def reward(prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([prompts, completions], dim=1)  # [B, P + N], no padding
        lengths = torch.full((ids.shape[0],), ids.shape[1], device=ids.device)
        reward_model.eval()
        return reward_model(ids, lengths)

    return reward


# ---------------------------------------------------------------------------------------------
# Rollout and update
# ---------------------------------------------------------------------------------------------


@dataclass
class PPOConfig:
    iterations: int = 30  # rollout + update rounds
    batch_size: int = 64  # prompts per rollout
    max_new_tokens: int = 8  # completion length N
    ppo_epochs: int = 4  # passes over each rollout
    minibatch_size: int = 32
    lr: float = 1e-4
    clip_eps: float = 0.2
    kl_coef: float = 0.05
    vf_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    seed: int = 0

    def __post_init__(self):
        for name in ("iterations", "batch_size", "max_new_tokens", "ppo_epochs", "minibatch_size"):
            value = getattr(self, name)
            check_int(f"PPOConfig.{name}", value, minimum=1)
        if self.minibatch_size > self.batch_size:
            raise ValueError(f"minibatch_size ({self.minibatch_size}) exceeds batch_size ({self.batch_size})")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.kl_coef < 0 or self.lr <= 0:
            raise ValueError(f"need kl_coef >= 0 and lr > 0, got {self.kl_coef} and {self.lr}")


def completion_log_probs(logits: torch.Tensor, ids: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """log-probs of the N completion tokens: [B, P + N, V], [B, P + N] -> [B, N]."""
    return token_log_probs(logits, ids)[:, prompt_length - 1 :]  # target positions P .. P+N-1


@torch.no_grad()
def rollout(
    policy: PolicyWithValueHead,
    reference: GPT,
    prompts: torch.Tensor,
    reward_fn: RewardFn,
    config: PPOConfig,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Sample completions and compute everything the update needs (all constants for it)."""
    P = prompts.shape[1]
    ids = policy.gpt.generate(
        prompts, config.max_new_tokens, temperature=1.0, generator=generator
    )  # [B, P+N]
    policy.eval()
    logits, values = policy(ids)
    old_log_probs = completion_log_probs(logits, ids, P)  # [B, N]
    values = values[:, P - 1 : -1]  # [B, N] V(state before each completion token)
    reference_log_probs = completion_log_probs(reference(ids)[0], ids, P)  # [B, N]
    scores = reward_fn(prompts, ids[:, P:]).to(values.dtype)  # [B]
    rewards = kl_penalized_rewards(scores, old_log_probs, reference_log_probs, config.kl_coef)  # [B, N]
    advantages, returns = gae_advantages(rewards, values, config.gamma, config.lam)
    return {
        "ids": ids,
        "old_log_probs": old_log_probs,
        "advantages": whiten(advantages),
        "returns": returns,
        "scores": scores,
        "kl": (old_log_probs - reference_log_probs).sum(dim=1),  # [B] KL estimate per sequence
    }


def ppo_update(
    policy: PolicyWithValueHead,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    prompt_length: int,
    config: PPOConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """`ppo_epochs` passes of minibatch steps on the clipped objective + value loss."""
    policy.train()
    B = batch["ids"].shape[0]
    stats = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0}
    n_updates = 0
    for _ in range(config.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for start in range(0, B, config.minibatch_size):
            index = order[start : start + config.minibatch_size]
            logits, values = policy(batch["ids"][index])
            log_probs = completion_log_probs(logits, batch["ids"][index], prompt_length)  # [b, N]
            values = values[:, prompt_length - 1 : -1]  # [b, N]
            old, advantages = batch["old_log_probs"][index], batch["advantages"][index]
            policy_loss = ppo_clipped_objective(log_probs, old, advantages, config.clip_eps)
            value_loss = 0.5 * (values - batch["returns"][index]).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            (policy_loss + config.vf_coef * value_loss).backward()
            optimizer.step()
            ratio = torch.exp(log_probs.detach() - old)
            stats["policy_loss"] += policy_loss.item()
            stats["value_loss"] += value_loss.item()
            stats["clip_fraction"] += float(((ratio - 1).abs() > config.clip_eps).float().mean())
            n_updates += 1
    return {k: v / n_updates for k, v in stats.items()}


def train_ppo(
    policy: PolicyWithValueHead,
    reference: GPT,
    prompt_pool: torch.Tensor,
    reward_fn: RewardFn,
    config: PPOConfig,
    progress: Callable | None = None,
) -> list[dict[str, float]]:
    """Run `config.iterations` rollout/update rounds; prompts are drawn from prompt_pool [M, P].

    History per iteration: mean score of the rollout (before the update), mean KL to the
    reference (summed over tokens), policy/value losses and the fraction of clipped ratios.
    """
    check_frozen(reference)
    if prompt_pool.dim() != 2 or prompt_pool.shape[1] + config.max_new_tokens > policy.gpt.config.block_size:
        raise ValueError(
            f"prompt_pool must be [M, P] with P + max_new_tokens <= block_size "
            f"{policy.gpt.config.block_size}, got shape {tuple(prompt_pool.shape)}"
        )
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
    history = []
    iterations = range(config.iterations) if progress is None else progress(range(config.iterations))
    for iteration in iterations:
        index = torch.randint(0, prompt_pool.shape[0], (config.batch_size,), generator=generator)
        batch = rollout(policy, reference, prompt_pool[index], reward_fn, config, generator)
        stats = ppo_update(policy, optimizer, batch, prompt_pool.shape[1], config, generator)
        history.append(
            {
                "iteration": iteration,
                "mean_score": float(batch["scores"].mean()),
                "kl": float(batch["kl"].mean()),
                **stats,
            }
        )
    return history


@torch.no_grad()
def mean_reward(
    gpt: GPT, prompts: torch.Tensor, reward_fn: RewardFn, max_new_tokens: int, seed: int = 0
) -> float:
    """Average reward of completions sampled (temperature 1) from `gpt` for every prompt."""
    generator = torch.Generator().manual_seed(seed)
    ids = gpt.generate(prompts, max_new_tokens, temperature=1.0, generator=generator)
    return float(reward_fn(prompts, ids[:, prompts.shape[1] :]).mean())
