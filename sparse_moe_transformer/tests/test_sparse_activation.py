"""Sparsity: top_k of n_expert run per token, every chosen expert counts, weights form a distribution,
and an expert no token chose gets exactly zero gradient (whatever was in memory before)."""

import torch

from phase2_architecture.src.mixture_of_experts import moe_ffn_per_token
from sparse_moe_transformer.src.train import SparseMoEFFN, preset_config


def t1000_sized_moe_layer(d_model=64, d_ff=96):
    """A layer with the t1000 routing (16 experts, top-2) at a small width, to stay fast."""
    cfg = preset_config("t1000", d_model=d_model, n_head=8, d_ff=d_ff)
    assert (cfg.n_expert, cfg.top_k) == (16, 2)
    moe = SparseMoEFFN(cfg)
    with torch.no_grad():  # non-zero biases: an expert's contribution is never accidentally 0
        moe.b1.normal_(), moe.b2.normal_()
    return moe


def test_each_token_activates_exactly_2_of_16_experts():
    torch.manual_seed(0)
    moe = t1000_sized_moe_layer()
    x = torch.randn(3, 50, 64)
    _, _, r = moe(x)
    N = 150
    # every token appears in exactly 2 (token, expert) pairs, with 2 distinct experts
    assert torch.equal(torch.bincount(r.token_index, minlength=N), torch.full((N,), 2))
    assert (r.topk_index[:, 0] != r.topk_index[:, 1]).all()
    assert r.token_index.numel() == 2 * N and r.dropped == 0
    used_per_token = torch.zeros(N, 16).index_put_((r.token_index, r.expert_index), torch.ones(2 * N))
    assert torch.equal(used_per_token.sum(1), torch.full((N,), 2.0))
    idle_fraction = 1 - used_per_token.sum(1) / 16
    assert torch.allclose(idle_fraction, torch.tensor(0.875))  # 87.5% of the expert parameters idle


def test_output_is_the_weighted_sum_of_both_chosen_experts():
    # Skipping a chosen expert (or using one that was not chosen) changes the output: checked token
    # by token against the MoE lesson's plain definition (Phase 2), forward and gradients.
    torch.manual_seed(3)
    moe = t1000_sized_moe_layer()
    x = torch.randn(40, 64, requires_grad=True)
    out, _, _ = moe(x)
    ref = moe_ffn_per_token(x, moe.gate.weight, moe.gate.bias, moe.w1, moe.b1, moe.w2, moe.b2, moe.top_k)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    params = [x, moe.gate.weight, moe.w1, moe.b1, moe.w2, moe.b2]
    for got, want in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_routing_weights_are_positive_and_sum_to_one():
    torch.manual_seed(1)
    moe = t1000_sized_moe_layer()
    x = torch.randn(200, 64) * 3
    _, gate_logits, routing = moe(x)
    w = routing.topk_weight  # [N, 2]
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(200))
    # they are the softmax over the two selected gate logits, the larger logit first
    top2 = torch.topk(gate_logits, 2, dim=-1).values  # [N, 2]
    torch.testing.assert_close(w, torch.softmax(top2, dim=-1))
    assert (w[:, 0] >= w[:, 1]).all()


def test_an_expert_no_token_chose_gets_exactly_zero_gradient(monkeypatch):
    torch.manual_seed(2)
    moe = t1000_sized_moe_layer()
    with torch.no_grad():
        moe.gate.bias[5] = -1e4  # nobody picks expert 5
    # Fresh memory is often zero by luck; the backward must zero an idle expert's gradient itself.
    # Every uninitialised buffer is filled with NaN here, so a gradient left unwritten shows.
    empty_like, new_empty = torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(float("nan")))
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda t, *a, **kw: new_empty(t, *a, **kw).fill_(float("nan"))
    )
    x = torch.randn(100, 64, requires_grad=True)
    out, _, routing = moe(x)
    out.square().sum().backward()
    assert routing.routed_counts[5] == 0
    used = torch.nonzero(routing.routed_counts > 0).flatten().tolist()
    for p in (moe.w1, moe.b1, moe.w2, moe.b2):
        assert torch.count_nonzero(p.grad[5]) == 0 and not p.grad[5].isnan().any()
        assert all(torch.count_nonzero(p.grad[e]) > 0 for e in used)
        assert torch.isfinite(p.grad).all()
    assert x.grad.abs().sum() > 0
