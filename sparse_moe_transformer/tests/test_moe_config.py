"""Config presets, validation, analytic counts (params, active params, FLOPs) and input errors."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sparse_moe_transformer.src.param_counts import (
    count_active_parameters,
    count_parameters,
    forward_flops_per_token,
)
from sparse_moe_transformer.src.train import Config, SparseMoETransformer, preset_config


def module_param_count(config):
    with torch.device("meta"):  # no memory, no init cost
        model = SparseMoETransformer(config)
    return sum(p.numel() for p in model.parameters())


def test_t1000_has_158_77M_parameters_and_18_97M_active():
    c = preset_config("t1000")
    assert (c.vocab_size, c.d_model, c.n_head, c.n_layer, c.n_expert, c.top_k, c.d_ff, c.block_size) == (
        50257, 512, 8, 6, 16, 2, 1024, 256,
    )  # fmt: skip
    total = count_parameters(c)
    assert total == module_param_count(c)
    assert total == 158_771_296  # the figure every document quotes (test_docs_figures.py)
    active = count_active_parameters(c)  # outside the embeddings and the head
    assert active == 18_967_648
    assert active / (total - 2 * 50257 * 512 - 256 * 512) < 0.2


@pytest.mark.parametrize("preset", ["cpu-demo", "cpu-small", "tiny"])
def test_analytic_counts_match_the_module(preset):
    c = preset_config(preset)
    assert count_parameters(c) == module_param_count(c)
    # active = total minus the idle experts' weights, minus embeddings and head
    one_expert = 2 * c.d_model * c.d_ff + c.d_ff + c.d_model
    positions = c.block_size * c.d_model if c.pos == "learned" else 0  # RoPE has no table
    embeddings_and_head = 2 * c.vocab_size * c.d_model + positions
    idle = c.n_layer * (c.n_expert - c.top_k) * one_expert
    assert count_active_parameters(c) == count_parameters(c) - idle - embeddings_and_head


def test_analytic_flops_agree_with_torch_flop_counter():
    c = preset_config("tiny", d_model=64, d_ff=128, n_expert=8, vocab_size=300)
    model = SparseMoETransformer(c).eval()
    B, T = 2, 32
    ids = torch.randint(0, c.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    counted = counter.get_total_flops()
    # The CPU SDPA kernel is not registered with the counter; count the matmuls around it.
    predicted = forward_flops_per_token(c, T, include_attention=False) * B * T
    assert abs(counted - predicted) / predicted < 0.03
    # The attention term is 4*T*C per token per layer: QK^T and AV for the full T x T matrix.
    assert forward_flops_per_token(c, T) - forward_flops_per_token(c, T, include_attention=False) == (
        c.n_layer * 4 * T * c.d_model
    )


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"d_model": 100, "n_head": 8}, "n_head"),
        ({"top_k": 9, "n_expert": 8}, "top_k"),
        ({"d_ff": 0}, "d_ff"),
        ({"vocab_size": -5}, "vocab_size"),
        ({"n_layer": 2.0}, "n_layer"),
        ({"dropout": 1.0}, "dropout"),
        ({"attn_dropout": -0.1}, "attn_dropout"),
        ({"attn_dropout": True}, "attn_dropout"),
        ({"capacity_factor": 0}, "capacity_factor"),
        ({"aux_loss_coef": -0.1}, "aux_loss_coef"),
        ({"z_loss_coef": float("nan")}, "z_loss_coef"),
    ],
)
def test_bad_config_raises_one_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"Config\.{field}"):
        preset_config("cpu-demo", **overrides)


def test_unknown_preset_and_unknown_field():
    with pytest.raises(ValueError, match="Unknown preset 'gpt5'.*cpu-demo"):
        preset_config("gpt5")
    with pytest.raises(ValueError, match="n_experts"):
        preset_config("tiny", n_experts=4)  # the old name: the field is n_expert
    assert preset_config("tiny", dropout=0.2).dropout == 0.2


def test_bad_inputs_raise_clear_errors():
    model = SparseMoETransformer(preset_config("tiny"))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="exceeds block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(TypeError, match="LongTensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(TypeError, match="LongTensor"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must have the shape"):
        model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="Config"):
        SparseMoETransformer({"d_model": 4})


def test_cpu_small_matches_nanogpts_cpu_model_in_active_size():
    # nanoGPT's CPU baseline: 4 layers, 4 heads, d 128, FFN 128 -> 512 -> 128 (0.79M parameters in
    # the layers). cpu-small splits that FFN into 8 experts of 256, 2 active: the same active size.
    c = preset_config("cpu-small")
    dense = preset_config("cpu-small", n_expert=1, top_k=1, d_ff=512)
    assert (c.d_model, c.n_head, c.n_layer, c.block_size) == (128, 4, 4, 256)
    active, dense_active = count_active_parameters(c), count_active_parameters(dense)
    assert abs(active - dense_active) / dense_active < 0.02
    assert count_parameters(c) > 1.8 * count_parameters(dense)  # 4x the FFN parameters in total
    assert c.dropout == 0.1 and c.attn_dropout == 0.0


def test_a_config_saved_under_the_old_field_names_loads_and_unknown_fields_are_refused():
    old = {"vocab_size": 97, "d_model": 32, "n_heads": 4, "n_layers": 2, "n_experts": 4, "top_k": 2,
           "d_ff": 48, "max_len": 32, "dropout": 0.0}  # fmt: skip
    assert Config.from_saved(old) == preset_config("tiny")  # renamed fields; attn_dropout defaulted
    with pytest.raises(ValueError, match=r"\['mystery'\].*newer or foreign"):
        Config.from_saved({**old, "mystery": 1})
