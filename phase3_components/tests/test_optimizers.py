"""Our optimizers take exactly the same steps as torch.optim (float64, random problem, 25 steps)."""

import pytest
import torch

from phase3_components.src.lr_schedules import set_learning_rate, warmup_cosine_lr
from phase3_components.src.optimizers import SGD, Adam, AdamW, RMSProp, SGDMomentum

N_STEPS = 25

# (our class, torch class, keyword arguments shared by both)
CASES = [
    (SGD, torch.optim.SGD, dict(lr=0.05)),
    (SGD, torch.optim.SGD, dict(lr=0.05, weight_decay=0.1)),
    (SGDMomentum, torch.optim.SGD, dict(lr=0.02, momentum=0.9)),
    (SGDMomentum, torch.optim.SGD, dict(lr=0.02, momentum=0.8, dampening=0.3, weight_decay=0.05)),
    (SGDMomentum, torch.optim.SGD, dict(lr=0.02, momentum=0.9, nesterov=True)),
    (RMSProp, torch.optim.RMSprop, dict(lr=0.01)),
    (RMSProp, torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.1)),
    (RMSProp, torch.optim.RMSprop, dict(lr=0.005, momentum=0.7, centered=True)),
    (Adam, torch.optim.Adam, dict(lr=0.01)),
    (Adam, torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
    (AdamW, torch.optim.AdamW, dict(lr=0.01)),  # both default to weight_decay=0.01
    (AdamW, torch.optim.AdamW, dict(lr=0.01, betas=(0.9, 0.95), weight_decay=0.3)),
]


def make_problem(seed: int):
    """A small 2-layer regression net in float64, plus a frozen tensor that never gets a grad."""
    g = torch.Generator().manual_seed(seed)
    params = [
        torch.randn(6, 8, generator=g, dtype=torch.float64),  # W1
        torch.randn(8, generator=g, dtype=torch.float64),  # b1
        torch.randn(8, 3, generator=g, dtype=torch.float64),  # W2
        torch.randn(3, generator=g, dtype=torch.float64),  # frozen: not used by the loss
    ]
    for p in params:
        p.requires_grad_(True)
    data = [
        (
            torch.randn(16, 6, generator=g, dtype=torch.float64),
            torch.randn(16, 3, generator=g, dtype=torch.float64),
        )
    ]
    data += [
        (
            torch.randn(16, 6, generator=g, dtype=torch.float64),
            torch.randn(16, 3, generator=g, dtype=torch.float64),
        )
    ]
    return params, data


def loss_fn(params, x, y):
    w1, b1, w2, _frozen = params
    h = torch.tanh(x @ w1 + b1)  # [N, 8]
    return ((h @ w2 - y) ** 2).mean()


def clone_params(params):
    return [p.detach().clone().requires_grad_(True) for p in params]


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_step_for_step_equal_to_torch(ours_cls, torch_cls, kwargs):
    params, data = make_problem(seed=CASES.index((ours_cls, torch_cls, kwargs)))
    ours_params, torch_params = clone_params(params), clone_params(params)
    ours, ref = ours_cls(ours_params, **kwargs), torch_cls(torch_params, **kwargs)
    initial = [p.detach().clone() for p in ours_params]
    for step in range(N_STEPS):
        x, y = data[step % 2]  # alternate mini-batches so gradients change direction
        for opt, ps in ((ours, ours_params), (ref, torch_params)):
            opt.zero_grad()
            loss_fn(ps, x, y).backward()
            opt.step()
        for p_ours, p_ref in zip(ours_params, torch_params):
            torch.testing.assert_close(p_ours, p_ref, rtol=1e-9, atol=1e-9, msg=f"step {step}")
    # the parameters did move (the comparison is not vacuous), except the frozen one
    assert all(not torch.allclose(p, p0) for p, p0 in zip(ours_params[:3], initial[:3]))
    assert torch.equal(ours_params[3], initial[3]) and ours_params[3].grad is None


