"""Sparsity: top_k of n_experts run per token, weights form a distribution, idle experts get 0 grad."""

import torch

from sparse_moe_transformer.src.train import Config, SparseMoEFFN


def t1000_sized_moe_layer(d_model=64, d_ff=96):
    """A layer with the t1000 routing (16 experts, top-2) at a small width, to stay fast."""
    cfg = Config.from_preset("t1000", d_model=d_model, n_heads=8, d_ff=d_ff)
    assert (cfg.n_experts, cfg.top_k) == (16, 2)
    return SparseMoEFFN(cfg)


def test_each_token_activates_exactly_2_of_16_experts():
    torch.manual_seed(0)
    moe = t1000_sized_moe_layer()
    x = torch.randn(3, 50, 64)
    moe(x)
    r = moe.last_routing
    N = 150
    # every token appears in exactly 2 (token, expert) pairs, with 2 distinct experts
    assert torch.equal(torch.bincount(r.token_index, minlength=N), torch.full((N,), 2))
    assert (r.topk_index[:, 0] != r.topk_index[:, 1]).all()
    assert r.token_index.numel() == 2 * N and r.dropped == 0
    used_per_token = torch.zeros(N, 16).index_put_((r.token_index, r.expert_index), torch.ones(2 * N))
    assert torch.equal(used_per_token.sum(1), torch.full((N,), 2.0))
    idle_fraction = 1 - used_per_token.sum(1) / 16
    assert torch.allclose(idle_fraction, torch.tensor(0.875))  # 87.5% of the expert parameters idle


def test_routing_weights_are_positive_and_sum_to_one():
    torch.manual_seed(1)
    moe = t1000_sized_moe_layer()
    x = torch.randn(200, 64) * 3
    moe(x)
    w = moe.last_routing.topk_weight  # [N, 2]
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(200))
    # they are the softmax over the two selected gate logits, the larger logit first
    top2 = torch.topk(moe.gate(x), 2, dim=-1).values  # [N, 2]
    torch.testing.assert_close(w, torch.softmax(top2, dim=-1))
    assert (w[:, 0] >= w[:, 1]).all()


def test_an_expert_no_token_chose_gets_exactly_zero_gradient():
    torch.manual_seed(2)
    moe = t1000_sized_moe_layer()
    with torch.no_grad():
        moe.gate.bias[5] = -1e4  # nobody picks expert 5
        moe.b1.normal_(), moe.b2.normal_()
    x = torch.randn(100, 64, requires_grad=True)
    moe(x).square().sum().backward()
    assert moe.stats.tokens_per_expert[5] == 0
    for p in (moe.w1, moe.b1, moe.w2, moe.b2):
        assert torch.count_nonzero(p.grad[5]) == 0
        used = moe.stats.tokens_per_expert > 0
        assert all(torch.count_nonzero(p.grad[e]) > 0 for e in torch.nonzero(used).flatten().tolist())
    assert x.grad.abs().sum() > 0
