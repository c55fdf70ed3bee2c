"""The model: causality, losses (LM, Switch aux, z-loss), routing statistics, dropout/training."""

import math

import pytest
import torch
import torch.nn.functional as F

from sparse_moe_transformer.src.train import (
    SparseMoETransformer,
    load_balancing_loss,
    moe_losses,
    preset_config,
    router_z_loss,
)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return SparseMoETransformer(preset_config("tiny", **overrides)).eval()


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
        x, _, _ = layer(x)
    logits = model.lm_head(model.ln_f(x))
    logits[0, 7].sum().backward()
    assert emb.grad[0, 8:].abs().max() == 0
    assert emb.grad[0, :8].abs().sum(-1).min() > 0


def test_lm_loss_is_cross_entropy_ignoring_minus_100():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 12))
    labels = torch.randint(0, 97, (2, 12))
    labels[0, :5] = -100
    out = model(ids, targets=labels)
    keep = labels != -100
    expected = -torch.log_softmax(out.logits, -1)[keep].gather(-1, labels[keep][:, None]).mean()
    torch.testing.assert_close(out.loss, expected)
    assert model(ids).loss is None
    losses = moe_losses(out, model.config)
    torch.testing.assert_close(losses.lm, out.loss)
    torch.testing.assert_close(losses.total, out.loss + 0.01 * losses.aux + 1e-3 * losses.z)
    with pytest.raises(ValueError, match="needs the LM loss"):
        moe_losses(model(ids), model.config)


def test_aux_loss_equals_its_formula_on_a_hand_built_routing():
    # 4 tokens, 2 experts, top-1 choices [0, 0, 0, 1] -> counts [3, 1], f = [3/4, 1/4]
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    P = probs.mean(0)  # [0.65, 0.35]
    expected = 2 * (0.75 * P[0] + 0.25 * P[1])
    torch.testing.assert_close(load_balancing_loss(probs, torch.tensor([3, 1])), expected)
    # top-2 of 3 experts, choices [[0, 1], [2, 0]]: f counts every (token, slot) assignment
    probs3 = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    f = torch.tensor([2, 1, 1]) / 4
    expected3 = 3 * (f * probs3.mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss(probs3, torch.tensor([2, 1, 1])), expected3)


def test_aux_loss_is_one_at_perfect_balance_and_larger_when_unbalanced():
    E, N = 4, 8
    uniform = torch.full((N, E), 1 / E)
    balanced = torch.full((E,), N // E)  # each expert chosen by N/E tokens
    torch.testing.assert_close(load_balancing_loss(uniform, balanced), torch.tensor(1.0))
    collapsed_probs = F.one_hot(torch.zeros(N, dtype=torch.long), E).float()
    assert load_balancing_loss(collapsed_probs, torch.tensor([N, 0, 0, 0])) == E


def test_z_loss_formula():
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    lse = [math.log(math.e + math.e**2 + math.e**3), math.log(3.0)]
    torch.testing.assert_close(router_z_loss(z), torch.tensor((lse[0] ** 2 + lse[1] ** 2) / 2))


def test_moe_losses_are_the_mean_over_layers_of_each_layers_losses():
    model = tiny_model()
    ids = torch.randint(0, 97, (3, 10))
    out = model(ids, ids)
    assert out.logits.shape == (3, 10, 97)
    assert len(out.router_logits) == len(out.routing) == model.config.n_layer
    aux, z = [], []
    for gate_logits, routing in zip(out.router_logits, out.routing):
        assert gate_logits.shape == (30, 4)
        counts = torch.bincount(routing.topk_index.flatten(), minlength=4)  # [E] pairs per expert
        assert torch.equal(routing.routed_counts, counts) and counts.sum() == 30 * 2 and routing.dropped == 0
        aux.append(load_balancing_loss(torch.softmax(gate_logits, -1), counts))
        z.append(router_z_loss(gate_logits))
    losses = moe_losses(out, model.config)
    torch.testing.assert_close(losses.aux, torch.stack(aux).mean())
    torch.testing.assert_close(losses.z, torch.stack(z).mean())
    # a count reducer (what DDP's all_reduce does) changes f, so the balance loss, and nothing else
    doubled_other_half = moe_losses(out, model.config, reduce_counts=lambda c: c + c.flip(0))
    torch.testing.assert_close(doubled_other_half.z, losses.z)
    assert not torch.allclose(doubled_other_half.aux, losses.aux)


def test_capacity_factor_counts_dropped_pairs():
    model = tiny_model(capacity_factor=0.5)
    out = model(torch.randint(0, 97, (2, 16)))
    for routing in out.routing:
        capacity = math.ceil(0.5 * 32 * 2 / 4)
        assert routing.dropped == int((routing.routed_counts - capacity).clamp(min=0).sum()) > 0


def test_backward_reaches_every_parameter_and_dropout_is_active_in_training():
    model = tiny_model(dropout=0.2).train()
    ids = torch.randint(0, 97, (2, 12))
    out = model(ids, targets=ids)
    moe_losses(out, model.config).total.backward()
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
    assert seen == [expected] * model.config.n_layer
    # the residual-branch dropouts follow `dropout` either way
    assert all(m.p == 0.3 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    model.eval()
    seen.clear()
    model(ids)
    assert seen == [0.0] * model.config.n_layer  # no dropout at inference


def test_bfloat16_autocast_runs_and_keeps_float32_gradients():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, targets=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    moe_losses(out, model.config).total.backward()
    w1 = model.layers[0].moe.w1
    assert w1.grad.dtype == torch.float32 and w1.grad.abs().sum() > 0
