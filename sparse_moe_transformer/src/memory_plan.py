"""Predict the training memory of a Sparse MoE config before building it (the CLI's `--mode plan`),
and measure what autograd really keeps, which checks the prediction.

Training memory = model state + activations + transient buffers + runtime overhead.

Model state (P parameters, AdamW, "mixed precision" = torch autocast):
    parameters       4 P bytes   fp32; under autocast they are also the master weights (no second copy)
    gradients        4 P bytes   fp32 (.grad has the parameter's dtype)
    optimizer state  8 P bytes   AdamW's exp_avg and exp_avg_sq, fp32; with Muon, 4 bytes (one momentum
                                 buffer) for each of its P_muon hidden-matrix parameters: 8 P - 4 P_muon
    autocast copies  2 P_mm      fp16/bf16 casts of the matmul weights (attention, and the routed and
                                 shared experts' w1 and w2; the router stays in fp32) that the forward
                                 pass saves for the backward; 0 in fp32. On a GPU the autocast cast
                                 cache keeps every attention copy until the autocast region ends; the
                                 CPU has no cache, so under activation checkpointing only the rebuilt
                                 layer's copies exist there.
                                 The expert dispatch casts its weights itself (no cache anywhere): under
                                 checkpointing only the rebuilt layer's expert copies exist. (The head's
                                 cast is made and freed inside the chunked loss: a transient.)

Activations: the tensors autograd saves for the backward pass, per token, in bytes. C = d_model,
F = expert hidden size, E = experts, k = top_k, H = heads, T = sequence length, V = vocabulary;
a = 2 under fp16/bf16 autocast and 4 in fp32 (the dtype of matmul outputs, the experts' included); the
residual stream and LayerNorm outputs stay fp32 (4) in every precision. A dropout mask m(d) costs
d bytes per element on the CPU (it is a float tensor of its input's dtype, d) and 1 byte on a GPU
(a bool mask); 0 without dropout. Routing weights r: a on the CPU, 4 on a GPU (CUDA autocast runs
softmax in fp32).

    attention block   LayerNorm input 4C + 8 (plus its mean and rstd), q/k/v projection input aC
                      fused kernel (GPU; CPU without attention dropout): the q/k/v projection output
                      3aC (q, k, v are views of it), the attention output aC (the output
                      projection's input is a view of it), logsumexp 4H
                      math kernel (CPU with attention dropout; it computes in fp32 even under bf16
                      autocast): q, k, v 3 * 4C, the T x T weights 12 H T (softmax, dropout mask,
                      dropped weights, fp32 each), the output projection's input aC
                      residual dropout mask m(a) C
    MoE block         LayerNorm input 4C + 8, gate input 4C and routing weights 4k (the router computes
                      in fp32 in every precision, so its weight is never cast), top-k indices 8k,
                      sort index 8k; the expert Function (computing in the autocast dtype) saves
                      per routed pair the gathered input aC, pre-activation aF' (F' = F, or 2F for
                      SwiGLU experts: gate and up), activation output aF, expert output aC, weight a
                      and three int64 indices 24, so k (2aC + aF' + aF + a + 24);
                      S shared experts (moe_dispatch.dense_ffn, one FFN of hidden S F): their input's
                      autocast cast aC (0 in fp32: it is the gate's input), pre-activation a S F' and
                      activation output a S F; residual dropout mask m(a) C
    router losses     per layer, computed by `moe_losses` after the forward (outside the layers, so
                      they are counted outside, L times): the gate logits 4E (the router's fp32
                      output) that logsumexp saves, the
                      router probabilities 4E that the Switch loss's softmax saves, logsumexp 4
    embeddings        token ids 8, embedding dropout mask m(4) C
    head              final LayerNorm input 4C + 8, and the gradient of the head's input 4C that the
                      chunked loss (chunked_loss.py) computes in the forward pass; no [N, V] logits
                      or log-softmax are kept

Not per token: the position ids 8T, each layer's expert fractions f (E floats the Switch loss saves)
and the head weight's gradient 4VC (fp32, computed by the chunked loss in the forward pass):
`fixed_activation_bytes`.

With activation checkpointing each layer keeps only its input (4C per token; torch.utils.checkpoint
holds it to rerun the layer), and the backward pass rebuilds one layer's activations at a time.

Transient peak (an upper bound): the chunked loss's temporaries at the end of the forward pass (the head
weight's cast 2VC under autocast, per chunk of R = CHUNK_ELEMENTS / V rows about 24 R V bytes of fp32
logits, softmax and gradient work, and a [V, C] partial gradient, 6VC), plus one layer's activation
gradients in the backward pass. Runtime overhead: the CUDA context and
cuBLAS workspaces (about 0.35 GB; `cuda_overhead_gb`), and 10% allocator fragmentation on the
activations and transients (the model state is a few large long-lived blocks).

Not counted yet: QK-norm (Config.qk_norm, on in the t1000 preset) saves normalised copies of q and k
and their RMS statistics, and RoPE (pos="rope", off in the t1000 preset) the rotated q and k: each about
2aC bytes per token per layer (a few MiB at the t1000's batch 4 x 256), so the plan undercounts by that
much with them on; the byte-exact tests run with both off.

Expert parallelism (E ranks share one copy of the experts, expert_parallel.py), per rank: the expert
parameters (L E (CF' + F' + FC + C)), their gradients and optimizer state are divided by E. The activations
assume a balanced router (each rank's experts receive as many pairs as its tokens send) and add, per
token and layer, what the exchange's combine keeps: the k returned expert outputs 4C and their weights 4,
and two int64 indices of each pair (gather and un-sort, 16): k (4C + 20). The all-to-all buffers: one
exchange at a time holds its send and receive buffers, 2 x tokens x k x 4C (the rows are the fp32
LayerNorm output): a transient.

`measure_saved_bytes` counts the bytes autograd really saves (saved-tensor hooks) for what training
backpropagates (the forward and `moe_losses`), per layer and outside the layers;
`tests/test_memory_accounting.py` holds the plan equal to it to the byte per layer, outside the
layers and in total, at the full t1000 width on the CPU, in fp32 and under bf16 and fp16 autocast, with
the math and the fused attention kernel, with and without activation checkpointing, and
`benchmarks/bench_memory.py` compares them at the full t1000 size. The GPU terms (fused
kernels, bool masks, the cast cache, the transient, the overhead) are stated assumptions until
`benchmarks/gpu_check.py` is run on a GPU.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from phase1_foundation.src.validation import check_int
from sparse_moe_transformer.src.moe_dispatch import ACTIVATIONS

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
    expert_parallel: int = 1  # E: the plan is per rank; experts' state divided by E
    all_to_all_buffers: int = 0  # expert parallelism: one exchange's send and receive buffers

    @property
    def model_state(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state

    @property
    def saved_for_backward(self) -> int:
        """What `measure_saved_bytes` counts: the activations and the autocast weight copies."""
        return self.activations + self.autocast_weight_copies

    @property
    def total(self) -> int:
        return (
            self.model_state
            + self.autocast_weight_copies
            + self.activations
            + self.backward_transient
            + self.fragmentation
            + self.runtime_overhead
            + self.all_to_all_buffers
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "model_state": self.model_state, "total": self.total}


def _dims(config) -> dict:
    """The Config fields the plan reads (the one place that knows their names). A config without the
    expert options (expert_activation, n_shared_expert) plans the default: GELU experts, no shared one."""
    attn_dropout = config.dropout if config.attn_dropout is None else config.attn_dropout
    activation = getattr(config, "expert_activation", "gelu")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown expert_activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
    n_shared = getattr(config, "n_shared_expert", 0)
    check_int("n_shared_expert", n_shared, minimum=0)
    return {
        "activation": activation,
        "S": n_shared,
        # w1's output width: SwiGLU experts hold the gate and up projections side by side
        "F1": 2 * config.d_ff if activation == "swiglu" else config.d_ff,
        "C": config.d_model,
        "F": config.d_ff,
        "E": config.n_expert,
        "k": config.top_k,
        "H": config.n_head,
        "V": config.vocab_size,
        "L": config.n_layer,
        "block_size": config.block_size,
        "dropout": config.dropout,
        "attn_dropout": attn_dropout,
    }


def activation_bytes_per_token(
    config,
    act_bytes: int,
    seq_len: int,
    math_attention: bool = False,
    on_gpu: bool = False,
    expert_parallel: int = 1,
) -> dict:
    """Saved-for-backward bytes per token of one layer's parts, the router losses of one layer
    (saved outside the layers), the embeddings and the head (expert_parallel > 1: balanced load)."""
    d = _dims(config)
    C, E, H = d["C"], d["E"], d["H"]
    a = act_bytes

    def mask(dtype_bytes: int) -> int:  # bytes per element of a dropout mask (module docstring)
        if d["dropout"] == 0:
            return 0
        return 1 if on_gpu else dtype_bytes

    layer_norm = 4 * C + 8  # fp32 input + mean and rstd
    if math_attention:  # q, k, v and the T x T weights in fp32, then the output projection's input
        core = 3 * 4 * C + 12 * H * seq_len + a * C
    else:  # fused kernel: the q/k/v projection output, the attention output, logsumexp
        core = 3 * a * C + a * C + 4 * H
    attention = layer_norm + a * C + core + mask(a) * C  # + q/k/v input, + residual dropout mask
    moe = layer_norm + sparse_ffn_bytes_per_token(config, a, on_gpu) + mask(a) * C  # + residual dropout mask
    if expert_parallel > 1:  # the combine keeps the returned rows and weights (compute dtype; measured in
        moe += d["k"] * (a * C + a + 16)  # fp32), and the gather and un-sort indices
    # moe_losses, per layer: fp32 gate logits and softmax probs [N, E], logsumexp [N] (in fp32 always)
    router_losses = 4 * E + 4 * E + 4
    embeddings = 8 + mask(4) * C  # token ids, dropout mask
    head = layer_norm + 4 * C  # + the head input's gradient (fp32), from the chunked loss
    return {
        "attention": attention,
        "moe": moe,
        "layer": attention + moe,
        "router_losses": router_losses,
        "embeddings": embeddings,
        "head": head,
    }


def expert_pair_bytes(C: int, F: int, act_bytes: int, activation: str = "gelu") -> int:
    """Bytes the expert Function saves per routed (token, expert) pair: the gathered input, the
    pre-activation (SwiGLU: gate and up, 2F), the activation output, the expert output and the routing
    weight in the compute dtype, and three int64 indices (token, expert, un-sort)."""
    pre_activation = 2 * F if activation == "swiglu" else F
    return act_bytes * (C + pre_activation + F + C + 1) + 3 * 8


def shared_expert_bytes_per_token(
    C: int, F: int, n_shared: int, act_bytes: int, activation: str = "gelu"
) -> int:
    """Bytes moe_dispatch.dense_ffn saves per token for n_shared shared experts of hidden size F: its
    input's autocast cast (in fp32 its input is the gate's, already counted), the pre-activation
    (SwiGLU: 2F per expert) and the activation output."""
    if n_shared == 0:
        return 0
    pre_activation = 2 * F if activation == "swiglu" else F
    cast = 0 if act_bytes == 4 else act_bytes * C
    return cast + act_bytes * n_shared * (pre_activation + F)


def sparse_ffn_bytes_per_token(config, act_bytes: int, on_gpu: bool = False) -> int:
    """Saved bytes per token of the MoE FFN (gate, routing, routed and shared experts), without the
    LayerNorm before it and the dropout after it: the gate input, top-k indices and routing weights
    [N, k] and the sort index [k*N], k expert pairs, and the shared experts."""
    d = _dims(config)
    C, F, k, a = d["C"], d["F"], d["k"], act_bytes
    # the router computes in fp32: it saves its fp32 input and fp32 routing weights
    gate_input = 4 * C
    router = 8 * k + 4 * k + 8 * k
    experts = k * expert_pair_bytes(C, F, a, d["activation"])
    shared = shared_expert_bytes_per_token(C, F, d["S"], a, d["activation"])
    return gate_input + router + experts + shared


def fixed_activation_bytes(config, seq_len: int) -> int:
    """Saved bytes that do not grow with the batch: the position ids [T] (int64), each layer's
    expert fractions f [E] (fp32, saved by the Switch loss's f * P) and the head weight's gradient
    [V, C] (fp32, computed by the chunked loss in the forward pass)."""
    d = _dims(config)
    return 8 * seq_len + d["L"] * 4 * d["E"] + 4 * d["V"] * d["C"]


def chunked_loss_transient_bytes(config, act_bytes: int) -> int:
    """The chunked loss's temporaries (module docstring): the head weight's cast under autocast, and
    per chunk the fp32 logits / softmax / gradient work (about 6 fp32 [R, V] tensors) and the [V, C]
    partial weight gradient (in the matmul dtype, then fp32)."""
    from sparse_moe_transformer.src.chunked_loss import chunk_rows

    d = _dims(config)
    V, C = d["V"], d["C"]
    cast = 0 if act_bytes == 4 else act_bytes * V * C
    return cast + 24 * chunk_rows(V) * V + (act_bytes + 4) * V * C


def matmul_params_per_layer(config) -> int:
    """Weights autocast casts in one layer: the q/k/v and output projections, and the routed and shared
    experts' w1 and w2 (cast by the dispatch itself); the router stays in fp32."""
    return (
        attention_params_per_layer(config)
        + expert_matrix_params_per_layer(config)
        + shared_expert_matrix_params_per_layer(config)
    )


def attention_params_per_layer(config) -> int:
    """The q/k/v and output projections."""
    d = _dims(config)
    return 4 * d["C"] * d["C"]


def expert_matrix_params_per_layer(config) -> int:
    """The routed experts' w1 [E, C, F'] and w2 [E, F, C] (F' = 2F for SwiGLU)."""
    d = _dims(config)
    return d["E"] * d["C"] * (d["F1"] + d["F"])


def shared_expert_matrix_params_per_layer(config) -> int:
    """The shared experts' w1 [C, S F'] and w2 [S F, C] (F' = 2F for SwiGLU)."""
    d = _dims(config)
    return d["S"] * d["C"] * (d["F1"] + d["F"])


def expert_parameter_count(config) -> int:
    """Parameters of every layer's routed experts (w1, b1, w2, b2): L E (CF' + F' + FC + C), F' = F,
    or 2F for SwiGLU experts (gate and up)."""
    d = _dims(config)
    return d["L"] * d["E"] * (d["C"] * d["F1"] + d["F1"] + d["F"] * d["C"] + d["C"])


def shared_expert_parameter_count(config) -> int:
    """Parameters of every layer's shared experts, one dense FFN of hidden S F per layer (w1 [C, S F'],
    b1 [S F'], w2 [S F, C], b2 [C]): L (S (CF' + F' + FC) + C); 0 without shared experts."""
    d = _dims(config)
    if d["S"] == 0:
        return 0
    return d["L"] * (d["S"] * (d["C"] * d["F1"] + d["F1"] + d["F"] * d["C"]) + d["C"])


def plan_memory(
    config,
    batch_size: int,
    seq_len: int,
    *,
    n_params: int,
    n_muon_params: int = 0,
    precision: str = "fp32",
    activation_checkpointing: bool = False,
    cuda_overhead_gb: float = 0.35,
    on_gpu: bool | None = None,
    expert_parallel: int = 1,
) -> MemoryPlan:
    """Predict the memory of one training micro-batch of `batch_size` x `seq_len` tokens.

    `n_params`: the model's parameter count (the model's own counting function);
    `n_muon_params`: how many of them Muon updates (one fp32 state each instead of AdamW's two);
    `on_gpu`: a CUDA run (default: precision != "fp32"): adds the CUDA runtime overhead, uses the
    fused attention kernels and bool dropout masks; a CPU run with attention dropout keeps the
    attention weights (math kernel). `expert_parallel`: E, the plan of one rank of an expert group
    holding n_expert / E experts (module docstring); a Muon run's expert matrices are divided too.
    """
    if precision not in PRECISION_BYTES:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISION_BYTES)}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("n_params", n_params)):
        check_int(name, value, minimum=1)
    check_int("n_muon_params", n_muon_params, minimum=0, maximum=n_params)
    check_int("expert_parallel", expert_parallel, minimum=1)
    d = _dims(config)
    if d["E"] % expert_parallel:
        raise ValueError(f"expert_parallel {expert_parallel} must divide n_expert ({d['E']})")
    if seq_len > d["block_size"]:
        raise ValueError(f"seq_len {seq_len} exceeds the model's block_size {d['block_size']}")
    act = PRECISION_BYTES[precision]
    tokens = batch_size * seq_len
    on_gpu = precision != "fp32" if on_gpu is None else on_gpu
    math_attention = not on_gpu and d["attn_dropout"] > 0  # CPU SDPA with dropout: the math kernel
    per_token = activation_bytes_per_token(config, act, seq_len, math_attention, on_gpu, expert_parallel)
    L = d["L"]
    if activation_checkpointing:
        kept = L * 4 * d["C"] + per_token["layer"]  # layer inputs + one rebuilt layer
    else:
        kept = L * per_token["layer"]
    outside = L * per_token["router_losses"] + per_token["embeddings"] + per_token["head"]
    activations = int(tokens * (kept + outside)) + fixed_activation_bytes(config, seq_len)
    transient = int(tokens * per_token["layer"]) + chunked_loss_transient_bytes(config, act)
    # autocast copies: attention and gate weights in every layer, except on the CPU under checkpointing
    # (no cast cache: only the rebuilt layer's); the experts' only in the rebuilt layer under checkpointing
    attention_layers = 1 if activation_checkpointing and not on_gpu else L
    expert_layers = 1 if activation_checkpointing else L
    attention_casts = attention_layers * attention_params_per_layer(config)
    expert_casts = expert_layers * expert_matrix_params_per_layer(config) // expert_parallel  # this rank's
    expert_casts += expert_layers * shared_expert_matrix_params_per_layer(config)  # on every rank
    copies = 0 if act == 4 else 2 * (attention_casts + expert_casts)
    # expert parallelism: the other E - 1 ranks of the group hold the rest of the experts
    elsewhere = expert_parameter_count(config) * (expert_parallel - 1) // expert_parallel
    muon_elsewhere = 0
    if n_muon_params:  # Muon updates every expert's w1 and w2
        muon_elsewhere = L * expert_matrix_params_per_layer(config) * (expert_parallel - 1) // expert_parallel
    n_params, n_muon_params = n_params - elsewhere, n_muon_params - muon_elsewhere
    buffers = 2 * tokens * d["k"] * 4 * d["C"] if expert_parallel > 1 else 0
    return MemoryPlan(
        n_params=n_params,
        tokens_per_micro_batch=tokens,
        precision=precision,
        activation_checkpointing=activation_checkpointing,
        parameters=4 * n_params,
        gradients=4 * n_params,
        optimizer_state=8 * n_params - 4 * n_muon_params,
        autocast_weight_copies=copies,
        activations=activations,
        backward_transient=transient,
        fragmentation=int(0.10 * (activations + transient)),
        runtime_overhead=int(cuda_overhead_gb * GB) if on_gpu else 0,
        expert_parallel=expert_parallel,
        all_to_all_buffers=buffers,
    )


