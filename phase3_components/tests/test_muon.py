"""Muon equals torch.optim.Muon step for step; Newton–Schulz orthogonalises; the GPT is split correctly."""

import pytest
import torch

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase3_components.src.muon import NS_COEFFICIENTS, Muon, muon_and_adamw_groups, newton_schulz


@pytest.mark.parametrize("shape", [(8, 16), (16, 8), (12, 12), (1, 5)])
@pytest.mark.parametrize("nesterov,weight_decay", [(True, 0.1), (False, 0.0), (True, 0.0)])
@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_muon_equals_torch_muon_step_for_step(monkeypatch, shape, nesterov, weight_decay, ns_dtype):
    # torch.optim.Muon always iterates in bf16 and normalises after the cast; ours normalises in fp32
    # first and iterates in the machine's dtype. Given the same orthogonalisation, the steps are equal
    # to float rounding: torch's is replaced by ours here (its own is compared in the next test).
    monkeypatch.setattr(
        torch.optim._muon, "_zeropower_via_newtonschulz",
        lambda grad, coefficients, steps, eps: newton_schulz(grad, steps, coefficients, eps, dtype=ns_dtype),
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    ours_p = torch.randn(*shape, generator=g).requires_grad_()
    theirs_p = ours_p.detach().clone().requires_grad_()
    ours = Muon(
        [ours_p], lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay, ns_dtype=ns_dtype
    )
    theirs = torch.optim.Muon([theirs_p], lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay)
    for step in range(25):
        grad = torch.randn(*shape, generator=g)
        ours_p.grad, theirs_p.grad = grad.clone(), grad.clone()
        if step == 12:  # a schedule may change the learning rate between steps
            ours.lr = theirs.param_groups[0]["lr"] = 0.005
        ours.step()
        theirs.step()
        torch.testing.assert_close(ours_p, theirs_p, rtol=0, atol=1e-6)
    assert not torch.equal(ours_p, torch.randn(*shape, generator=torch.Generator().manual_seed(0)))


def test_newton_schulz_in_bf16_is_torch_muons_iteration_up_to_where_it_normalises():
    G = torch.randn(48, 80, generator=torch.Generator().manual_seed(4))
    theirs = torch.optim._muon._zeropower_via_newtonschulz(G, NS_COEFFICIENTS, 5, 1e-7).float()
    ours = newton_schulz(G, dtype=torch.bfloat16).float()
    assert ((ours - theirs).norm() / theirs.norm()).item() < 0.02  # bf16 rounding of the norm, no more


# Relative Frobenius error of 5 steps against float64, measured on random matrices (~0.013 bf16, ~0.0017
# fp16, ~1e-7 fp32), with headroom; fp16 would reach ~0.02-0.04 on 1e-6 gradients if cast before scaling.
NS_ERROR_BOUND = {torch.float32: 1e-5, torch.bfloat16: 0.03, torch.float16: 0.005}


@pytest.mark.parametrize("dtype", list(NS_ERROR_BOUND))
@pytest.mark.parametrize("scale", [1.0, 1e-6])
@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (4, 96, 96)])
def test_newton_schulz_in_every_dtype_it_may_pick_agrees_with_float64(dtype, scale, shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    reference = newton_schulz(G, dtype=torch.float64)
    got = newton_schulz((scale * G).float(), dtype=dtype)
    assert got.dtype == dtype and got.shape == G.shape
    error = ((got.double() - reference).norm() / reference.norm()).item()
    assert error < NS_ERROR_BOUND[dtype], f"{dtype} at scale {scale}: relative error {error:.4f}"


def test_newton_schulz_orthogonalises_each_matrix_of_a_stack_on_its_own():
    G = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    G[1] *= 1e3  # one matrix's scale must not leak into the others
    stacked = newton_schulz(G, dtype=torch.float64)
    for i in range(3):
        torch.testing.assert_close(
            stacked[i], newton_schulz(G[i], dtype=torch.float64), rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
def test_newton_schulz_keeps_singular_vectors_and_pushes_singular_values_towards_one(shape):
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g, dtype=torch.float64))
    k = min(shape)
    S = torch.logspace(0, -2, k, dtype=torch.float64)  # singular values over two orders of magnitude
    G = U[:, :k] @ torch.diag(S) @ V[:, :k].T
    O = newton_schulz(G, dtype=torch.float64)
    rotated = U[:, :k].T @ O @ V[:, :k]  # = diag(S') if O keeps G's singular vectors
    new_values = torch.diagonal(rotated)
    torch.testing.assert_close(rotated, torch.diag(new_values), rtol=0, atol=1e-10)
    assert new_values.min() > 0.6 and new_values.max() < 1.25  # a 100x spread squeezed to < 2x
    assert (torch.linalg.svdvals(O) > 0.6).all()


def test_one_step_applies_the_quintic_to_each_singular_value():
    """X -> a X + b (X Xᵀ) X + c (X Xᵀ)² X  is  s -> a s + b s³ + c s⁵  on every singular value."""
    G = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    s = torch.linalg.svdvals(G / G.norm())
    a, b, c = NS_COEFFICIENTS
    expected = a * s + b * s**3 + c * s**5
    got = torch.linalg.svdvals(newton_schulz(G, steps=1, dtype=torch.float64))
    torch.testing.assert_close(got.sort().values, expected.abs().sort().values, rtol=1e-10, atol=1e-12)


def test_muon_rejects_vectors_and_the_gpt_split_puts_only_block_matrices_in_muon():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="momentum must be a finite number >= 0 and < 1, got 1.0"):
        Muon([torch.zeros(2, 2, requires_grad=True)], momentum=1.0)
    with pytest.raises(ValueError, match="ns_steps must be a positive integer, got 0"):
        Muon([torch.zeros(2, 2, requires_grad=True)], ns_steps=0)
    with pytest.raises(ValueError, match="orthogonalises a matrix"):
        newton_schulz(torch.zeros(2))
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, d_model=16, tie_weights=False))
    muon, adamw = muon_and_adamw_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in muon} == {
        f"blocks.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj")
        + ("ffn.up_proj", "ffn.down_proj")
    }
    adamw_names = {names[id(p)] for p in adamw}
    assert {"tok_emb.weight", "pos_emb.weight", "lm_head.weight", "ln_f.weight"} <= adamw_names
    assert len(muon) + len(adamw) == len(list(model.parameters()))
