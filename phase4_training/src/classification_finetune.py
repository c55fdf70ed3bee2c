"""Classification fine-tuning: a pretrained GPT becomes a classifier (rasbt's LLMs-from-scratch, chapter 6).

A language model's last hidden state at position t summarises everything up to t (attention is
causal), so the hidden state of a text's LAST token summarises the whole text. To classify:

    ids [B, T] -> GPT blocks -> ln_f -> hidden [B, T, C] -> head: Linear(C -> K) -> [B, T, K]
                                                  read at the last real token -> logits [B, K]

i.e. the LM head (C -> V, "which token comes next") is replaced by a classifier head (C -> K,
"which class is this text") and trained with cross-entropy on labelled texts. Right padding after
the last real token cannot change it (causality), so batches are padded on the right.

Which parameters to train is the choice this module makes easy to compare (`prepare_for_finetuning`):

    "head"        only the new head (C*K + K numbers): the frozen features must already separate the classes
    "last_block"  the head, the last transformer block and the final norm (rasbt's choice)
    "lora"        the head plus LoRA adapters on every linear layer of the blocks (Phase 4's lora.py)
    "all"         everything

The task comes for free from the synthetic stories: the generator knows which plot wrote each story
("lost", "share", "brave", "broken", "rain", "animal", "gift", "seed", "new_friend", "way_home"), and
the input is the story's middle paragraph, where the problem is told. Ten balanced classes: the
majority class is right about 10-13 % of the time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from phase2_architecture.src.gpt import GPT
from phase3_components.src.synthetic_stories import PLOT_NAMES, generate_labelled_stories
from phase4_training.src.lora import count_parameters, inject_lora, mark_only_lora_trainable

FINETUNING_MODES = ("head", "last_block", "lora", "all")


# ----------------------------------------------------------------------------------------------
# Data: the plot of a story, from its middle paragraph
# ----------------------------------------------------------------------------------------------


@dataclass
class ClassificationData:
    ids: torch.Tensor  # [N, T] right-padded with 0
    lengths: torch.Tensor  # [N] real tokens per row
    labels: torch.Tensor  # [N] class indices
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ClassificationData:
        return ClassificationData(self.ids[index], self.lengths[index], self.labels[index], self.class_names)


def plot_classification_data(tokenizer, n_stories: int, seed: int, max_tokens: int) -> ClassificationData:
    """The middle paragraph of each of `generate_labelled_stories(n_stories, seed)`, labelled by its plot.

    Paragraphs longer than `max_tokens` keep their first `max_tokens` tokens (the problem is told first).
    """
    if n_stories < 1 or max_tokens < 1:
        raise ValueError(f"n_stories and max_tokens must be positive, got {n_stories} and {max_tokens}")
    stories = generate_labelled_stories(n_stories, seed=seed)
    rows = [tokenizer.encode(story.paragraphs[1])[:max_tokens] for story in stories]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(r) for r in rows])
    labels = torch.tensor([PLOT_NAMES.index(story.plot) for story in stories])
    return ClassificationData(ids, lengths, labels, PLOT_NAMES)


def majority_class_accuracy(train: ClassificationData, test: ClassificationData) -> float:
    """Accuracy of always answering the most common training label: the baseline to beat."""
    majority, _ = Counter(train.labels.tolist()).most_common(1)[0]
    return float((test.labels == majority).float().mean())


# ----------------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------------


class GPTClassifier(nn.Module):
    """A GPT whose LM head is replaced by a K-class head, read at each text's last real token."""

    def __init__(self, gpt: GPT, n_classes: int):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
        self.gpt = gpt
        # The new head replaces lm_head (C -> V); with tied weights the token embedding stays as it was.
        gpt.lm_head = nn.Linear(gpt.config.d_model, n_classes)
        nn.init.normal_(gpt.lm_head.weight, std=0.02)
        nn.init.zeros_(gpt.lm_head.bias)

    @property
    def head(self) -> nn.Linear:
        return self.gpt.lm_head

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids [B, T] right-padded, lengths [B] -> class logits [B, K]."""
        if bool((lengths < 1).any()) or bool((lengths > ids.shape[1]).any()):
            raise ValueError(f"lengths must be in [1, {ids.shape[1]}], got {lengths.tolist()}")
        per_position, _ = self.gpt(ids)  # [B, T, K]: the head applied at every position
        rows = torch.arange(ids.shape[0], device=ids.device)
        return per_position[rows, lengths - 1]  # [B, K] at the last real token


def prepare_for_finetuning(
    model: GPTClassifier, mode: str, lora_rank: int = 8, lora_alpha: float = 16.0
) -> int:
    """Set requires_grad for `mode` (see FINETUNING_MODES); returns the number of trainable parameters."""
    if mode not in FINETUNING_MODES:
        raise ValueError(f"mode must be one of {FINETUNING_MODES}, got {mode!r}")
    if mode == "lora":
        inject_lora(
            model.gpt, predicate=lambda name, _: name.startswith("blocks."), rank=lora_rank, alpha=lora_alpha
        )
        mark_only_lora_trainable(model)  # everything frozen except the adapters ...
    else:
        for p in model.parameters():
            p.requires_grad = mode == "all"
    if mode == "last_block":
        for p in [*model.gpt.blocks[-1].parameters(), *model.gpt.ln_f.parameters()]:
            p.requires_grad = True
    for p in model.head.parameters():  # ... and the new head is always trained
        p.requires_grad = True
    return count_parameters(model, trainable_only=True)


# ----------------------------------------------------------------------------------------------
# Training and accuracy
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def classification_accuracy(model: GPTClassifier, data: ClassificationData, batch_size: int = 256) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        batch = data.subset(torch.arange(start, min(start + batch_size, len(data))))
        correct += int((model(batch.ids, batch.lengths).argmax(-1) == batch.labels).sum())
    model.train(was_training)
    return correct / len(data)


def train_classifier(
    model: GPTClassifier,
    data: ClassificationData,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """AdamW on the trainable parameters, cross-entropy on random batches; returns the loss per step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: call prepare_for_finetuning(model, mode) first")
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        batch = data.subset(torch.randint(0, len(data), (batch_size,), generator=generator))
        loss = F.cross_entropy(model(batch.ids, batch.lengths), batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
