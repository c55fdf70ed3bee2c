"""The Phase 2 GPT built from Phase 1's hand-written Linear, Embedding and cross-entropy equals torch's."""

import pytest
import torch
from torch import nn

from phase1_foundation.src.primitives import Embedding, Linear, cross_entropy
from phase2_architecture.src.gpt import GPT, GPTConfig
from phase2_architecture.src.positional_encoding import LearnedPositionalEmbedding


def swap_in_primitives(model: nn.Module) -> int:
    """Replace every nn.Linear and (token) nn.Embedding by Phase 1's, holding the SAME parameters."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                ours = Linear(child.in_features, child.out_features, bias=child.bias is not None)
                ours.weight = child.weight  # shared Parameter: tied weights stay tied
                if child.bias is not None:
                    ours.bias = child.bias
            elif isinstance(child, nn.Embedding) and not isinstance(child, LearnedPositionalEmbedding):
                ours = Embedding(child.num_embeddings, child.embedding_dim)
                ours.weight = child.weight
            else:
                continue
            setattr(module, name, ours)
            swapped += 1
    return swapped


@pytest.mark.parametrize(
    "overrides", [{}, {"ffn": "swiglu", "norm": "rmsnorm", "tie_weights": True}, {"bias": False}]
)
def test_gpt_with_hand_written_primitives_has_the_same_logits_loss_and_gradients(overrides):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=17, block_size=12, n_layer=2, n_head=2, d_model=16, **overrides)
    reference = GPT(config)
    model = GPT(config)
    model.load_state_dict(reference.state_dict())
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert swap_in_primitives(model) == n_linear + 1  # every Linear and the token embedding
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in model.modules())
    assert set(model.state_dict()) == set(reference.state_dict())  # same keys: checkpoints interchange

    idx = torch.randint(0, 17, (3, 12))
    targets = torch.randint(0, 17, (3, 12))
    targets[0, :4] = -100
    logits, loss = model(idx, targets)
    ref_logits, ref_loss = reference(idx, targets)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    ours = cross_entropy(logits.flatten(0, 1), targets.flatten())  # our loss on the logits
    torch.testing.assert_close(ours, ref_loss, rtol=1e-6, atol=1e-6)
    ours.backward()
    ref_loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
