"""Predict the training memory of a Sparse MoE config before building it (the CLI's `--mode plan`).

Training memory = model state + activations + transient buffers + runtime overhead.

Model state (P parameters, AdamW, "mixed precision" = torch autocast):
    parameters       4 P bytes   fp32; under autocast they are also the master weights (no second copy)
    gradients        4 P bytes   fp32 (.grad has the parameter's dtype)
    optimizer state  8 P bytes   AdamW's exp_avg and exp_avg_sq, fp32
    autocast copies  2 P_mm      fp16/bf16 casts of the matmul weights (attention, gate, head) that
                                 autocast caches during the forward pass; 0 in fp32

Activations (tensors saved for the backward pass), per token, per layer, with a = 2 bytes under
fp16/bf16 autocast and 4 in fp32, C = d_model, F = expert hidden size, E = experts, k = top_k,
H = heads:
    attention block   LayerNorm input 4C + 8, its output a*C (input of the q/k/v projection),
                      q, k, v and the attention output 4 a*C, logsumexp 4H (flash/efficient
                      kernels), output-projection input a*C, residual dropout mask C (if dropout)
    MoE block         LayerNorm input 4C + 8, its output a*C (gate input), gate logits / softmax
                      for the aux and z losses 3 * 4E, top-k indices and weights 12k,
                      expert FFN per routed pair: gathered input a*C, pre-activation a*F,
                      GELU output a*F, expert output a*C, weight and indices 20 bytes
                      -> k * (2 a*C + 2 a*F + 20) with a = 4 (below), residual dropout mask C
    embeddings        ids 8, embedding dropout mask C (if dropout)
    head              final LayerNorm input 4C + 8, head input a*C, logits a*V (returned to the
                      loop), fp32 log-softmax saved by the cross-entropy 4V
The MoE expert buffers are written by a custom autograd.Function in the dtype of its input, the
LayerNorm output, which autocast keeps in fp32: they are counted at 4 bytes in every precision.
On the CPU with dropout, scaled_dot_product_attention falls back to its math kernel, which also
keeps the T x T attention weights: (3a + 1) bytes per weight (scores, softmax, dropout mask,
dropped weights); GPUs use the flash / memory-efficient kernels (logsumexp only). With activation
checkpointing only each layer's input (4C per token per layer) is kept, and one layer's
activations are rebuilt at a time during the backward pass.

Transient peak at the start of the backward pass: the fp32 gradients of the log-softmax and of the
logits (8V per token; the fp32 copy of the logits made in the forward pass is as large and gone by
then), plus one layer's activation gradients. Runtime overhead: the CUDA context and cuBLAS
workspaces (about 0.35 GB; `cuda_overhead_gb`), and 10% allocator fragmentation on the activations
and transients (the model state is a few large long-lived blocks).

The formula is checked against the bytes of the tensors autograd really saves for the backward pass
(`tests/test_memory_plan.py`, fp32 on the CPU); everything else is stated assumption.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GB = 1024**3  # the plan counts binary gigabytes (GiB): a "4 GB" card has 4 GiB
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class MemoryPlan:
    """Predicted bytes of each part (see the module docstring)."""

    n_params: int
    tokens_per_micro_batch: int
    precision: str
    activation_checkpointing: bool
    parameters: int
    gradients: int
    optimizer_state: int
    autocast_weight_copies: int
    activations: int
    backward_transient: int
    fragmentation: int
    runtime_overhead: int

    @property
    def model_state(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state

    @property
    def total(self) -> int:
        return (
            self.model_state
            + self.autocast_weight_copies
            + self.activations
            + self.backward_transient
            + self.fragmentation
            + self.runtime_overhead
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "model_state": self.model_state, "total": self.total}


def activation_bytes_per_token(config, act_bytes: int, seq_len: int, math_attention: bool = False) -> dict:
    """Saved-for-backward bytes per token of one layer's parts, the embeddings and the head."""
    C, F, E, k, H, V = (
        config.d_model,
        config.d_ff,
        config.n_expert,
        config.top_k,
        config.n_head,
        config.vocab_size,
    )
    a = act_bytes
    mask = C if config.dropout > 0 else 0  # dropout keeps a 1-byte mask per element
    attention = (4 * C + 8) + a * C + 4 * a * C + 4 * H + a * C + mask
    if math_attention:  # the T x T weights: scores, softmax, dropout mask and dropped weights
        attention += H * seq_len * (3 * a + 1)
    experts = k * (2 * 4 * C + 2 * 4 * F + 20)  # fp32 (see the module docstring)
    moe = (4 * C + 8) + a * C + 3 * 4 * E + 12 * k + experts + mask
    embeddings = 8 + mask
    head = (4 * C + 8) + a * C + a * V + 4 * V  # logits (kept by the loop) + fp32 log-softmax
    return {
        "attention": attention,
        "moe": moe,
        "layer": attention + moe,
        "embeddings": embeddings,
        "head": head,
    }


