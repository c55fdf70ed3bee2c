"""GPT options: RoPE instead of learned positions, grouped-query / multi-query attention."""

import pytest
import torch

from phase2_architecture.src.gpt import GPT, GPTConfig, gpt_parameter_count
from phase2_architecture.src.rotary_attention import RotaryMultiHeadAttention

OPTIONS = [
    dict(pos="rope"),
    dict(n_kv_head=2),
    dict(n_kv_head=1),
    dict(pos="rope", n_kv_head=2, norm="rmsnorm", ffn="swiglu", bias=False, tie_weights=True),
]


def _config(**overrides):
    return GPTConfig(vocab_size=19, block_size=12, n_layer=2, n_head=4, d_model=32, **overrides)


@pytest.mark.parametrize("overrides", OPTIONS)
def test_parameter_formula_matches_the_module(overrides):
    config = _config(**overrides)
    assert gpt_parameter_count(config) == sum(p.numel() for p in GPT(config).parameters())


def test_rope_replaces_the_position_table_and_gqa_shrinks_key_value_projections():
    rope = GPT(_config(pos="rope"))
    assert rope.pos_emb is None and all(isinstance(b.attn, RotaryMultiHeadAttention) for b in rope.blocks)
    assert gpt_parameter_count(_config()) - gpt_parameter_count(_config(pos="rope")) == 12 * 32  # T * C
    gqa = GPT(_config(n_kv_head=1))
    assert gqa.blocks[0].attn.k_proj.weight.shape == (8, 32)  # one head of 8 features
    # per layer, k and v lose (H - H_kv) * Dh outputs each: 2 * (4 - 1) * 8 * (32 + 1 bias) parameters
    assert gpt_parameter_count(_config()) - gpt_parameter_count(_config(n_kv_head=1)) == 2 * 2 * 3 * 8 * 33


@pytest.mark.parametrize("overrides", OPTIONS)
def test_causality_future_tokens_do_not_change_past_logits(overrides):
    torch.manual_seed(0)
    model = GPT(_config(**overrides)).eval()
    idx = torch.randint(0, 19, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 19
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_n_kv_head_equal_to_n_head_is_the_default_gpt():
    torch.manual_seed(0)
    default = GPT(_config()).eval()
    grouped = GPT(_config(n_kv_head=4)).eval()
    grouped.load_state_dict(default.state_dict())
    idx = torch.randint(0, 19, (2, 12))
    torch.testing.assert_close(grouped(idx)[0], default(idx)[0], rtol=0, atol=0)


def test_rope_gpt_adds_no_absolute_position_signal():
    """RoPE only rotates queries against keys: for one repeated token every value is the same, so the
    logits are equal at every position. A position table (learned positions) makes them differ."""
    torch.manual_seed(0)
    idx = torch.full((1, 12), 5)
    rope_logits, _ = GPT(_config(pos="rope")).eval()(idx)
    learned_logits, _ = GPT(_config()).eval()(idx)
    torch.testing.assert_close(rope_logits[0, 1:], rope_logits[0, :1].expand(11, -1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(learned_logits[0, 1:], learned_logits[0, :1].expand(11, -1), atol=1e-5)


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="pos must be"):
        _config(pos="alibi")
    with pytest.raises(ValueError, match="n_kv_head must be"):
        _config(n_kv_head=3)
    with pytest.raises(ValueError, match="even"):
        GPTConfig(vocab_size=5, block_size=4, n_head=4, d_model=12, pos="rope")  # head size 3
