"""Int8 weight-only quantization, written by hand: per-output-channel, symmetric.

A Linear layer's weight W [out, in] is stored in float32: 4 bytes per number. Weight-only int8
quantization keeps, for every output row r, one float scale s_r and one int8 per weight:

    s_r   = max_j |W[r, j]| / 127                      the largest weight of the row maps to +-127
    Q[r,j] = round(W[r, j] / s_r)   in [-127, 127]     int8 (symmetric: zero maps exactly to 0)
    W~[r,j] = Q[r, j] * s_r                             dequantized weight

Rounding moves every weight by at most half a step: |W - W~| <= s_r / 2. Storage drops from
4 bytes to 1 byte per weight plus 4 bytes per row for the scale: ~4x smaller.

Why per *output channel*? Rows of a trained weight matrix have very different ranges. One scale
for the whole matrix (per-tensor) is set by the single largest weight, so rows with small
weights get only a few of the 255 levels. One scale per row gives each row its full range, and
the scale factors out of the matmul cleanly:

    y[b, r] = sum_j x[b, j] * W~[r, j] = s_r * sum_j x[b, j] * Q[r, j]

so `QuantizedLinear` computes x @ Q^T once (Q cast to the activation dtype) and multiplies each
output column by its scale — the same as dequantizing first, with one multiply per output
instead of one per weight. (A true int8 x int8 matmul also needs the *activations* quantized,
which is what PyTorch's dynamic quantization does; `compare_with_torch_dynamic` measures it.)

    q, scale = quantize_per_channel_int8(weight)         int8 [out, in], float [out]
    w = dequantize_per_channel_int8(q, scale)            float [out, in]
    qlinear = QuantizedLinear.from_linear(linear)
    qmodel = quantize_model(model)                       copy with every nn.Linear swapped
    model_size_bytes(model), weight_error(model, qmodel)

Run `python phase5_production/src/quantization.py` for a size/error/perplexity report on a small
GPT trained for a few seconds.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

INT8_MAX = 127  # symmetric range [-127, 127]; -128 is unused so that +x and -x round alike


def quantize_per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] float -> (q int8 [out, in], scale float32 [out]) with W ~= q * scale[:, None].

    A row of zeros gets scale 1.0 (any scale reproduces it exactly with q = 0).
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}.")
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be a 2-D matrix [out_features, in_features], got shape {tuple(weight.shape)}."
        )
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}.")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or inf; int8 quantization needs finite weights.")
    w = weight.detach().float()  # [out, in]
    row_max = w.abs().amax(dim=1)  # [out] largest magnitude per output channel
    scale = torch.where(row_max > 0, row_max / INT8_MAX, torch.ones_like(row_max))  # [out]
    q = torch.round(w / scale[:, None])  # [out, in], already within [-127, 127] by construction
    return q.to(torch.int8), scale


def dequantize_per_channel_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q int8 [out, in], scale [out]) -> float32 weight [out, in] = q * scale per row."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"q must be an int8 matrix [out, in], got {q.dtype} {tuple(q.shape)}.")
    if scale.dim() != 1 or scale.shape[0] != q.shape[0]:
        raise ValueError(
            f"scale must be a vector with one entry per row of q ({q.shape[0]}), got {tuple(scale.shape)}."
        )
    return q.float() * scale.float()[:, None]  # [out, in]


class QuantizedLinear(nn.Module):
    """A Linear layer whose weight is stored as int8 + one float32 scale per output channel.

    forward(x [..., in]) -> [..., out] = (x @ Q^T) * scale + bias, computed in x's dtype.
    The int8 weight and the scale are buffers (saved in the state_dict, not trained).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantizedLinear:
        """Quantize an nn.Linear's weight (its bias stays in float)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}.")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q, scale = quantize_per_channel_int8(linear.weight)
        layer.weight_int8.copy_(q)
        layer.weight_scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_per_channel_int8(self.weight_int8, self.weight_scale)  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"QuantizedLinear expects inputs whose last dimension is {self.in_features}, "
                f"got shape {tuple(x.shape)}."
            )
        # The scale factors out of the sum over j: y[..., r] = s_r * sum_j x[..., j] Q[r, j]
        y = F.linear(x, self.weight_int8.to(x.dtype))  # [..., out] integer-valued weights
        y = y * self.weight_scale.to(x.dtype)  # [..., out] per-channel rescale
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weight=int8 per-channel"
        )


def quantize_model(model: nn.Module, skip: tuple[str, ...] = (), inplace: bool = False) -> nn.Module:
    """Return the model with every nn.Linear replaced by a QuantizedLinear.

    skip: qualified module names to keep in float (e.g. ("lm_head",)). inplace=False (default)
    quantizes a deep copy and leaves `model` untouched. Embeddings and norms stay in float.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model expects an nn.Module, got {type(model).__name__}.")
    names = {name for name, _ in model.named_modules()}
    unknown = [name for name in skip if name not in names]
    if unknown:
        raise ValueError(f"skip names {unknown} are not modules of this model; see model.named_modules().")
    target = model if inplace else copy.deepcopy(model)
    to_swap = [
        name for name, module in target.named_modules() if isinstance(module, nn.Linear) and name not in skip
    ]
    if not to_swap:
        raise ValueError("the model has no nn.Linear layers to quantize.")
    for name in to_swap:
        parent_name, _, child = name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        setattr(parent, child, QuantizedLinear.from_linear(getattr(parent, child)))
    return target


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, counting a shared (tied) tensor once.

    Packed weights of torch's dynamically quantized layers live outside parameters/buffers; they
    are counted from the module's state_dict instead (see `state_dict_size_bytes`).
    """
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def state_dict_size_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the state_dict, a shared tensor counted once.

    Works for torch's dynamically quantized layers too, whose packed weight appears in the
    state_dict as a (qint8 weight, float bias) tuple: a quantized tensor counts 1 byte per element
    plus its scales and zero points.
    """
    total = 0
    seen: set[int] = set()
    for value in model.state_dict().values():
        for t in value if isinstance(value, tuple) else (value,):
            if not isinstance(t, torch.Tensor):
                continue  # e.g. the dtype entry of a packed-params record
            if t.is_quantized:
                n_scales = t.q_per_channel_scales().numel() if t.qscheme() == torch.per_channel_affine else 1
                total += t.numel() * t.element_size() + n_scales * (4 + 8)  # fp32 scale + int64 zero point
                continue
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def linear_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(float bytes of nn.Linear weights, bytes of QuantizedLinear int8 weights + scales)."""
    float_bytes = sum(
        m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear)
    )
    int8_bytes = sum(
        m.weight_int8.numel() + m.weight_scale.numel() * m.weight_scale.element_size()
        for m in model.modules()
        if isinstance(m, QuantizedLinear)
    )
    return float_bytes, int8_bytes


@torch.no_grad()
def weight_error(float_model: nn.Module, quantized_model: nn.Module) -> dict[str, float]:
    """Max and mean |W - dequant(Q)| over every quantized Linear, and the max ratio error / (scale/2)."""
    float_modules = dict(float_model.named_modules())
    max_err, abs_sum, count, worst_ratio = 0.0, 0.0, 0, 0.0
    for name, module in quantized_model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        original = float_modules.get(name)
        if not isinstance(original, nn.Linear):
            raise ValueError(f"{name!r} is quantized but is not an nn.Linear in the float model.")
        err = (original.weight.float() - module.dequantized_weight()).abs()  # [out, in]
        max_err = max(max_err, err.max().item())
        abs_sum += err.sum().item()
        count += err.numel()
        worst_ratio = max(worst_ratio, (err / (module.weight_scale[:, None] / 2)).max().item())
    if count == 0:
        raise ValueError("quantized_model has no QuantizedLinear layers; run quantize_model first.")
    return {
        "max_abs_error": max_err,
        "mean_abs_error": abs_sum / count,
        "max_error_over_half_scale": worst_ratio,
    }


def torch_dynamic_quantization(model: nn.Module) -> tuple[nn.Module | None, str]:
    """PyTorch's own int8 dynamic quantization of nn.Linear, if this platform has it.

    Returns (quantized copy, note) or (None, reason). torch.ao.quantization.quantize_dynamic is
    deprecated in recent PyTorch (moving to the separate `torchao` package); the deprecation
    warnings it emits are collected into the note instead of being printed.
    """
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as err:  # removed in a future release
        return (
            None,
            f"torch.ao.quantization.quantize_dynamic is not available in torch {torch.__version__}: {err}",
        )
    engines = torch.backends.quantized.supported_engines
    if not any(engine in engines for engine in ("x86", "fbgemm", "qnnpack", "onednn")):
        return None, f"no quantized CPU engine in this torch build (supported_engines={engines})"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            qmodel = quantize_dynamic(copy.deepcopy(model).cpu(), {nn.Linear}, dtype=torch.qint8)
        except Exception as err:  # unsupported engine at runtime
            return None, f"quantize_dynamic failed on this platform: {err}"
    deprecated = any("deprecat" in str(w.message).lower() for w in caught)
    note = f"torch {torch.__version__}, engine {torch.backends.quantized.engine}"
    if deprecated:
        note += " (quantize_dynamic is deprecated in this version; PyTorch points to the torchao package)"
    return qmodel, note


@torch.no_grad()
def quantization_report(model: nn.Module, token_ids, block_size: int | None = None) -> list[dict]:
    """Float vs hand-written int8 vs torch dynamic int8: size, weight/output error, perplexity.

    `token_ids` is held-out text (a 1-D sequence of ids) for the perplexity and the output error.
    Returns one row (dict) per variant; torch's variant is {"variant": ..., "note": reason} when
    unavailable.
    """
    from phase5_production.src.evaluation import perplexity, stream_to_windows

    model = model.eval()
    block_size = block_size or model.config.block_size
    x, _ = stream_to_windows(token_ids, block_size, batch_size=4)[0]  # [<=4, T] a batch of held-out text
    reference = model(x)[0]  # [b, T, V] float logits

    def row(name: str, m: nn.Module, size: int, note: str = "") -> dict:
        logits = m(x)[0]
        return {
            "variant": name,
            "size_bytes": size,
            "max_logit_error": (logits - reference).abs().max().item(),
            "perplexity": perplexity(m, token_ids, block_size)["perplexity"],
            "note": note,
        }

    rows = [row("float32", model, model_size_bytes(model))]
    qmodel = quantize_model(model)
    errors = weight_error(model, qmodel)
    weight_note = f"|W - W~| max {errors['max_abs_error']:.2e}, mean {errors['mean_abs_error']:.2e}"
    rows.append(row("int8 per-channel (ours)", qmodel, model_size_bytes(qmodel), weight_note))
    dynamic, note = torch_dynamic_quantization(model)
    if dynamic is None:
        rows.append({"variant": "torch dynamic int8", "note": note})
    else:
        rows.append(row("torch dynamic int8", dynamic, state_dict_size_bytes(dynamic), note))
    return rows


def format_report(rows: list[dict]) -> str:
    """The rows of quantization_report as a fixed-width table."""
    lines = [f"{'variant':<26}{'size (KB)':>11}{'max |dlogit|':>14}{'perplexity':>12}  note"]
    for r in rows:
        if "size_bytes" not in r:
            lines.append(f"{r['variant']:<26}{'-':>11}{'-':>14}{'-':>12}  {r['note']}")
            continue
        lines.append(
            f"{r['variant']:<26}{r['size_bytes'] / 1024:>11.1f}{r['max_logit_error']:>14.4f}"
            f"{r['perplexity']:>12.4f}  {r['note']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    # A quick look at one layer; benchmarks/bench_quantization.py measures a whole trained GPT.
    torch.manual_seed(0)
    layer = nn.Linear(512, 512)
    qlayer = QuantizedLinear.from_linear(layer)
    q, scale = quantize_per_channel_int8(layer.weight)
    err = (layer.weight - dequantize_per_channel_int8(q, scale)).abs()
    x = torch.randn(8, 512)
    out_err = (qlayer(x) - layer(x)).abs().max().item()
    int8_bytes = q.numel() + scale.numel() * 4
    print(f"weight bytes: float32 {layer.weight.numel() * 4:,}  int8+scales {int8_bytes:,}")
    print(f"max |W - W~| = {err.max():.2e} (bound scale/2 = {(scale / 2).max():.2e}); mean {err.mean():.2e}")
    print(f"max output error on random inputs: {out_err:.2e}")