@pytest.mark.parametrize(
    "ours_cls, torch_cls, kwargs", [CASES[2], CASES[7], CASES[11]], ids=["momentum", "rms", "adamw"]
)
def test_equal_to_torch_with_a_changing_learning_rate(ours_cls, torch_cls, kwargs):
    params, data = make_problem(seed=3)
    ours_params, torch_params = clone_params(params), clone_params(params)
    ours, ref = ours_cls(ours_params, **kwargs), torch_cls(torch_params, **kwargs)
    for step in range(N_STEPS):
        lr = warmup_cosine_lr(
            step, max_lr=kwargs["lr"], min_lr=kwargs["lr"] / 10, warmup_steps=5, total_steps=20
        )
        x, y = data[step % 2]
        for opt, ps in ((ours, ours_params), (ref, torch_params)):
            set_learning_rate(opt, lr)
            opt.zero_grad()
            loss_fn(ps, x, y).backward()
            opt.step()
    for p_ours, p_ref in zip(ours_params, torch_params):
        torch.testing.assert_close(p_ours, p_ref, rtol=1e-9, atol=1e-9)


def test_adam_first_step_moves_every_coordinate_by_about_lr():
    # bias correction: m_hat = g, v_hat = g^2 at t = 1, so the step is lr * g / (|g| + eps) ~ lr * sign(g)
    p = torch.randn(100, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    start = p.detach().clone()
    opt = Adam([p], lr=0.01)
    (p**3).sum().backward()
    g = p.grad.clone()  # 3 p^2
    opt.step()
    step = (start - p.detach()).abs()
    torch.testing.assert_close(step, 0.01 * g.abs() / (g.abs() + 1e-8), rtol=1e-10, atol=0)
    assert (step[g.abs() > 1e-3] > 0.0099).all()  # ~lr, whatever the gradient's size


def test_adamw_decay_is_decoupled_from_the_gradient_scale():
    # with a zero gradient, AdamW still shrinks weights by (1 - lr * wd); Adam's L2 decay goes
    # through the adaptive scaling instead and moves every weight by ~lr, whatever its size
    p1 = torch.tensor([10.0, 0.1], dtype=torch.float64, requires_grad=True)
    p2 = p1.detach().clone().requires_grad_(True)
    adamw, adam = AdamW([p1], lr=0.1, weight_decay=0.5), Adam([p2], lr=0.1, weight_decay=0.5)
    for p, opt in ((p1, adamw), (p2, adam)):
        p.grad = torch.zeros_like(p)
        opt.step()
    torch.testing.assert_close(p1.detach(), torch.tensor([10.0 * 0.95, 0.1 * 0.95], dtype=torch.float64))
    torch.testing.assert_close(
        p2.detach(), torch.tensor([10.0 - 0.1, 0.1 - 0.1], dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_zero_grad_and_bad_arguments():
    p = torch.ones(3, requires_grad=True)
    opt = SGD([p], lr=0.1)
    p.sum().backward()
    opt.zero_grad(set_to_none=False)
    assert torch.equal(p.grad, torch.zeros(3))
    opt.zero_grad()
    assert p.grad is None
    with pytest.raises(ValueError, match="lr"):
        SGD([p], lr=-1.0)
    with pytest.raises(ValueError, match="empty"):
        Adam([], lr=0.1)
    with pytest.raises(TypeError, match="iterable"):
        Adam(p, lr=0.1)
    with pytest.raises(ValueError, match=r"beta2 must be a finite number >= 0 and < 1, got 1.0"):
        Adam([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got nan"):
        Adam([p], lr=float("nan"))
    with pytest.raises(ValueError, match="dampening must be a finite number >= 0 and <= 1, got 1.5"):
        SGDMomentum([p], dampening=1.5)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0 and < 1, got 1"):
        RMSProp([p], alpha=1)
    with pytest.raises(ValueError, match="Nesterov"):
        SGDMomentum([p], momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0, got -0.1"):
        AdamW([p], weight_decay=-0.1)