def format_memory_plan(plan: MemoryPlan, budget_gb: float | None = None) -> str:
    """A small table of the plan; with `budget_gb`, whether it fits."""
    rows = [
        ("parameters (fp32)", plan.parameters),
        ("gradients (fp32)", plan.gradients),
        ("optimizer state (AdamW 2, Muon 1 x fp32)", plan.optimizer_state),
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
    if plan.expert_parallel > 1:
        rows.append(("all-to-all buffers (one exchange)", plan.all_to_all_buffers))
    width = max(len(name) for name, _ in rows)
    where = "per process"
    if plan.expert_parallel > 1:
        where = f"on each rank; {plan.expert_parallel} ranks share the experts"
    lines = [f"memory plan ({plan.n_params / 1e6:,.1f}M parameters {where}):"]
    lines += [f"  {name:<{width}}  {value / GB:7.3f} GiB" for name, value in rows]
    lines.append(f"  {'total':<{width}}  {plan.total / GB:7.3f} GiB")
    if budget_gb is not None:
        verdict = "fits" if plan.total <= budget_gb * GB else "does NOT fit"
        lines.append(
            f"  -> {verdict} in {budget_gb:g} GiB ({(budget_gb * GB - plan.total) / GB:+.3f} GiB to spare)"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- measuring


@dataclass
class SavedBytes:
    """Bytes of the distinct storages one training forward and its losses leave for the backward pass."""

    outside_layers: int  # embeddings, head (the chunked loss's gradients), every layer's router losses
    per_layer: list[int]  # saved inside each layer; under activation checkpointing, the layer's input

    @property
    def total(self) -> int:
        return self.outside_layers + sum(self.per_layer)


def _training_forward(model, idx: torch.Tensor, targets: torch.Tensor) -> None:
    """What train_step backpropagates: the forward (the chunked head and loss) and the MoE losses
    computed from its output (the one place that knows the model's interface)."""
    from sparse_moe_transformer.src.train import moe_losses  # train.py imports this module

    moe_losses(model(idx, targets, return_logits=False), model.config)


def measure_saved_bytes(model, idx: torch.Tensor, targets: torch.Tensor, autocast_dtype=None) -> SavedBytes:
    """Run one training forward of `model` and its MoE losses (under autocast to autocast_dtype, or
    in fp32), as train_step does, and count the bytes they keep for the backward pass.

    Every tensor autograd saves goes through a saved-tensor hook; its storage is counted once (q, k
    and v are views of one projection output). Parameters are left out (they are the model state;
    their autocast casts are new tensors and are counted). Forward hooks on the
    layers attribute each storage to the layer that saved it; everything else is `outside_layers`.
    That includes the router losses: `moe_losses` computes them after the forward from each layer's
    gate logits, so their saved tensors (the fp32 gate logits, the softmax probabilities, logsumexp:
    the plan's `router_losses` term) are counted outside, once per layer. Under activation checkpointing,
    torch.utils.checkpoint saves only each layer's input (its own hooks take the layer's tensors);
    the backward pass then rebuilds one layer at a time, which a plain run's `per_layer` measures.
    """
    layers = list(model.layers)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}  # storage address -> bytes
    owner: dict[int, int] = {}  # storage address -> index of the layer that saved it, -1 outside
    current = [-1]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        address = storage.data_ptr()
        if address not in param_storages and address not in saved:
            saved[address], owner[address] = storage.nbytes(), current[0]
        return t

    def enter(i: int):
        def hook(module, args):
            current[0] = i

        return hook

    def leave(module, args, output):
        current[0] = -1

    handles = [layer.register_forward_pre_hook(enter(i)) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(leave) for layer in layers]
    autocast = nullcontext() if autocast_dtype is None else torch.autocast(idx.device.type, autocast_dtype)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            _training_forward(model, idx, targets)
    finally:
        for handle in handles:
            handle.remove()
    per_layer = [0] * len(layers)
    for address, nbytes in saved.items():
        if owner[address] >= 0:
            per_layer[owner[address]] += nbytes
    outside = sum(nbytes for address, nbytes in saved.items() if owner[address] < 0)
    return SavedBytes(outside_layers=outside, per_layer=per_layer)
