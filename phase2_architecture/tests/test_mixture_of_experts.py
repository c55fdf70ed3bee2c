"""The MoE lesson: router, three dispatches proven equal (forward and gradients), capacity, aux losses,
balancing by a routing bias."""

import math

import pytest
import torch

from phase2_architecture.src.feed_forward import gelu
from phase2_architecture.src.mixture_of_experts import (
    MoEConfig,
    MoEFeedForward,
    MoELanguageModel,
    capacity_keep_mask,
    expert_capacity,
    expert_forward,
    load_balancing_loss,
    moe_ffn_loop_reference,
    moe_ffn_per_token,
    moe_ffn_sorted,
    route_top_k,
    route_with_bias,
    router_z_loss,
    routing_losses,
    tokens_per_expert,
    train_moe_language_model,
    update_balance_bias,
)


def make_params(N=24, C=12, Fh=20, E=6, skew=0.0, seed=0, dtype=torch.float64):
    """Random inputs and expert weights; `skew` biases the router towards the first experts."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * std).requires_grad_()

    x = rand(N, C)
    gate_weight = rand(E, C, std=0.5)
    gate_bias = (-skew * torch.arange(E, dtype=dtype)).requires_grad_()
    w1, b1 = rand(E, C, Fh, std=0.3), rand(E, Fh, std=0.1)
    w2, b2 = rand(E, Fh, C, std=0.3), rand(E, C, std=0.1)
    return [x, gate_weight, gate_bias, w1, b1, w2, b2]


def output_and_grads(fn, params, top_k, capacity=None):
    out = fn(*params, top_k, capacity=capacity)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return out, torch.autograd.grad(out, params, g, allow_unused=True)


def test_route_top_k_picks_the_largest_logits_and_softmaxes_only_them():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.0, 0.0, 5.0, 4.0]])
    weights, indices = route_top_k(logits, 2)
    assert indices.tolist() == [[1, 2], [2, 3]]
    e = math.exp(1.0)
    assert weights.flatten().tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)] * 2)  # of (3,2), (5,4)
    logits = torch.randn(50, 8)
    weights, indices = route_top_k(logits, 3)
    assert torch.allclose(weights.sum(-1), torch.ones(50))
    assert torch.equal(logits.gather(1, indices), logits.topk(3, dim=-1).values)
    with pytest.raises(ValueError, match="top_k"):
        route_top_k(logits, 9)
    with pytest.raises(ValueError, match=r"\[N, E\]"):
        route_top_k(logits[0], 1)


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
def test_loop_and_sorted_dispatch_equal_the_per_token_formula_forward_and_gradients(skew, capacity_factor, k):
    params = make_params(skew=skew)
    N, E = params[0].shape[0], params[3].shape[0]
    capacity = expert_capacity(N, k, E, capacity_factor)
    ref, ref_grads = output_and_grads(moe_ffn_per_token, params, k, capacity)
    for fn in (moe_ffn_loop_reference, moe_ffn_sorted):
        out, grads = output_and_grads(fn, params, k, capacity)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for name, got, want in zip(
            ["x", "gate_weight", "gate_bias", "w1", "b1", "w2", "b2"], grads, ref_grads
        ):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{fn.__name__}: d{name}")
    if skew == 3.0 and capacity is None:  # the skewed router leaves experts empty: the slices skip them
        _, indices = route_top_k(params[0] @ params[1].t() + params[2], k)
        assert len(indices.unique()) < E


def test_the_gate_learns_through_the_routing_weights():
    params = make_params()
    _, grads = output_and_grads(moe_ffn_sorted, params, 2)
    assert grads[1].abs().sum() > 0 and grads[2].abs().sum() > 0
    _, grads = output_and_grads(moe_ffn_sorted, params, 1)  # top-1: weight softmax(one logit) = 1
    assert grads[1] is None or grads[1].abs().sum() == 0


def test_capacity_drops_the_latest_pairs_in_slot_major_order():
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])  # expert 0 chosen 4 times, 3 as first choice
    keep = capacity_keep_mask(indices, n_expert=3, capacity=2)
    # queue: first choices 0, 0, 0, 1 then second choices 1, 2, 1, 0. Expert 0 keeps tokens 0, 1;
    # expert 1 keeps token 3 (first choice) and token 0 (second choice), drops token 2's second choice.
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]
    assert capacity_keep_mask(indices, 3, None).all()
    assert expert_capacity(n_tokens=10, top_k=2, n_expert=4, capacity_factor=1.0) == 5
    assert expert_capacity(10, 2, 4, 1.25) == 7  # ceil(6.25)
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(10, 2, 4, 0.0)


def test_a_token_whose_pairs_are_all_dropped_gets_zero_output():
    params = make_params(skew=5.0)  # every token prefers experts 0 and 1
    with torch.no_grad():
        out = moe_ffn_sorted(*params, 2, capacity=3)
        _, indices = route_top_k(params[0] @ params[1].t() + params[2], 2)
    keep = capacity_keep_mask(indices, 6, 3)
    dropped_tokens = ~keep.any(-1)
    assert dropped_tokens.sum() > 10
    assert torch.equal(out[dropped_tokens], torch.zeros_like(out[dropped_tokens]))
    assert (out[~dropped_tokens].abs().sum(-1) > 0).all()


def test_load_balancing_loss_is_one_when_balanced_and_E_when_collapsed():
    E = 4
    uniform = torch.full((8, E), 1 / E)
    assert load_balancing_loss(uniform, torch.full((E,), 5)).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, E)
    collapsed[:, 2] = 1.0
    assert load_balancing_loss(collapsed, torch.tensor([0, 0, 16, 0])).item() == pytest.approx(E)
    # by hand: f = (3, 1) / 4, P = column means of probs
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5]], requires_grad=True)
    loss = load_balancing_loss(probs, torch.tensor([3, 1]))
    assert loss.item() == pytest.approx(2 * (0.75 * 0.7 + 0.25 * 0.3))
    (grad,) = torch.autograd.grad(loss, probs)
    torch.testing.assert_close(grad, torch.tensor([[0.75, 0.25], [0.75, 0.25]]))  # d/dprobs = E * f / N
    with pytest.raises(ValueError, match="expert_counts"):
        load_balancing_loss(probs, torch.tensor([1, 2, 3]))


def test_balancing_loss_pushes_probability_away_from_the_overused_expert():
    logits = torch.tensor([[2.0, 0.0, 0.0]] * 6, requires_grad=True)
    loss, _, counts = routing_losses(logits, top_k=1)
    assert counts.tolist() == [6, 0, 0]
    loss.backward()
    assert (logits.grad[:, 0] > 0).all() and (
        logits.grad[:, 1:] < 0
    ).all()  # gradient descent lowers expert 0


def test_router_z_loss_by_hand_and_it_grows_with_the_logits():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])  # logsumexp: log 4, 1 + log 2
    expected = (math.log(4.0) ** 2 + (1 + math.log(2.0)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)
    assert router_z_loss(10 * logits) > router_z_loss(logits)


def test_moe_language_model_is_causal_and_reports_gate_logits():
    torch.manual_seed(0)
    config = MoEConfig(
        vocab_size=13, block_size=10, n_layer=2, n_head=2, d_model=16, n_expert=4, top_k=2, d_ff=24
    )
    model = MoELanguageModel(config)
    idx = torch.randint(0, 13, (2, 10))
    logits, loss, gate_logits = model(idx, idx)
    assert logits.shape == (2, 10, 13) and loss.item() == pytest.approx(math.log(13), abs=0.3)
    assert [z.shape for z in gate_logits] == [(20, 4), (20, 4)]
    changed = idx.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 13
    logits2, _, _ = model(changed)
    torch.testing.assert_close(logits2[:, :6], logits[:, :6], rtol=0, atol=0)
    assert not torch.allclose(logits2[:, 6:], logits[:, 6:])
    table = tokens_per_expert(model, idx)
    assert table.shape == (4, 13) and table.sum().item() == idx.numel()


def test_moe_layer_uses_the_sorted_dispatch_with_its_parameters():
    torch.manual_seed(0)
    layer = MoEFeedForward(d_model=8, d_ff=16, n_expert=4, top_k=2, capacity_factor=1.0)
    x = torch.randn(3, 5, 8)
    y, gate_logits = layer(x)
    flat = x.reshape(-1, 8)
    expected = moe_ffn_per_token(
        flat, layer.gate.weight, layer.gate.bias, layer.w1, layer.b1, layer.w2, layer.b2, 2, capacity=8
    )  # ceil(1.0 * 15 * 2 / 4) = 8
    torch.testing.assert_close(y.reshape(-1, 8), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gate_logits, layer.gate(flat))


def test_an_expert_is_the_exact_erf_gelu_ffn_of_the_production_model():
    x, _, _, w1, b1, w2, b2 = make_params()
    expected = gelu(x @ w1[2] + b1[2], approximate="none") @ w2[2] + b2[2]  # Phase 2's erf GELU
    got = expert_forward(x, w1[2], b1[2], w2[2], b2[2])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Balancing without an auxiliary loss: a bias on the routing scores, for the choice only
# ---------------------------------------------------------------------------------------------


def test_the_balance_bias_changes_the_choice_but_not_the_weights():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, generator=g, dtype=torch.float64)  # [N, E]
    bias = torch.randn(8, generator=g, dtype=torch.float64) * 2.0  # [E] large enough to change choices
    weights, indices = route_with_bias(logits, bias, 3)
    _, unbiased_indices = route_top_k(logits, 3)
    moved = not torch.equal(indices.sort(-1).values, unbiased_indices.sort(-1).values)
    assert moved, "the bias must change some choices"
    for n in range(64):  # the choice, by hand: the 3 largest biased scores
        by_hand = sorted(range(8), key=lambda e: -(logits[n, e] + bias[e]).item())[:3]
        assert sorted(indices[n].tolist()) == sorted(by_hand)
    chosen = logits.gather(1, indices)  # [N, 3] the UNBIASED logits of the chosen experts
    expected = chosen.exp() / chosen.exp().sum(-1, keepdim=True)
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=1e-12)


def test_a_zero_bias_is_plain_top_k_and_a_shared_shift_changes_nothing():
    logits = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    weights, indices = route_top_k(logits, 2)
    for bias in (torch.zeros(6), torch.full((6,), 5.0)):
        w, i = route_with_bias(logits, bias, 2)
        assert torch.equal(i, indices)
        torch.testing.assert_close(w, weights, rtol=0, atol=0)


def test_route_with_bias_names_bad_shapes_and_top_k():
    logits = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="balance_bias must be"):
        route_with_bias(logits, torch.zeros(5), 2)
    with pytest.raises(ValueError, match="top_k must be"):
        route_with_bias(logits, torch.zeros(6), 7)
    with pytest.raises(ValueError, match="gate_logits must be"):
        route_with_bias(torch.zeros(6), torch.zeros(6), 2)


def test_update_balance_bias_steps_towards_the_mean_load_by_hand():
    bias = torch.tensor([0.5, 0.0, -0.5, 0.25])
    load = torch.tensor([5, 1, 3, 3])  # mean 3: expert 0 over-loaded, 1 under-loaded, 2 and 3 at the mean
    new = update_balance_bias(bias, load, 0.01)
    torch.testing.assert_close(new, torch.tensor([0.49, 0.01, -0.5, 0.25]), rtol=0, atol=1e-7)
    torch.testing.assert_close(bias, torch.tensor([0.5, 0.0, -0.5, 0.25]))  # the input is not changed
    fractions = load / load.sum()  # only the sign counts: fractions give the same step as counts
    torch.testing.assert_close(update_balance_bias(bias, fractions, 0.01), new)


def test_update_balance_bias_names_bad_input():
    with pytest.raises(ValueError, match="both be \\[E\\]"):
        update_balance_bias(torch.zeros(4), torch.zeros(3), 0.01)
    for step in (0.0, -1e-3, True, "0.01"):
        with pytest.raises(ValueError, match="step_size must be a number > 0"):
            update_balance_bias(torch.zeros(4), torch.ones(4), step)


@pytest.mark.parametrize("seed", range(5))
def test_the_bias_balances_a_skewed_router_within_150_steps(seed):
    """A fixed router whose logits favour expert e by 2e/7 (expert 7 by 2.0 over expert 0), 8 experts, top-2.

    At step 0 the favourite takes over twice its share. The bias must cancel the skew: about +-1
    around its mean, so at u = 0.01 per step it needs at least 100 steps; from step 150 on every
    expert's load stays within 20% of the mean, and the bias has learnt minus the skew.
    """
    E, k, N, u = 8, 2, 4096, 0.01
    skew = torch.linspace(0, 2, E)  # [E]
    g = torch.Generator().manual_seed(seed)
    bias = torch.zeros(E)
    deviation = []
    for _ in range(300):
        logits = torch.randn(N, E, generator=g) + skew  # [N, E] fresh tokens every step
        _, indices = route_with_bias(logits, bias, k)
        load = torch.bincount(indices.reshape(-1), minlength=E).float()  # [E]
        deviation.append(((load / load.mean()) - 1).abs().max().item())
        bias = update_balance_bias(bias, load, u)
    assert deviation[0] > 1.0, "the toy router must start skewed"
    assert max(deviation[150:]) < 0.2
    torch.testing.assert_close(bias - bias.mean(), -(skew - skew.mean()), rtol=0, atol=0.15)


def reference_moe_with_bias(x, layer):
    """Token by token: the k largest (logit + bias) choose, the softmax of the unbiased logits weighs."""
    rows = []
    for x_n in x:
        z = layer.gate(x_n)  # [E]
        chosen = sorted(range(layer.n_expert), key=lambda e: -(z[e] + layer.balance_bias[e]).item())
        chosen = chosen[: layer.top_k]
        w = torch.softmax(z[chosen], dim=0)  # [k]
        rows.append(
            sum(
                w[j] * expert_forward(x_n, layer.w1[e], layer.b1[e], layer.w2[e], layer.b2[e])
                for j, e in enumerate(chosen)
            )
        )
    return torch.stack(rows)


def test_the_moe_layer_chooses_with_its_balance_bias_and_weighs_without_it():
    torch.manual_seed(0)
    layer = MoEFeedForward(d_model=8, d_ff=16, n_expert=4, top_k=2).double()
    x = torch.randn(20, 8, dtype=torch.float64)
    _, plain = route_top_k(layer.gate(x), 2)
    layer.balance_bias.copy_(torch.tensor([0.0, 3.0, 0.0, -3.0]))  # push towards expert 1, away from 3
    y, _ = layer(x)
    torch.testing.assert_close(y, reference_moe_with_bias(x, layer), rtol=1e-12, atol=1e-12)
    _, biased = route_with_bias(layer.gate(x), layer.balance_bias, 2)
    assert (biased == 1).any(-1).all() and not (biased == 3).any() and (plain == 3).any()
    assert "balance_bias" in layer.state_dict() and not layer.balance_bias.requires_grad


def test_training_with_bias_step_moves_each_bias_by_the_step_or_not_at_all():
    config = MoEConfig(
        vocab_size=11, block_size=8, n_layer=2, n_head=2, d_model=16, n_expert=4, top_k=2, d_ff=16
    )
    g = torch.Generator().manual_seed(0)

    def get_batch(split):
        x = torch.randint(0, 11, (4, 8), generator=g)
        return x, x.roll(-1, dims=1)

    model, history = train_moe_language_model(config, get_batch, steps=6, aux_coef=0.0, bias_step=0.05)
    previous = torch.zeros(4)
    for h in history:
        step = (h["bias"] - previous).abs()  # [E]
        assert torch.all((step < 1e-6) | ((step - 0.05).abs() < 1e-6)), "each bias moves by 0 or the step"
        # the update follows that step's load: over-loaded experts go down, under-loaded up
        # (loads are counts / 64, exact in binary, so an expert exactly at the mean stays put)
        expected = previous + 0.05 * torch.sign(h["load"].mean() - h["load"])
        torch.testing.assert_close(h["bias"], expected, rtol=0, atol=1e-6)
        previous = h["bias"]
    assert previous.abs().sum() > 0
    assert all(block.moe.balance_bias.abs().sum() > 0 for block in model.blocks)
    _, off = train_moe_language_model(config, get_batch, steps=2, aux_coef=0.0)
    assert all(torch.equal(h["bias"], torch.zeros(4)) for h in off)


def test_routing_losses_count_the_choice_the_bias_makes():
    logits = torch.randn(30, 5, generator=torch.Generator().manual_seed(2))
    bias = torch.tensor([10.0, 0.0, 0.0, 0.0, -10.0])  # every token's first choice: expert 0; none: 4
    _, _, counts = routing_losses(logits, 2, bias)
    assert counts[0] == 30 and counts[4] == 0 and counts.sum() == 60
    _, _, plain = routing_losses(logits, 2)
    assert plain[4] > 0
