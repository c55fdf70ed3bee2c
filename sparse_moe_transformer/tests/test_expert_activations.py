"""Every expert activation in the sorted dispatch and its hand-written backward: GELU, ReLU^2 (relu(h)^2) and
SwiGLU (w1 [E, C, 2F] holds the gate and up projections side by side, act(h) = SiLU(gate) * up) equal a
per-token reference (forward and every gradient, with and without capacity drops, coarse and fine-grained
shapes, through the MoE layer with its Config), unknown activations are refused, and the dense shared-expert
FFN equals its own reference for every activation. The float64 gradcheck of every activation is in
test_moe_dispatch.py."""

import pytest
import torch
import torch.nn.functional as F

from phase2_architecture.src.mixture_of_experts import capacity_keep_mask, expert_capacity
from sparse_moe_transformer.src.moe_dispatch import dense_ffn, expert_ffn, route_tokens
from sparse_moe_transformer.src.train import preset_config
from sparse_moe_transformer.tests.test_moe_dispatch import grads, make_moe


def silu_gate_times_up(h):
    """The reference SwiGLU, written from its definition: first half the gate, second half the up."""
    half = h.shape[-1] // 2
    gate, up = h[..., :half], h[..., half:]
    return gate * torch.sigmoid(gate) * up


ACTS = {"gelu": F.gelu, "relu2": lambda h: F.relu(h) ** 2, "swiglu": silu_gate_times_up}


def per_token_reference(x, logits, w1, b1, w2, b2, top_k, act, capacity=None):
    """One token and one slot at a time: sum_j softmax(top-k logits)_j * (act(x w1_e + b1_e) w2_e + b2_e),
    over the pairs the capacity keeps (Phase 2's queue order)."""
    top_logits, top_experts = torch.topk(logits, top_k, dim=-1)  # [N, k]
    weights = torch.softmax(top_logits, dim=-1)
    keep = capacity_keep_mask(top_experts, w1.shape[0], capacity)  # [N, k]
    rows = []
    for n in range(x.shape[0]):
        row = torch.zeros_like(x[n])
        for j in range(top_k):
            if keep[n, j]:
                e = int(top_experts[n, j])
                row = row + weights[n, j] * (act(x[n] @ w1[e] + b1[e]) @ w2[e] + b2[e])
        rows.append(row)
    return torch.stack(rows)


