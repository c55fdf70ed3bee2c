"""The fast sorted dispatch equals the MoE lesson's per-token reference (Phase 2's
mixture_of_experts.moe_ffn_per_token: one token and one slot at a time, capacity by Python counters),
forward and gradients."""

import math

import pytest
import torch

from phase2_architecture.src.mixture_of_experts import capacity_keep_mask, expert_capacity, moe_ffn_per_token
from sparse_moe_transformer.src.moe_dispatch import expert_ffn, per_expert_sum, route_tokens
from sparse_moe_transformer.src.train import Config, SparseMoEFFN, preset_config


def make_moe(N=24, C=12, Fh=20, E=6, k=2, skew=0.0, seed=0, capacity_factor=None, activation="gelu"):
    torch.manual_seed(seed)
    cfg = Config(vocab_size=11, d_model=C, n_head=1, n_layer=1, n_expert=E, top_k=k, d_ff=Fh, block_size=8,
                 capacity_factor=capacity_factor, expert_activation=activation)  # fmt: skip
    moe = SparseMoEFFN(cfg)
    with torch.no_grad():
        for p in (moe.b1, moe.b2):
            p.normal_(std=0.1)
        moe.w1.normal_(std=0.3), moe.w2.normal_(std=0.3)
        # skew: a strong bias towards the first experts makes the load uneven and some experts empty
        moe.gate.bias.copy_(-skew * torch.arange(E, dtype=torch.float32))
    x = torch.randn(N, C, requires_grad=True)
    return moe, x


def grads(out, tensors, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, tensors, g)


@pytest.mark.parametrize(
    "skew,capacity_factor,k",
    [
        (0.0, None, 2),
        (3.0, None, 2),
        (0.0, None, 1),
        (0.0, None, 3),
        (1.0, 0.5, 2),
        (0.0, 1.0, 2),
        (3.0, 1.25, 3),
    ],
)
def test_fast_dispatch_equals_naive_reference_forward_and_gradients(skew, capacity_factor, k):
    moe, x = make_moe(skew=skew, capacity_factor=capacity_factor, k=k)
    params = [x, moe.gate.weight, moe.gate.bias, moe.w1, moe.b1, moe.w2, moe.b2]
    out, _, routing = moe(x)
    capacity = expert_capacity(x.shape[0], k, moe.n_expert, capacity_factor)
    ref = moe_ffn_per_token(x, moe.gate.weight, moe.gate.bias, moe.w1, moe.b1, moe.w2, moe.b2, k, capacity)
    top_experts = torch.topk(moe.gate(x), k, dim=-1).indices  # [N, k]
    ref_dropped = int((~capacity_keep_mask(top_experts, moe.n_expert, capacity)).sum())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert routing.dropped == ref_dropped
    if capacity_factor is not None and capacity_factor < 1:
        assert ref_dropped > 0  # the capacity case really drops pairs
    if skew >= 3:
        assert (routing.routed_counts == 0).any()  # really uneven, with empty experts
    for got, want in zip(grads(out, params), grads(ref, params)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "relu2", "swiglu"])
def test_custom_backward_passes_gradcheck_in_float64(activation):
    torch.manual_seed(0)
    N, C, Fh, E, k = 12, 3, 4, 4, 2
    dt = torch.float64
    x = torch.randn(N, C, dtype=dt, requires_grad=True)
    wg = torch.randn(C, E, dtype=dt, requires_grad=True)
    up = 2 * Fh if activation == "swiglu" else Fh  # SwiGLU's w1 holds the gate and up projections
    ws = [torch.randn(*s, dtype=dt, requires_grad=True) for s in ((E, C, up), (E, up), (E, Fh, C), (E, C))]

    def f(x, wg, w1, b1, w2, b2, capacity):
        return expert_ffn(x, w1, b1, w2, b2, route_tokens(x @ wg, k, capacity), activation=activation)

    assert torch.autograd.gradcheck(lambda *a: f(*a, None), (x, wg, *ws))
    assert torch.autograd.gradcheck(lambda *a: f(*a, 4), (x, wg, *ws))  # 4 < 2*12/4: drops


