"""ReLU^2 experts (Config.expert_activation="relu2"): the sorted dispatch and its hand-written backward
equal a per-token reference with relu(h)^2 (forward and every gradient), pass gradcheck in float64
with and without capacity drops, and the GELU default is untouched."""

import pytest
import torch
import torch.nn.functional as F

from phase2_architecture.src.mixture_of_experts import expert_capacity
from sparse_moe_transformer.src.moe_dispatch import expert_ffn, route_tokens
from sparse_moe_transformer.src.train import Config, SparseMoEFFN, preset_config


def per_token_reference(x, gate, w1, b1, w2, b2, top_k, act):
    """Dropless, token by token: sum_j softmax(top-k logits)_j * (act(x w1_e + b1_e) w2_e + b2_e)."""
    top_logits, top_experts = torch.topk(gate(x), top_k, dim=-1)  # [N, k]
    weights = torch.softmax(top_logits, dim=-1)
    rows = []
    for n in range(x.shape[0]):
        row = torch.zeros_like(x[n])
        for j in range(top_k):
            e = int(top_experts[n, j])
            row = row + weights[n, j] * (act(x[n] @ w1[e] + b1[e]) @ w2[e] + b2[e])
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("activation,act", [("relu2", lambda h: F.relu(h).square()), ("gelu", F.gelu)])
@pytest.mark.parametrize("skew", [0.0, 3.0])  # 3.0: uneven load with empty experts
def test_sorted_dispatch_equals_the_per_token_reference_forward_and_gradients(activation, act, skew):
    torch.manual_seed(0)
    E, k = 6, 2
    cfg = Config(vocab_size=11, d_model=12, n_head=1, n_layer=1, n_expert=E, top_k=k, d_ff=20, block_size=8,
                 expert_activation=activation)  # fmt: skip
    moe = SparseMoEFFN(cfg)
    with torch.no_grad():
        for p in (moe.b1, moe.b2):
            p.normal_(std=0.1)
        moe.w1.normal_(std=0.3), moe.w2.normal_(std=0.3)
        moe.gate.bias.copy_(-skew * torch.arange(E, dtype=torch.float32))
    x = torch.randn(24, 12, requires_grad=True)
    out, _, routing = moe(x)
    ref = per_token_reference(x, moe.gate, moe.w1, moe.b1, moe.w2, moe.b2, k, act)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if skew:
        assert (routing.routed_counts == 0).any()
    params = [x, moe.gate.weight, moe.gate.bias, moe.w1, moe.b1, moe.w2, moe.b2]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    for got, want in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_relu2_backward_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    N, C, Fh, E, k = 12, 3, 4, 4, 2
    dt = torch.float64
    x = torch.randn(N, C, dtype=dt, requires_grad=True)
    wg = torch.randn(C, E, dtype=dt, requires_grad=True)
    ws = [torch.randn(*s, dtype=dt, requires_grad=True) for s in ((E, C, Fh), (E, Fh), (E, Fh, C), (E, C))]

    def f(x, wg, w1, b1, w2, b2, capacity):
        return expert_ffn(x, w1, b1, w2, b2, route_tokens(x @ wg, k, capacity), activation="relu2")

    assert torch.autograd.gradcheck(lambda *a: f(*a, None), (x, wg, *ws))
    assert torch.autograd.gradcheck(lambda *a: f(*a, expert_capacity(N, k, E, 0.5)), (x, wg, *ws))  # drops


def test_relu2_is_not_gelu_and_unknown_activations_are_refused():
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    w1, b1, w2, b2 = torch.randn(2, 4, 6), torch.randn(2, 6), torch.randn(2, 6, 4), torch.randn(2, 4)
    routing = route_tokens(torch.randn(8, 2), 1)
    relu2, gelu = (expert_ffn(x, w1, b1, w2, b2, routing, a) for a in ("relu2", "gelu"))
    assert (relu2 - gelu).abs().max() > 1e-2
    with pytest.raises(ValueError, match="gelu, relu2 or swiglu"):
        expert_ffn(x, w1, b1, w2, b2, routing, "swish")
    with pytest.raises(ValueError, match="expert_activation"):
        preset_config("tiny", expert_activation="swish")
