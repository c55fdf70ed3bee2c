"""MuonAdamW (moe_optimizer.py): Muon on an expert stack = torch.optim.Muon on each expert separately,
step for step; its AdamW groups = torch.optim.AdamW; the schedule's lr reaches Muon times lr_ratio;
make_optimizer gives Muon exactly the hidden matrices; a resumed optimizer continues identically."""

import pytest
import torch

from phase3_components.src.lr_schedules import set_learning_rate
from phase3_components.src.muon import newton_schulz
from sparse_moe_transformer.src.moe_optimizer import MuonAdamW, make_optimizer
from sparse_moe_transformer.src.train import SparseMoETransformer, preset_config
from sparse_moe_transformer.src.train_settings import TrainSettings


@pytest.fixture
def torch_muon_iterating_in(monkeypatch):
    """torch.optim.Muon always iterates in bf16, normalised after the cast; ours normalises in fp32 first
    and iterates in the machine's dtype (Phase 3's test compares the two iterations). Here torch's Muon
    gets ours in a given dtype, so the comparisons below are about the optimizer step itself."""

    def use(dtype):
        monkeypatch.setattr(
            torch.optim._muon, "_zeropower_via_newtonschulz",
            lambda grad, coefficients, steps, eps: newton_schulz(grad, steps, coefficients, eps, dtype=dtype),
        )  # fmt: skip
        return dtype

    return use


@pytest.mark.parametrize("shape", [(4, 16, 24), (4, 24, 16), (3, 20, 20)])  # wide, tall, square experts
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_muon_on_an_expert_stack_equals_torch_muon_on_each_expert_separately(
    torch_muon_iterating_in, shape, nesterov, ns_dtype
):
    torch_muon_iterating_in(ns_dtype)
    g = torch.Generator().manual_seed(0)
    stack = torch.nn.Parameter(torch.randn(*shape, generator=g))
    experts = [torch.nn.Parameter(stack.detach()[e].clone()) for e in range(shape[0])]
    ours = MuonAdamW(
        [stack], [], lr=1e-3, lr_ratio=20.0, nesterov=nesterov, muon_weight_decay=0.1, ns_dtype=ns_dtype
    )
    ref = torch.optim.Muon(experts, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov)
    for step in range(5):
        if step == 3:  # the schedule writes a new lr: Muon's is lr x lr_ratio
            set_learning_rate(ours, 5e-4)
            set_learning_rate(ref, 0.01)
        grad = torch.randn(*shape, generator=g)
        stack.grad = grad.clone()
        for e, p in enumerate(experts):
            p.grad = grad[e].clone()
        ours.step()
        ref.step()
        torch.testing.assert_close(
            stack.detach(), torch.stack([p.detach() for p in experts]), atol=1e-6, rtol=0
        )
    assert (
        stack.detach() - torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ).abs().max() > 1e-3


def test_muon_on_a_single_matrix_equals_torch_muon(torch_muon_iterating_in):
    ns_dtype = torch_muon_iterating_in(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(48, 16, generator=g))  # like a fused qkv [3C, C]
    w_ref = torch.nn.Parameter(w.detach().clone())
    ours = MuonAdamW([w], [], lr=0.02, lr_ratio=1.0, ns_dtype=ns_dtype)
    ref = torch.optim.Muon([w_ref], lr=0.02, weight_decay=0.0)
    for _ in range(4):
        w.grad = torch.randn(48, 16, generator=g)
        w_ref.grad = w.grad.clone()
        ours.step()
        ref.step()
        torch.testing.assert_close(w.detach(), w_ref.detach(), atol=1e-6, rtol=0)


def test_the_update_is_orthogonal_each_experts_singular_values_are_near_one():
    w = torch.nn.Parameter(torch.zeros(3, 16, 32))
    opt = MuonAdamW([w], [], lr=1.0, lr_ratio=1.0, momentum=0.0, nesterov=False)
    grad = torch.randn(3, 16, 32)
    grad[1] *= 1000.0  # scale does not matter: each expert is normalised on its own
    w.grad = grad
    opt.step()
    sv = torch.linalg.svdvals(-w.detach())  # [3, 16]
    assert sv.min() > 0.5 and sv.max() < 1.5  # the quintic lands in about (0.7, 1.2), not exactly 1


