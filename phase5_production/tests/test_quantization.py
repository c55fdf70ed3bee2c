"""Int8 per-channel weight quantization: error bounds, QuantizedLinear vs nn.Linear, model swap, sizes."""

import io

import pytest
import torch
from torch import nn

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase5_production.src.evaluation import perplexity
from phase5_production.src.quantization import (
    QuantizedLinear,
    dequantize_per_channel_int8,
    linear_weight_bytes,
    model_size_bytes,
    quantize_model,
    quantize_per_channel_int8,
    state_dict_size_bytes,
    torch_dynamic_quantization,
    weight_error,
)


def _rows_with_different_ranges(out=16, inp=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    return w * torch.logspace(-3, 1, out)[:, None]  # row magnitudes from 1e-3 to 10


def test_round_trip_error_is_at_most_half_a_step_per_element():
    w = _rows_with_different_ranges()
    q, scale = quantize_per_channel_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (w.shape[0],)
    assert int(q.abs().max()) <= 127
    err = (w - dequantize_per_channel_int8(q, scale)).abs()  # [out, in]
    assert torch.all(err <= scale[:, None] / 2 + 1e-6 * scale[:, None])
    # the largest weight of every row maps to +-127 exactly (the full int8 range is used)
    assert torch.equal(q.abs().amax(dim=1), torch.full((w.shape[0],), 127, dtype=torch.int8))
    assert torch.allclose(scale, w.abs().amax(dim=1) / 127)


def test_zero_row_is_reproduced_exactly():
    w = torch.randn(3, 5)
    w[1] = 0.0
    q, scale = quantize_per_channel_int8(w)
    assert torch.equal(dequantize_per_channel_int8(q, scale)[1], torch.zeros(5))
    assert torch.isfinite(scale).all()


def test_per_channel_beats_per_tensor_when_rows_differ():
    w = _rows_with_different_ranges()
    q, scale = quantize_per_channel_int8(w)
    per_channel = (w - dequantize_per_channel_int8(q, scale)).abs().mean()
    tensor_scale = w.abs().max() / 127  # one scale for the whole matrix
    per_tensor = (w - torch.round(w / tensor_scale) * tensor_scale).abs().mean()
    assert per_channel < per_tensor / 3


def test_quantized_linear_matches_dequantized_matmul_and_is_close_to_linear():
    torch.manual_seed(0)
    linear = nn.Linear(48, 24)
    qlinear = QuantizedLinear.from_linear(linear)
    x = torch.randn(4, 7, 48)
    y_q = qlinear(x)
    # scaling after the matmul == dequantizing the weight first (the scale factors out)
    y_deq = torch.nn.functional.linear(x, qlinear.dequantized_weight(), linear.bias)
    torch.testing.assert_close(y_q, y_deq, rtol=1e-5, atol=1e-5)
    y = linear(x)
    rel = (y_q - y).norm() / y.norm()
    assert rel < 0.01, f"relative output error {rel:.4f} too large for int8 weights"
    assert y_q.shape == y.shape


def test_quantized_linear_state_dict_round_trip_and_no_bias():
    linear = nn.Linear(8, 6, bias=False)
    qlinear = QuantizedLinear.from_linear(linear)
    assert qlinear.bias is None
    buffer = io.BytesIO()
    torch.save(qlinear.state_dict(), buffer)
    buffer.seek(0)
    restored = QuantizedLinear(8, 6, bias=False)
    restored.load_state_dict(torch.load(buffer, weights_only=True, map_location="cpu"))
    x = torch.randn(2, 8)
    assert torch.equal(restored(x), qlinear(x))
    assert restored.weight_int8.dtype == torch.int8


def _gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(vocab_size=40, block_size=32, n_layer=2, n_head=4, d_model=64)
    config.update(overrides)
    return GPT(GPTConfig(**config)).eval()


def test_quantize_model_swaps_every_linear_and_keeps_outputs_close():
    model = _gpt()
    qmodel = quantize_model(model)
    assert not any(isinstance(m, nn.Linear) for m in qmodel.modules())
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, QuantizedLinear) for m in qmodel.modules()) == n_linear
    assert any(isinstance(m, nn.Linear) for m in model.modules()), "the original model must be untouched"
    idx = torch.randint(0, 40, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(idx)
        qlogits, _ = qmodel(idx)
    assert (qlogits - logits).abs().max() < 0.05 * logits.abs().max()
    stats = weight_error(model, qmodel)
    assert stats["max_error_over_half_scale"] <= 1.0 + 1e-4
    assert 0 < stats["mean_abs_error"] < stats["max_abs_error"]
    tokens = torch.randint(0, 40, (300,), generator=torch.Generator().manual_seed(2))
    ppl, qppl = perplexity(model, tokens)["perplexity"], perplexity(qmodel, tokens)["perplexity"]
    assert abs(qppl - ppl) / ppl < 0.01


def test_weight_bytes_shrink_about_four_times():
    model = _gpt(d_model=128)
    qmodel = quantize_model(model)
    float_bytes, _ = linear_weight_bytes(model)
    _, int8_bytes = linear_weight_bytes(qmodel)
    ratio = float_bytes / int8_bytes
    assert 3.8 < ratio < 4.0, ratio  # 4 bytes -> 1 byte per weight, plus one fp32 scale per row
    assert model_size_bytes(qmodel) < model_size_bytes(model)
    assert state_dict_size_bytes(qmodel) == model_size_bytes(qmodel)


def test_skip_keeps_named_layers_in_float_and_tied_weights_are_counted_once():
    model = _gpt(tie_weights=True)
    assert model_size_bytes(model) == sum(p.numel() * 4 for p in model.parameters())
    qmodel = quantize_model(model, skip=("lm_head",))
    assert isinstance(qmodel.lm_head, nn.Linear)
    assert isinstance(qmodel.blocks[0].attn.q_proj, QuantizedLinear)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="2-D"):
        quantize_per_channel_int8(torch.randn(4))
    with pytest.raises(TypeError, match="floating-point"):
        quantize_per_channel_int8(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        quantize_per_channel_int8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantizedLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="last dimension is"):
        QuantizedLinear.from_linear(nn.Linear(4, 2))(torch.randn(3, 5))
    with pytest.raises(ValueError, match="not modules"):
        quantize_model(_gpt(), skip=("no_such_layer",))
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="one entry per row"):
        dequantize_per_channel_int8(torch.zeros(3, 2, dtype=torch.int8), torch.ones(2))


def test_torch_dynamic_quantization_is_close_to_float_or_reported_unavailable():
    model = _gpt()
    qmodel, note = torch_dynamic_quantization(model)
    assert isinstance(note, str) and note
    if qmodel is None:  # the platform lacks it: the reason must say so
        assert "not available" in note or "engine" in note or "failed" in note
        return
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, _ = model(idx)
        dyn_logits, _ = qmodel(idx)
    assert (dyn_logits - logits).abs().max() < 0.1 * logits.abs().max()
    assert state_dict_size_bytes(qmodel) < state_dict_size_bytes(model)
