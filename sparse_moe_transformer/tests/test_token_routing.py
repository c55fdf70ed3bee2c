"""SparseMoETransformer.token_routing: the router's decisions per token and layer, as plain tensors.

Compared with Phase 2's reference routing (route_top_k, capacity_keep_mask) applied to the gate
logits captured from each layer's router during a separate forward pass.
"""

import pytest
import torch

from phase2_architecture.src.mixture_of_experts import capacity_keep_mask, expert_capacity, route_top_k
from sparse_moe_transformer.src.train import SparseMoETransformer, preset_config


def gate_logits_of_each_layer(model, idx) -> list[torch.Tensor]:
    """The output of every layer's gate (router) Linear during model(idx): [N, E] per layer."""
    captured = []
    hooks = [
        layer.moe.gate.register_forward_hook(lambda m, i, out: captured.append(out)) for layer in model.layers
    ]
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_token_routing_equals_the_reference_routing_of_each_layer(capacity_factor):
    torch.manual_seed(0)
    config = preset_config("tiny", n_layer=3, n_expert=6, top_k=2, capacity_factor=capacity_factor)
    model = SparseMoETransformer(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, 9))  # [B, T]
    routing = model.token_routing(idx)
    B, T, L, k, E = 2, 9, config.n_layer, config.top_k, config.n_expert
    assert routing.experts.shape == routing.weights.shape == routing.kept.shape == (B, T, L, k)
    assert routing.probs.shape == (B, T, L, E)
    capacity = expert_capacity(B * T, k, E, capacity_factor)
    for layer, logits in enumerate(gate_logits_of_each_layer(model, idx)):  # logits [B*T, E], row b*T + t
        weights, indices = route_top_k(logits, k)  # [N, k]
        assert torch.equal(routing.experts[:, :, layer].reshape(B * T, k), indices)
        torch.testing.assert_close(routing.weights[:, :, layer].reshape(B * T, k), weights)
        keep = capacity_keep_mask(indices, E, capacity)
        assert torch.equal(routing.kept[:, :, layer].reshape(B * T, k), keep)
        torch.testing.assert_close(routing.probs[:, :, layer].reshape(B * T, E), torch.softmax(logits, -1))
    assert routing.kept.all() == (capacity_factor is None)  # a factor of 0.5 must drop some pairs


def test_token_routing_reports_the_experts_that_shaped_the_output():
    """Zeroing the experts a token was NOT sent to leaves its output unchanged; zeroing one it was
    sent to changes it: the reported experts are the ones that ran."""
    torch.manual_seed(1)
    config = preset_config("tiny", n_layer=1, n_expert=4, top_k=2)
    model = SparseMoETransformer(config).eval()
    idx = torch.randint(0, config.vocab_size, (1, 6))
    chosen = model.token_routing(idx).experts[0, -1, 0].tolist()  # the last token, layer 0
    before = model(idx).logits[0, -1]
    for expert in range(config.n_expert):
        with torch.no_grad():
            saved = model.layers[0].moe.w2[expert].clone(), model.layers[0].moe.b2[expert].clone()
            model.layers[0].moe.w2[expert].zero_()
            model.layers[0].moe.b2[expert].zero_()
            changed = not torch.equal(model(idx).logits[0, -1], before)
            model.layers[0].moe.w2[expert].copy_(saved[0])
            model.layers[0].moe.b2[expert].copy_(saved[1])
        assert changed == (expert in chosen), expert
