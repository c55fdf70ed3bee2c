"""LoRA: identity at init, merge == unmerged adapter, unmerge restores, counts, only LoRA gets grads."""

import copy

import pytest
import torch
import torch.nn as nn

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase4_training.src.lora import (
    LoRALinear,
    count_parameters,
    inject_lora,
    lora_parameter_count,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    unmerge_lora,
)

TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, d_model=32))


def randomise_lora_b(model: nn.Module, seed: int = 1) -> None:
    """Give B non-zero values so that the adapter actually changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_lora_linear_matches_explicit_formula():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 5, 12)
    # h = x W0^T + b + (alpha / r) * x A^T B^T, written independently with einsum
    expected = (
        torch.einsum("bti,oi->bto", x, base.weight)
        + base.bias
        + 2.0 * torch.einsum("btr,or->bto", torch.einsum("bti,ri->btr", x, layer.lora_A), layer.lora_B)
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_A) > 0  # A is random, B started at zero


def test_zero_b_wrapped_model_equals_original():
    model = tiny_gpt()
    original = copy.deepcopy(model)
    wrapped = inject_lora(model, TARGETS, rank=4, alpha=8)
    assert len(wrapped) == 2 * len(TARGETS)
    idx = torch.randint(0, 23, (3, 16))
    model.eval()
    original.eval()
    torch.testing.assert_close(model(idx)[0], original(idx)[0], rtol=0, atol=0)


def test_merge_equals_unmerged_and_unmerge_restores_base_weights():
    model = tiny_gpt()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, TARGETS, rank=4, alpha=8)
    randomise_lora_b(model)
    model.eval()
    idx = torch.randint(0, 23, (3, 16))
    unmerged_logits = model(idx)[0]
    assert not torch.allclose(unmerged_logits, tiny_gpt()(idx)[0], atol=1e-3)  # the adapter matters

    merge_lora(model)
    merged_logits = model(idx)[0]
    torch.testing.assert_close(merged_logits, unmerged_logits, rtol=1e-5, atol=1e-5)
    q = model.blocks[0].attn.q_proj
    assert q.merged
    torch.testing.assert_close(q.base.weight, base_weights["blocks.0.attn.q_proj.weight"] + q.delta_weight())

    unmerge_lora(model)
    torch.testing.assert_close(model(idx)[0], unmerged_logits, rtol=1e-5, atol=1e-5)
    for name, value in model.state_dict().items():
        if "lora_" not in name:
            original_name = name.replace(".base.", ".")
            torch.testing.assert_close(value, base_weights[original_name], rtol=0, atol=1e-6)


def test_trainable_parameter_count_matches_formula():
    model = tiny_gpt()
    d = model.config.d_model
    inject_lora(model, TARGETS, rank=4, alpha=8)
    mark_only_lora_trainable(model)
    expected = model.config.n_layer * len(TARGETS) * lora_parameter_count(d, d, rank=4)
    assert expected == 2 * 4 * 4 * (32 + 32)
    assert count_parameters(model, trainable_only=True) == expected
    assert sum(v.numel() for v in lora_state_dict(model).values()) == expected
    assert count_parameters(model) == count_parameters(tiny_gpt()) + expected


def test_only_lora_parameters_receive_gradients_and_change():
    model = tiny_gpt()
    inject_lora(model, predicate=lambda name, layer: name.endswith(("q_proj", "v_proj")), rank=2, alpha=4)
    mark_only_lora_trainable(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 23, (4, 16))
    for step in range(2):
        optimizer.zero_grad()
        _, loss = model(idx, idx)
        loss.backward()
        for name, p in model.named_parameters():
            if "lora_B" in name:
                assert p.grad.abs().sum() > 0, name
            elif "lora_A" in name:
                # dL/dA = scaling * B^T (dL/dh)^T x is exactly zero while B = 0 (first step), not after
                assert (p.grad.abs().sum() > 0) == (step == 1), name
            else:
                assert p.grad is None, name
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if "lora_" in k}


def test_gradient_of_lora_matches_finite_differences():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(5, 4).double(), rank=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, dtype=torch.double, requires_grad=True)

    def forward(a, b, inputs):  # the layer itself, with A and B passed in as the inputs to check
        return torch.func.functional_call(layer, {"lora_A": a, "lora_B": b}, (inputs,))

    a = layer.lora_A.detach().clone().requires_grad_()
    b = layer.lora_B.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(forward, (a, b, x))


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), rank=0)
    with pytest.raises(ValueError, match=r"alpha .a common choice: 2 .* must be a finite number > 0, got 0"):
        LoRALinear(nn.Linear(4, 4), rank=2, alpha=0)
    with pytest.raises(ValueError, match="dropout must be a finite number >= 0 and < 1, got 1.0"):
        LoRALinear(nn.Linear(4, 4), rank=2, dropout=1.0)
    with pytest.raises(ValueError, match="rank 8 exceeds"):
        LoRALinear(nn.Linear(4, 4), rank=8)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(4, 4, 1), rank=1)
    model = tiny_gpt()
    with pytest.raises(ValueError, match="no nn.Linear layer matched"):
        inject_lora(model, ("query",), rank=2)
    with pytest.raises(ValueError, match="exactly one"):
        inject_lora(model, rank=2)
    with pytest.raises(ValueError, match="inject_lora"):
        mark_only_lora_trainable(model)
    inject_lora(model, ("q_proj",), rank=2)
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_lora(model)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(model)


def test_injecting_twice_does_not_wrap_the_base_again():
    model = tiny_gpt()
    inject_lora(model, ("q_proj",), rank=2)
    names = inject_lora(model, ("k_proj",), rank=2)
    assert all(n.endswith("k_proj") for n in names)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * model.config.n_layer


def test_tied_weights_are_refused():
    torch.manual_seed(0)
    tied = GPT(GPTConfig(vocab_size=23, block_size=16, n_layer=1, n_head=2, d_model=32, tie_weights=True))
    with pytest.raises(ValueError, match="tied"):
        inject_lora(tied, ("lm_head",), rank=2)
    assert inject_lora(tied, ("q_proj",), rank=2) == ["blocks.0.attn.q_proj"]


def test_lora_dropout_acts_on_the_adapter_path_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), rank=4, alpha=4, dropout=0.5)
    x = torch.randn(8, 16)
    layer.train()
    torch.testing.assert_close(layer(x), layer.base(x))  # B = 0: nothing to drop yet
    with torch.no_grad():
        layer.lora_B.normal_()
    assert not torch.allclose(layer(x), layer(x))  # training: random masks on the LoRA input
    layer.eval()
    expected = layer.base(x) + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)  # eval: no dropout