def plan_memory(
    config,
    batch_size: int,
    seq_len: int,
    *,
    n_params: int,
    n_matmul_params: int | None = None,
    precision: str = "fp32",
    activation_checkpointing: bool = False,
    cuda_overhead_gb: float = 0.35,
    on_gpu: bool | None = None,
) -> MemoryPlan:
    """Predict the memory of one training micro-batch of `batch_size` x `seq_len` tokens.

    `n_params`: the model's parameter count (the model's own counting function);
    `n_matmul_params`: parameters autocast casts to half precision (default: all but the
    embeddings and the expert weights, which the dispatch Function uses in their own dtype);
    `on_gpu`: a CUDA run (default: precision != "fp32"): adds the CUDA runtime overhead and uses the
    fused attention kernels; a CPU run with dropout keeps the attention weights (math kernel).
    """
    if precision not in PRECISION_BYTES:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISION_BYTES)}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("n_params", n_params)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if seq_len > config.block_size:
        raise ValueError(f"seq_len {seq_len} exceeds the model's block_size {config.block_size}")
    act = PRECISION_BYTES[precision]
    tokens = batch_size * seq_len
    on_gpu = precision != "fp32" if on_gpu is None else on_gpu
    math_attention = not on_gpu and config.dropout > 0  # CPU SDPA with dropout: the math kernel
    per_token = activation_bytes_per_token(config, act, seq_len, math_attention)
    L = config.n_layer
    if activation_checkpointing:
        kept = L * 4 * config.d_model + per_token["layer"]  # layer inputs + one rebuilt layer
    else:
        kept = L * per_token["layer"]
    activations = int(tokens * (kept + per_token["embeddings"] + per_token["head"]))
    transient = int(tokens * (8 * config.vocab_size + per_token["layer"]))
    if n_matmul_params is None:
        C, V, E = config.d_model, config.vocab_size, config.n_expert
        n_matmul_params = L * (4 * C * C + C * E) + C * V  # attention, gate, head weights
    copies = 0 if act == 4 else 2 * n_matmul_params
    return MemoryPlan(
        n_params=n_params,
        tokens_per_micro_batch=tokens,
        precision=precision,
        activation_checkpointing=activation_checkpointing,
        parameters=4 * n_params,
        gradients=4 * n_params,
        optimizer_state=8 * n_params,
        autocast_weight_copies=copies,
        activations=activations,
        backward_transient=transient,
        fragmentation=int(0.10 * (activations + transient)),
        runtime_overhead=int(cuda_overhead_gb * GB) if on_gpu else 0,
    )


def format_memory_plan(plan: MemoryPlan, budget_gb: float | None = None) -> str:
    """A small table of the plan; with `budget_gb`, whether it fits."""
    rows = [
        ("parameters (fp32)", plan.parameters),
        ("gradients (fp32)", plan.gradients),
        ("AdamW state (2 x fp32)", plan.optimizer_state),
        ("autocast weight copies", plan.autocast_weight_copies),
        (
            f"activations ({plan.tokens_per_micro_batch:,} tokens, {plan.precision}"
            f"{', checkpointed' if plan.activation_checkpointing else ''})",
            plan.activations,
        ),
        ("backward transient", plan.backward_transient),
        ("fragmentation (10% of activations)", plan.fragmentation),
        ("CUDA context + workspaces", plan.runtime_overhead),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"memory plan ({plan.n_params / 1e6:,.1f}M parameters, per process):"]
    lines += [f"  {name:<{width}}  {value / GB:7.3f} GiB" for name, value in rows]
    lines.append(f"  {'total':<{width}}  {plan.total / GB:7.3f} GiB")
    if budget_gb is not None:
        verdict = "fits" if plan.total <= budget_gb * GB else "does NOT fit"
        lines.append(
            f"  -> {verdict} in {budget_gb:g} GiB ({(budget_gb * GB - plan.total) / GB:+.3f} GiB to spare)"
        )
    return "\n".join(lines)
