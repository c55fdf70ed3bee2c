"""The memory plan: on a small model its saved-for-backward term equals, to the byte, what autograd
saves for a training step (the forward and moe_losses), and t1000 fits 4 GB. The full-width,
per-layer checks are in test_memory_accounting.py."""

import pytest
import torch

from sparse_moe_transformer.src.memory_plan import GB, format_memory_plan, measure_saved_bytes, plan_memory
from sparse_moe_transformer.src.moe_optimizer import make_optimizer
from sparse_moe_transformer.src.param_counts import count_hidden_matrix_parameters, count_parameters
from sparse_moe_transformer.src.train import PRESETS, SparseMoETransformer, moe_losses, preset_config
from sparse_moe_transformer.src.train_settings import TrainSettings


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_prediction_equals_the_saved_tensor_bytes(dropout, precision):
    config = preset_config(
        "cpu-demo",
        vocab_size=512,
        n_layer=2,
        d_model=64,
        n_head=4,
        n_expert=8,
        top_k=2,
        d_ff=128,
        block_size=64,
        dropout=dropout,
        pos="learned",  # the plan does not count RoPE's rotated q, k or QK-norm's copies yet (memory_plan.py)
        qk_norm=False,
    )
    torch.manual_seed(0)
    model = SparseMoETransformer(config).train()
    B, T = 4, 64
    x = torch.randint(0, config.vocab_size, (B, T))
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    measured = measure_saved_bytes(model, x, torch.roll(x, -1, 1), dtype).total
    n_params = sum(p.numel() for p in model.parameters())
    plan = plan_memory(config, B, T, n_params=n_params, precision=precision, on_gpu=False)
    assert plan.saved_for_backward == measured, (plan.saved_for_backward, measured)
    assert plan.parameters == 4 * n_params and plan.optimizer_state == 8 * n_params


def test_t1000_defaults_fit_4_gb():
    config = preset_config("t1000")
    n_params = count_parameters(config)
    plan = plan_memory(config, 4, 256, n_params=n_params, precision="fp16")
    assert 150e6 < n_params < 170e6
    assert plan.total < 4 * GB, format_memory_plan(plan, budget_gb=4)
    assert plan.model_state > 0.6 * plan.total  # optimizer state dominates, as it should at batch 4
    muon = plan_memory(
        config, 4, 256, n_params=n_params, n_muon_params=count_hidden_matrix_parameters(config),
        precision="fp16",
    )  # fmt: skip
    assert plan.optimizer_state - muon.optimizer_state == 4 * 106_954_752  # one fp32 buffer, not two
    checkpointed = plan_memory(
        config, 4, 256, n_params=n_params, precision="fp16", activation_checkpointing=True
    )
    assert checkpointed.activations < plan.activations
    bigger = plan_memory(config, 64, 256, n_params=n_params, precision="fp16")
    assert bigger.total > 4 * GB and "does NOT fit" in format_memory_plan(bigger, budget_gb=4)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_state_equals_the_bytes_the_optimizer_keeps(optimizer):
    """AdamW keeps two fp32 moments per parameter; Muon one momentum buffer per hidden-matrix parameter
    (count_hidden_matrix_parameters = what hidden_matrices() hands to Muon)."""
    config = preset_config("tiny")
    torch.manual_seed(0)
    model = SparseMoETransformer(config)
    n_muon = count_hidden_matrix_parameters(config)
    assert n_muon == sum(p.numel() for p in model.hidden_matrices())
    s = TrainSettings(**{**PRESETS["tiny"].training, "seq_len": 16, "optimizer": optimizer})
    opt = make_optimizer(model, s, torch.device("cpu"))
    x = torch.randint(0, config.vocab_size, (2, 17))
    moe_losses(model(x[:, :-1], x[:, 1:]), config).total.backward()
    opt.step()
    kept = sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0  # moment buffers, not the step counters
    )
    n_params = sum(p.numel() for p in model.parameters())
    plan = plan_memory(
        config, 2, 16, n_params=n_params, n_muon_params=n_muon if optimizer == "muon" else 0, on_gpu=False
    )
    assert plan.optimizer_state == kept


def test_bad_arguments():
    config = preset_config("cpu-demo")
    with pytest.raises(ValueError, match="unknown precision"):
        plan_memory(config, 1, 8, n_params=10, precision="int4")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        plan_memory(config, 0, 8, n_params=10)
    with pytest.raises(ValueError, match="exceeds the model's block_size"):
        plan_memory(config, 1, config.block_size + 1, n_params=10)