def swiglu_experts(E, C, Fh, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((E, C, 2 * Fh), (E, 2 * Fh), (E, Fh, C), (E, C))
    return [(torch.randn(*s, generator=g, dtype=dtype) * 0.3).requires_grad_() for s in shapes]


@pytest.mark.parametrize(
    "E,k,Fh,skew,capacity_factor",
    [
        (6, 2, 20, 0.0, None),
        (6, 2, 20, 3.0, None),  # uneven, with empty experts
        (6, 2, 20, 1.0, 0.5),  # capacity drops
        (24, 8, 5, 0.0, None),  # fine-grained: 4x the experts, 4x top_k, d_ff / 4
    ],
)
def test_swiglu_dispatch_equals_per_token_reference_forward_and_gradients(E, k, Fh, skew, capacity_factor):
    torch.manual_seed(0)
    N, C = 24, 12
    x = torch.randn(N, C, requires_grad=True)
    wg = (torch.randn(C, E) * 0.5).requires_grad_()
    bias = -skew * torch.arange(E, dtype=torch.float32)  # skews the load towards the first experts
    w1, b1, w2, b2 = swiglu_experts(E, C, Fh)
    capacity = expert_capacity(N, k, E, capacity_factor)
    routing = route_tokens(x @ wg + bias, k, capacity)
    out = expert_ffn(x, w1, b1, w2, b2, routing, "swiglu")
    ref = per_token_reference(x, x @ wg + bias, w1, b1, w2, b2, k, silu_gate_times_up, capacity)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if skew >= 3:
        assert (routing.routed_counts == 0).any()
    if capacity_factor is not None:
        assert routing.dropped > 0
    params = [x, wg, w1, b1, w2, b2]
    for got, want in zip(grads(out, params), grads(ref, params)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_swiglu_needs_a_double_width_w1_and_differs_from_gelu_of_the_same_weights():
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    routing = route_tokens(torch.randn(8, 2), 1)
    w1, b1, w2, b2 = (t.detach() for t in swiglu_experts(2, 4, 6))
    with pytest.raises(ValueError, match="12 output columns"):
        expert_ffn(x, w1[..., :6], b1[..., :6], w2, b2, routing, "swiglu")  # one projection only
    with pytest.raises(ValueError, match="6 output columns"):
        expert_ffn(x, w1, b1, w2, b2, routing, "gelu")  # a swiglu layout given to a gelu expert
    swiglu_out = expert_ffn(x, w1, b1, w2, b2, routing, "swiglu")
    gelu_out = expert_ffn(x, w1[..., :6], b1[..., :6], w2, b2, routing, "gelu")
    assert (swiglu_out - gelu_out).abs().max() > 1e-2


@pytest.mark.parametrize("activation", ["gelu", "relu2", "swiglu"])
def test_dense_shared_ffn_equals_its_reference_forward_gradients_and_gradcheck(activation):
    torch.manual_seed(0)
    N, C, Fh = 10, 6, 8
    width = 2 * Fh if activation == "swiglu" else Fh
    x = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    shapes = ((C, width), (width,), (Fh, C), (C,))
    ws = [(torch.randn(*s, dtype=torch.float64) * 0.3).requires_grad_() for s in shapes]
    out = dense_ffn(x, *ws, activation=activation)
    w1, b1, w2, b2 = ws
    ref = ACTS[activation](x @ w1 + b1) @ w2 + b2
    torch.testing.assert_close(out, ref)
    g = torch.randn(out.shape, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(out, [x, *ws], g), torch.autograd.grad(ref, [x, *ws], g)):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda *a: dense_ffn(*a, activation=activation), (x, *ws))


def test_shared_experts_are_one_ffn_over_their_concatenated_hidden_units():
    # S = 2 shared swiglu experts summed == one dense_ffn with the S gates first, then the S ups
    torch.manual_seed(0)
    C, Fh = 5, 3
    x = torch.randn(7, C)
    experts = [
        [torch.randn(C, 2 * Fh), torch.randn(2 * Fh), torch.randn(Fh, C), torch.randn(C)] for _ in range(2)
    ]
    summed = sum(dense_ffn(x, *e, activation="swiglu") for e in experts)
    gates = [e[0][:, :Fh] for e in experts] + [e[0][:, Fh:] for e in experts]
    b_gates = [e[1][:Fh] for e in experts] + [e[1][Fh:] for e in experts]
    w1, b1 = torch.cat(gates, 1), torch.cat(b_gates)
    w2, b2 = torch.cat([e[2] for e in experts]), experts[0][3] + experts[1][3]
    torch.testing.assert_close(dense_ffn(x, w1, b1, w2, b2, activation="swiglu"), summed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swiglu_experts_compute_in_the_autocast_dtype_with_fp32_weight_gradients(dtype):
    torch.manual_seed(0)
    N, C, Fh, E, k = 32, 16, 12, 4, 2
    x = torch.randn(N, C, requires_grad=True)
    w1, b1, w2, b2 = swiglu_experts(E, C, Fh)
    routing = route_tokens(torch.randn(N, E), k)
    with torch.autocast("cpu", dtype=dtype):
        low = expert_ffn(x, w1, b1, w2, b2, routing, "swiglu")
        shared = dense_ffn(x, w1[0], b1[0], w2[0], b2[0], "swiglu")
    assert low.dtype == dtype and shared.dtype == dtype
    (low.float().sum() + shared.float().sum()).backward()
    assert w1.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    full = expert_ffn(x.detach(), w1.detach(), b1.detach(), w2.detach(), b2.detach(), routing, "swiglu")
    torch.testing.assert_close(low.float(), full, atol=0.05, rtol=0.05)  # half-precision rounding only


@pytest.mark.parametrize("activation", ["relu2", "gelu", "swiglu"])
@pytest.mark.parametrize("skew", [0.0, 3.0])  # 3.0: uneven load with empty experts
def test_the_moe_layer_equals_the_per_token_reference_for_every_activation(activation, skew):
    moe, x = make_moe(skew=skew, activation=activation)
    out, _, routing = moe(x)
    ref = per_token_reference(x, moe.gate(x), moe.w1, moe.b1, moe.w2, moe.b2, moe.top_k, ACTS[activation])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if skew:
        assert (routing.routed_counts == 0).any()
    params = [x, moe.gate.weight, moe.gate.bias, moe.w1, moe.b1, moe.w2, moe.b2]
    for got, want in zip(grads(out, params), grads(ref, params)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


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
