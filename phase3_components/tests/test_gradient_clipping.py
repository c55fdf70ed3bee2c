"""clip_grad_norm equals torch.nn.utils.clip_grad_norm_: returned norm and clipped gradients."""

import pytest
import torch

from phase3_components.src.gradient_clipping import clip_grad_norm, global_grad_norm


def random_params(seed: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 7), (7,), (3, 2, 4), (1,)]
    params = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    for p in params[:-1]:  # the last one has no gradient (e.g. unused), and is skipped
        p.grad = scale * torch.randn(p.shape, generator=g, dtype=torch.float64)
    return params


def copy_with_grads(params):
    out = []
    for p in params:
        q = p.detach().clone().requires_grad_(True)
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, float("inf")])
@pytest.mark.parametrize("seed, scale, max_norm", [(0, 10.0, 1.0), (1, 0.01, 1.0), (2, 1.0, 0.5)])
def test_equal_to_torch(norm_type, seed, scale, max_norm):
    params = random_params(seed=seed, scale=scale)
    ours, ref = copy_with_grads(params), copy_with_grads(params)
    total_ours = clip_grad_norm(ours, max_norm, norm_type=norm_type)
    total_ref = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type=norm_type)
    torch.testing.assert_close(total_ours, total_ref, rtol=1e-12, atol=1e-12)
    for p, q in zip(ours, ref):
        if q.grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
    # the norm after clipping is min(before, ~max_norm)
    after = global_grad_norm(ours, norm_type)
    assert after <= max_norm + 1e-5
    if total_ours <= max_norm:  # no clipping happened: gradients untouched
        for p, p0 in zip(ours, params):
            if p0.grad is not None:
                torch.testing.assert_close(p.grad, p0.grad, rtol=1e-5, atol=0)


def test_global_norm_is_norm_of_the_concatenation():
    params = random_params(seed=0, scale=1.0)
    flat = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    torch.testing.assert_close(global_grad_norm(params), flat.norm())
    assert clip_grad_norm(random_params(1, 1.0)[-1:], 1.0) == 0.0  # nothing to clip


def test_gradient_direction_is_kept():
    params = random_params(seed=2, scale=100.0)
    before = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    clip_grad_norm(params, 1.0)
    after = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    torch.testing.assert_close(torch.nn.functional.cosine_similarity(before, after, dim=0).item(), 1.0)
    torch.testing.assert_close(after.norm().item(), 1.0, rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_norm(bad):
    params = random_params(seed=3, scale=1.0)
    params[0].grad[0, 0] = bad
    with pytest.raises(RuntimeError, match="NaN or inf"):
        clip_grad_norm(copy_with_grads(params), 1.0)  # our default: refuse, like error_if_nonfinite=True
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_norm_(copy_with_grads(params), 1.0, error_if_nonfinite=True)
    # error_if_nonfinite=False reproduces torch's default exactly (NaN/zeroed gradients)
    ours, ref = copy_with_grads(params), copy_with_grads(params)
    total_ours = clip_grad_norm(ours, 1.0, error_if_nonfinite=False)
    total_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    torch.testing.assert_close(total_ours, total_ref, equal_nan=True)
    for p, q in zip(ours, ref):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, equal_nan=True)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(random_params(0, 1.0), 0.0)
    with pytest.raises(ValueError, match="norm_type"):
        clip_grad_norm(random_params(0, 1.0), 1.0, norm_type=-1)
