"""The model: causality, losses (LM, Switch aux, z-loss), routing statistics, dropout/training."""

import math

import pytest
import torch
import torch.nn.functional as F

from sparse_moe_transformer.src.train import (
    Config,
    SparseMoETransformer,
    load_balancing_loss,
    router_z_loss,
)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return SparseMoETransformer(Config.from_preset("tiny", **overrides)).eval()


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (2, 20), generator=g)
    t = 9
    changed = ids.clone()
    changed[:, t + 1 :] = torch.randint(0, 97, (2, 20 - t - 1), generator=g)
    assert not torch.equal(changed[:, t + 1 :], ids[:, t + 1 :])
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=0)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().amax() > 1e-3  # the later positions do change


def test_causality_through_the_gradient():
    model = tiny_model(seed=1)
    ids = torch.randint(0, 97, (1, 16))
    emb = model.tok_emb(ids).detach().requires_grad_(True)  # run from embeddings to get d logits / d input
    x = emb + model.pos_emb(torch.arange(16))
    for layer in model.layers:
        x = layer(x)
    logits = model.lm_head(model.ln_f(x))
    logits[0, 7].sum().backward()
    assert emb.grad[0, 8:].abs().max() == 0
    assert emb.grad[0, :8].abs().sum(-1).min() > 0


def test_lm_loss_is_cross_entropy_ignoring_minus_100():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 12))
    labels = torch.randint(0, 97, (2, 12))
    labels[0, :5] = -100
    out = model(ids, labels=labels)
    keep = labels != -100
    expected = -torch.log_softmax(out.logits, -1)[keep].gather(-1, labels[keep][:, None]).mean()
    torch.testing.assert_close(out.loss, expected)
    assert model(ids).loss is None
    total = out.total_loss(model.config)
    torch.testing.assert_close(total, out.loss + 0.01 * out.aux_loss + 1e-3 * out.z_loss)


def test_aux_loss_equals_its_formula_on_a_hand_built_routing():
    # 4 tokens, 2 experts, top-1 choices [0, 0, 0, 1] -> f = [3/4, 1/4]
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    topk = torch.tensor([[0], [0], [0], [1]])
    P = probs.mean(0)  # [0.65, 0.35]
    expected = 2 * (0.75 * P[0] + 0.25 * P[1])
    torch.testing.assert_close(load_balancing_loss(probs, topk, 2), expected)
    # top-2 of 3 experts: f counts every (token, slot) assignment
    probs3 = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    topk3 = torch.tensor([[0, 1], [2, 0]])
    f = torch.tensor([2, 1, 1]) / 4
    torch.testing.assert_close(load_balancing_loss(probs3, topk3, 3), 3 * (f * probs3.mean(0)).sum())


def test_aux_loss_is_one_at_perfect_balance_and_larger_when_unbalanced():
    E, N = 4, 8
    uniform = torch.full((N, E), 1 / E)
    balanced = torch.arange(N)[:, None] % E  # each expert chosen by N/E tokens
    torch.testing.assert_close(load_balancing_loss(uniform, balanced, E), torch.tensor(1.0))
    collapsed_probs = F.one_hot(torch.zeros(N, dtype=torch.long), E).float()
    assert load_balancing_loss(collapsed_probs, torch.zeros(N, 1, dtype=torch.long), E) == E


def test_z_loss_formula():
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    lse = [math.log(math.e + math.e**2 + math.e**3), math.log(3.0)]
    torch.testing.assert_close(router_z_loss(z), torch.tensor((lse[0] ** 2 + lse[1] ** 2) / 2))


def test_model_losses_and_routing_stats_per_layer():
    model = tiny_model()
    ids = torch.randint(0, 97, (3, 10))
    out = model(ids)
    assert out.logits.shape == (3, 10, 97)
    assert len(out.routing_stats) == model.config.n_layers
    per_layer_aux = [layer.moe.aux_loss for layer in model.layers]
    torch.testing.assert_close(out.aux_loss, torch.stack(per_layer_aux).mean())
    for s in out.routing_stats:
        counts = s.tokens_per_expert.float()
        assert counts.sum() == 30 * 2 and s.dropped == 0
        torch.testing.assert_close(s.load_cv, counts.std(correction=0) / counts.mean())
        assert 0 < s.router_entropy <= math.log(4) + 1e-6


def test_capacity_factor_counts_dropped_pairs():
    model = tiny_model(capacity_factor=0.5)
    out = model(torch.randint(0, 97, (2, 16)))
    for s in out.routing_stats:
        capacity = math.ceil(0.5 * 32 * 2 / 4)
        assert s.dropped == int((s.tokens_per_expert - capacity).clamp(min=0).sum()) > 0


def test_backward_reaches_every_parameter_and_dropout_is_active_in_training():
    model = tiny_model(dropout=0.2).train()
    ids = torch.randint(0, 97, (2, 12))
    out = model(ids, labels=ids)
    out.total_loss(model.config).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert model.layers[0].moe.gate.weight.grad.abs().sum() > 0  # aux and z losses reach the gate
    torch.manual_seed(0)
    a = model(ids).logits
    torch.manual_seed(1)
    b = model(ids).logits
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("attn_dropout,expected", [(None, 0.3), (0.0, 0.0), (0.1, 0.1)])
def test_attention_dropout_defaults_to_dropout_and_can_be_set_apart(attn_dropout, expected, monkeypatch):
    model = tiny_model(dropout=0.3, attn_dropout=attn_dropout).train()
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 97, (2, 12))
    model(ids)
    assert seen == [expected] * model.config.n_layers
    # the residual-branch dropouts follow `dropout` either way
    assert all(m.p == 0.3 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    model.eval()
    seen.clear()
    model(ids)
    assert seen == [0.0] * model.config.n_layers  # no dropout at inference


@pytest.mark.parametrize("T", [1, 5])
def test_cached_forward_in_chunks_equals_full_forward(T):
    from sparse_moe_transformer.src.train import KVCache

    model = tiny_model()
    ids = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config, 2)
        parts = [model(ids[:, i : i + T], cache=cache).logits for i in range(0, 15, T)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_bfloat16_autocast_runs_and_keeps_float32_gradients():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.total_loss(model.config).backward()
    w1 = model.layers[0].moe.w1
    assert w1.grad.dtype == torch.float32 and w1.grad.abs().sum() > 0
