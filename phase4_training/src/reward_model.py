"""A reward model trained on preference pairs with the Bradley–Terry loss.

People find it much easier to say which of two answers is better than to give an answer a score.
The Bradley–Terry model turns such comparisons into a scalar reward r(x, y): it assumes

    P(y_chosen preferred over y_rejected | x) = sigmoid(r(x, y_chosen) - r(x, y_rejected))

and we fit r by maximum likelihood, i.e. minimise

    loss = -log sigmoid(r_chosen - r_rejected)          (mean over pairs)

Only differences of rewards matter (adding a constant to r changes nothing).

Architecture (as in InstructGPT): a GPT backbone without its LM head, and a linear "score head"
C -> 1 read at the LAST REAL token of each sequence. The backbone is causal, so that position has
seen the whole prompt and answer, and right padding after it cannot change it.

    ids [B, T] -> backbone -> hidden [B, T, C] -> hidden[b, length_b - 1] [B, C] -> score head -> r [B]
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from phase1_foundation.src.validation import check_int
from phase2_architecture.src.gpt import GPT
from phase4_training.src.preference_data import EncodedPairs


def gpt_hidden_states(gpt: GPT, ids: torch.Tensor) -> torch.Tensor:
    """The GPT's final hidden states [B, T, C] (after ln_f, before lm_head).

    Runs the same public modules as GPT.forward (tok_emb, pos_emb, drop, blocks, ln_f); heads other
    than the LM head (reward score, PPO value) read from here.
    """
    if ids.dim() != 2 or ids.shape[1] > gpt.config.block_size:
        raise ValueError(
            f"ids must be [B, T] with T <= block_size {gpt.config.block_size}, got shape {tuple(ids.shape)}"
        )
    x = gpt.drop(gpt.tok_emb(ids) + gpt.pos_emb.positions(ids.shape[1]))  # [B, T, C]
    for block in gpt.blocks:
        x = block(x)  # [B, T, C]
    return gpt.ln_f(x)  # [B, T, C]


def last_token_states(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, C], lengths [B] -> hidden[b, lengths[b] - 1] for every b: [B, C]."""
    if bool((lengths < 1).any()) or bool((lengths > hidden.shape[1]).any()):
        raise ValueError(f"lengths must be in [1, {hidden.shape[1]}], got {lengths.tolist()}")
    rows = torch.arange(hidden.shape[0], device=hidden.device)  # [B]
    return hidden[rows, lengths - 1]  # [B, C]


class RewardModel(nn.Module):
    """r(x, y): a GPT backbone plus a linear score head on the last real token."""

    def __init__(self, backbone: GPT):
        super().__init__()
        self.backbone = backbone
        self.score_head = nn.Linear(backbone.config.d_model, 1)
        nn.init.normal_(self.score_head.weight, std=0.02)
        nn.init.zeros_(self.score_head.bias)

    def parameters_to_train(self) -> list[nn.Parameter]:
        """Everything except the unused LM head."""
        lm_head = {id(p) for p in self.backbone.lm_head.parameters()}
        return [p for p in self.parameters() if id(p) not in lm_head]

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids [B, T] right-padded, lengths [B] -> rewards [B]."""
        hidden = gpt_hidden_states(self.backbone, ids)  # [B, T, C]
        last = last_token_states(hidden, lengths)  # [B, C]
        return self.score_head(last).squeeze(-1)  # [B]


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged over the batch (logsigmoid: stable for any margin)."""
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen and rejected rewards must have the same shape, got "
            f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def pair_rewards(model: RewardModel, pairs: EncodedPairs) -> tuple[torch.Tensor, torch.Tensor]:
    return model(pairs.chosen_ids, pairs.chosen_lengths), model(pairs.rejected_ids, pairs.rejected_lengths)


@torch.no_grad()
def preference_accuracy(model: RewardModel, pairs: EncodedPairs) -> float:
    """Fraction of pairs where r(chosen) > r(rejected); 0.5 is chance."""
    was_training = model.training
    model.eval()
    chosen, rejected = pair_rewards(model, pairs)
    model.train(was_training)
    return float((chosen > rejected).float().mean())


def train_reward_model(
    model: RewardModel,
    pairs: EncodedPairs,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    val_pairs: EncodedPairs | None = None,
    eval_interval: int = 0,
) -> list[dict[str, float]]:
    """Minimise the Bradley–Terry loss with AdamW on random batches of pairs; returns the history.

    With `val_pairs`, records get "val_accuracy" every `eval_interval` steps and at the last step
    (0 = only at the last: 0 is off, as in Phase 4's TrainingConfig).
    """
    check_int("steps", steps, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    check_int("eval_interval (0 = only at the last step)", eval_interval, minimum=0)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters_to_train(), lr=lr, weight_decay=0.0)
    model.train()
    history = []
    for step in range(steps):
        index = torch.randint(0, len(pairs), (batch_size,), generator=generator)
        chosen, rejected = pair_rewards(model, pairs.subset(index))  # [B], [B]
        loss = bradley_terry_loss(chosen, rejected)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        record = {
            "step": step,
            "loss": loss.item(),
            "batch_accuracy": float((chosen > rejected).float().mean()),
        }
        due = (eval_interval and step % eval_interval == 0) or step == steps - 1
        if val_pairs is not None and due:
            record["val_accuracy"] = preference_accuracy(model, val_pairs)
        history.append(record)
    return history