def test_routing_is_grouped_by_expert_and_unsort_index_inverts_it():
    logits = torch.randn(50, 7)
    r = route_tokens(logits, 2)
    assert torch.all(r.expert_index[1:] >= r.expert_index[:-1])
    assert r.counts == torch.bincount(r.expert_index, minlength=7).tolist()
    # pair (slot j, token n) sits at row unsort_index[j*N + n] of the sorted order
    for j in range(2):
        rows = r.unsort_index[j * 50 : (j + 1) * 50]
        assert torch.equal(r.token_index[rows], torch.arange(50))
        assert torch.equal(r.expert_index[rows], r.topk_index[:, j])


def test_capacity_drops_later_slots_first_then_later_tokens():
    # every token picks expert 0 first and expert 1 second; capacity 3
    logits = torch.tensor([[5.0, 4.0, 0.0]]).repeat(4, 1)
    r = route_tokens(logits, 2, capacity=3)
    assert r.dropped == 2 and r.counts == [3, 3, 0]
    kept_expert0 = r.token_index[r.expert_index == 0]
    assert kept_expert0.tolist() == [0, 1, 2]  # token 3 (the latest) loses its first choice


def test_expert_capacity_formula():
    assert expert_capacity(100, 2, 16, None) is None
    assert expert_capacity(100, 2, 16, 1.0) == math.ceil(200 / 16)
    assert expert_capacity(100, 2, 16, 1.25) == math.ceil(1.25 * 200 / 16)


def test_per_expert_sum_index_add_and_one_hot_matmul_agree_with_a_loop():
    torch.manual_seed(0)
    expert_index = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 3, 5])  # sorted, experts 1 and 4 empty
    rows = torch.randn(expert_index.numel(), 7)
    want = torch.stack([rows[expert_index == e].sum(0) for e in range(6)])  # empty experts: zeros
    for one_hot_matmul in (False, True):
        got = per_expert_sum(rows, expert_index, 6, one_hot_matmul=one_hot_matmul)
        torch.testing.assert_close(got, want)
    assert (want[[1, 4]] == 0).all()


class MatmulDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the dtypes of the tensors every matrix multiplication receives."""

    MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default,
               torch.ops.aten.addmm.out}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.seen: list[set[torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.MATMULS:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            self.seen.append({t.dtype for t in tensors})
        return func(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_experts_compute_in_the_autocast_dtype_forward_and_backward(dtype):
    # The experts' input is a LayerNorm's output, which autocast keeps in fp32; the experts must still
    # run their matmuls in the autocast dtype, as nn.Linear would, and give fp32 weight gradients. The
    # router alone computes in fp32: one matmul forward, two backward (its input's and weight's gradients).
    config = preset_config("tiny")
    torch.manual_seed(0)
    moe = SparseMoEFFN(config)
    x = torch.randn(2, 16, config.d_model, requires_grad=True)
    with MatmulDtypes() as forward_seen, torch.autocast("cpu", dtype=dtype):
        out, _, routing = moe(x)
    with MatmulDtypes() as backward_seen:
        out.float().square().sum().backward()
    used = sum(c > 0 for c in routing.counts)
    assert len(forward_seen.seen) >= 1 + 2 * used  # the gate, then w1 and w2 of every used expert
    assert len(backward_seen.seen) >= 3 * used
    assert forward_seen.seen.count({torch.float32}) == 1 and backward_seen.seen.count({torch.float32}) == 2
    for dtypes in forward_seen.seen + backward_seen.seen:
        assert dtypes in ({dtype}, {torch.float32}), f"a matmul saw {dtypes} under {dtype} autocast"
    assert moe.w1.grad.dtype == torch.float32 and moe.w1.grad.abs().sum() > 0
    assert x.grad.dtype == torch.float32
