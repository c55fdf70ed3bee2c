"""Direct Preference Optimization (Rafailov et al., 2023) from scratch.

RLHF fits a reward model and then maximises it with RL while a KL penalty keeps the policy near a
reference model. DPO notices that this KL-regularised problem has a closed-form optimum,

    pi*(y|x) = pi_ref(y|x) exp(r(x,y) / beta) / Z(x)
    =>  r(x,y) = beta log(pi*(y|x) / pi_ref(y|x)) + beta log Z(x),

and substitutes that reward into the Bradley–Terry preference model. Z(x) cancels in the difference
between two answers to the same prompt, which leaves a plain classification loss on the policy:

    loss = -log sigmoid( beta * [ (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x)) ] )

No reward model, no sampling: only the log-probabilities of the chosen (y_c) and rejected (y_r)
answers under the policy being trained and under a frozen copy of where it started (the reference).
beta * (log pi - log ref) is the "implicit reward"; its chosen-minus-rejected difference is the margin.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from phase1_foundation.src.validation import check_number
from phase4_training.src.log_probs import check_frozen, sequence_log_probs
from phase4_training.src.preference_data import EncodedPairs


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss for a batch of pairs (every argument [B] sequence log-probs) and its diagnostics."""
    check_number("beta (typical values: 0.1 to 0.5)", beta, above=0)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)  # [B] implicit rewards
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)  # [B]
    logits = chosen_rewards - rejected_rewards  # [B]
    loss = -F.logsigmoid(logits).mean()  # logsigmoid is the numerically stable log(sigmoid(.))
    metrics = {
        "chosen_reward": chosen_rewards.detach().mean(),
        "rejected_reward": rejected_rewards.detach().mean(),
        "reward_accuracy": (logits.detach() > 0).float().mean(),
    }
    return loss, metrics


@torch.no_grad()
def log_prob_margin(model: nn.Module, pairs: EncodedPairs) -> float:
    """Mean over pairs of log pi(chosen|x) - log pi(rejected|x): how much the model prefers chosen."""
    was_training = model.training
    model.eval()
    chosen = sequence_log_probs(model, pairs.chosen_ids, pairs.chosen_lengths, pairs.prompt_length)
    rejected = sequence_log_probs(model, pairs.rejected_ids, pairs.rejected_lengths, pairs.prompt_length)
    model.train(was_training)
    return float((chosen - rejected).mean())


def dpo_step(
    policy: nn.Module, reference: nn.Module, batch: EncodedPairs, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward pass for one batch: the loss (differentiable in the policy only) and its metrics."""
    args = (batch.prompt_length,)
    policy_chosen = sequence_log_probs(policy, batch.chosen_ids, batch.chosen_lengths, *args)  # [B]
    policy_rejected = sequence_log_probs(policy, batch.rejected_ids, batch.rejected_lengths, *args)
    with torch.no_grad():  # the reference is a constant
        reference_chosen = sequence_log_probs(reference, batch.chosen_ids, batch.chosen_lengths, *args)
        reference_rejected = sequence_log_probs(reference, batch.rejected_ids, batch.rejected_lengths, *args)
    return dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)


def train_dpo(
    policy: nn.Module,
    reference: nn.Module,
    pairs: EncodedPairs,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-4,
    beta: float = 0.1,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Train `policy` with DPO against the frozen `reference`; returns one dict of metrics per step."""
    check_frozen(reference)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    policy.train()
    history = []
    for step in range(steps):
        index = torch.randint(0, len(pairs), (batch_size,), generator=generator)
        loss, metrics = dpo_step(policy, reference, pairs.subset(index), beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step, "loss": loss.item(), **{k: v.item() for k, v in metrics.items()}})
    return history