def test_adamw_groups_equal_torch_adamw_step_for_step():
    g = torch.Generator().manual_seed(2)
    params = [
        torch.nn.Parameter(torch.randn(8, 5, generator=g)),
        torch.nn.Parameter(torch.randn(5, generator=g)),
    ]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    groups = [{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}]
    ref_groups = [
        {"params": [ref_params[0]], "weight_decay": 0.1},
        {"params": [ref_params[1]], "weight_decay": 0.0},
    ]
    ours = MuonAdamW([], groups, lr=3e-3, lr_ratio=1.0, betas=(0.9, 0.95))
    ref = torch.optim.AdamW(ref_groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    for step in range(6):
        if step == 4:
            set_learning_rate(ours, 1e-3)
            set_learning_rate(ref, 1e-3)
        for p, q in zip(params, ref_params):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-6)


def test_make_optimizer_gives_muon_the_hidden_matrices_and_adamw_everything_else():
    model = SparseMoETransformer(preset_config("tiny"))
    s = TrainSettings(batch_size=2, grad_accum_steps=1, seq_len=16, max_steps=10, max_lr=1e-3, min_lr=1e-4,
                      warmup_steps=0, optimizer="muon", muon_lr=0.03)  # fmt: skip
    opt = make_optimizer(model, s, torch.device("cpu"))
    muon = [g for g in opt.param_groups if g["use_muon"]]
    adamw = [g for g in opt.param_groups if not g["use_muon"]]
    assert len(muon) == 1 and muon[0]["lr_ratio"] == pytest.approx(30.0)
    hidden = {id(p) for p in model.hidden_matrices()}
    assert {id(p) for p in muon[0]["params"]} == hidden and len(hidden) == 4 * model.config.n_layer
    assert {p.dim() for p in muon[0]["params"]} == {2, 3}  # attention matrices and expert stacks
    rest = [id(p) for g in adamw for p in g["params"]]
    assert len(rest) == len(set(rest)) and set(rest) == {id(p) for p in model.parameters()} - hidden
    for name in ("tok_emb.weight", "lm_head.weight", "layers.0.moe.gate.weight", "layers.0.ln1.weight"):
        assert id(dict(model.named_parameters())[name]) in set(rest)
    # the default stays AdamW (the original recipe)
    s.optimizer = "adamw"
    assert isinstance(make_optimizer(model, s, torch.device("cpu")), torch.optim.AdamW)


def test_muon_training_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = SparseMoETransformer(preset_config("tiny", pos="rope", qk_norm=True))
    s = TrainSettings(batch_size=2, grad_accum_steps=1, seq_len=16, max_steps=10, max_lr=3e-3, min_lr=3e-3,
                      warmup_steps=0, optimizer="muon")  # fmt: skip
    opt = make_optimizer(model, s, torch.device("cpu"))
    ids = torch.randint(0, 97, (4, 17))
    losses = []
    for _ in range(15):
        loss = model(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_a_reloaded_optimizer_continues_exactly_like_the_original():
    def run(reload_at):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(2, 8, 12))
        b = torch.nn.Parameter(torch.randn(12))
        make = lambda: MuonAdamW([w], [{"params": [b], "weight_decay": 0.0}], lr=1e-3, lr_ratio=10.0)  # noqa: E731
        opt = make()
        g = torch.Generator().manual_seed(1)
        for step in range(6):
            if step == reload_at:
                state = opt.state_dict()
                opt = make()
                opt.load_state_dict(state)
            w.grad, b.grad = torch.randn(2, 8, 12, generator=g), torch.randn(12, generator=g)
            opt.step()
        return w.detach().clone(), b.detach().clone()

    (w1, b1), (w2, b2) = run(reload_at=None), run(reload_at=3)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)


def test_muon_refuses_vectors():
    with pytest.raises(ValueError, match="matrices"):
        MuonAdamW([torch.nn.Parameter(torch.zeros(5))], [], lr=1e-3, lr_ratio=1.0)
