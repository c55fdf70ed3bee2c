"""Phase 5's multiple-choice harness scores the Sparse MoE as the MoE's own loss does (its `.logits`
output goes through the harness's one adapter, `model_logits`)."""

import torch

from phase5_production.src.multiple_choice_eval import (
    MultipleChoiceExample,
    evaluate_multiple_choice,
    model_logits,
    score_endings,
)
from sparse_moe_transformer.src.train import SparseMoETransformer, preset_config


class ListTokenizer:
    """Text of space-separated integers <-> those integers ("3 1 4" -> [3, 1, 4])."""

    def encode(self, text):
        return [int(t) for t in text.split()]


def test_the_harness_scores_each_ending_as_minus_the_moes_own_loss_on_it():
    tokenizer = ListTokenizer()
    example = MultipleChoiceExample("5 17 42 8", ("3 9", "60 2 2", "11", "96 96 1 4"), label=0)
    torch.manual_seed(0)
    moe = SparseMoETransformer(preset_config("tiny")).eval()  # vocab 97, block_size 32
    scores = score_endings(moe, tokenizer, example.context, example.endings)
    for i, ending in enumerate(example.endings):  # against the MoE's own loss (targets aligned, -100 ignored)
        ids = torch.tensor([tokenizer.encode(example.context + " " + ending)])
        n = len(ending.split())
        targets = torch.full_like(ids, -100)
        targets[0, -n - 1 : -1] = ids[0, -n:]
        with torch.no_grad():
            loss = moe(ids, targets).loss
        torch.testing.assert_close(scores.log_prob[i], -loss * n, atol=1e-4, rtol=0)
    result = evaluate_multiple_choice(moe, tokenizer, [example] * 3)
    assert result["n"] == 3 and 0.0 <= result["acc_token"] <= 1.0
    idx = torch.tensor([[1, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model_logits(moe, idx), moe(idx).logits)
