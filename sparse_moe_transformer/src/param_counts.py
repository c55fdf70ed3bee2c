"""Parameter and FLOP counts of a Sparse MoE Config, computed from its fields (no model is built).

    count_parameters                 every parameter: embeddings, all experts, head
    count_active_parameters          what one token uses: top_k of the n_expert experts
    count_hidden_matrix_parameters   what Muon updates (attention and expert matrices)
    forward_flops_per_token          2 FLOPs per multiply-add of every matmul
    parameter_summary                the one-line summary the run header and the docs print

The tests check every count against the built model's `numel()` sums.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: counting needs the fields, not the model
    from sparse_moe_transformer.src.train import Config


def _expert_matrices(c: Config) -> int:
    """Weights of one expert's matrices: w1 [C, U] and w2 [F, C], U = 2F for SwiGLU (gate and up), else F."""
    up = 2 * c.d_ff if c.expert_activation == "swiglu" else c.d_ff
    return c.d_model * up + c.d_ff * c.d_model


def _layer_param_counts(c: Config) -> dict[str, int]:
    C, E, S = c.d_model, c.n_expert, c.n_shared_expert
    up = 2 * c.d_ff if c.expert_activation == "swiglu" else c.d_ff
    return {
        "attention": 4 * (C * C + C),  # q, k, v, out projections with biases
        "norms": 2 * 2 * C,  # ln1, ln2 (weight + bias)
        "gate": C * E + E,
        "one_expert": _expert_matrices(c) + up + C,  # w1, b1, w2, b2 of one expert
        # the shared experts: one FFN of hidden S F (its output bias once)
        "shared": S * (_expert_matrices(c) + up) + C if S else 0,
    }


def count_parameters(c: Config) -> int:
    """Total parameters: embeddings + layers (all experts) + final norm + untied head."""
    p = _layer_param_counts(c)
    layer = p["attention"] + p["norms"] + p["gate"] + c.n_expert * p["one_expert"] + p["shared"]
    embeddings = c.vocab_size * c.d_model + (c.block_size * c.d_model if c.pos == "learned" else 0)
    return embeddings + c.n_layer * layer + 2 * c.d_model + c.d_model * c.vocab_size


def count_hidden_matrix_parameters(c: Config) -> int:
    """The parameters Muon updates (SparseMoETransformer.hidden_matrices): q/k/v and output
    projections, every expert's w1 and w2, and the shared experts' two matrices."""
    per_layer = 4 * c.d_model * c.d_model + (c.n_expert + c.n_shared_expert) * _expert_matrices(c)
    return c.n_layer * per_layer


def count_active_parameters(c: Config, include_embeddings: bool = False) -> int:
    """Parameters used by one token: only top_k of the n_expert experts run (and every shared expert).

    By default the embedding tables and the output head are left out (the usual "active
    parameters" figure); include_embeddings=True counts the token's embedding row, its position
    row and the whole head (every logit is computed).
    """
    p = _layer_param_counts(c)
    layer = p["attention"] + p["norms"] + p["gate"] + c.top_k * p["one_expert"] + p["shared"]
    active = c.n_layer * layer + 2 * c.d_model
    if include_embeddings:
        active += (2 if c.pos == "learned" else 1) * c.d_model + c.d_model * c.vocab_size
    return active


def forward_flops_per_token(c: Config, seq_len: int | None = None, include_attention: bool = True) -> int:
    """Forward FLOPs per token (2 per multiply-add of every matmul) for sequences of seq_len.

    Per layer: q,k,v,out projections 8*C^2, router 2*C*E, top_k routed and n_shared_expert shared
    experts 2 * (their matrix weights) each (4*C*F for GELU), and the attention scores and weighted
    values 4*T*C (counted for the full T x T matrix, as torch.utils.flop_counter does, not halved for
    causality). Plus the head 2*C*V. Element-wise work (norms, GELU, softmax) is not counted.
    """
    T = c.block_size if seq_len is None else seq_len
    C = c.d_model
    layer = 8 * C * C + 2 * C * c.n_expert + (c.top_k + c.n_shared_expert) * 2 * _expert_matrices(c)
    if include_attention:
        layer += 4 * T * C
    return c.n_layer * layer + 2 * C * c.vocab_size


def parameter_summary(c: Config) -> str:
    """One line for logs and docs: total and active parameters, idle expert share, FLOPs per token."""
    total, active = count_parameters(c), count_active_parameters(c)
    return (
        f"{total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token outside embeddings/head "
        f"({c.top_k}/{c.n_expert} experts, {100 * (1 - c.top_k / c.n_expert):.1f}% of expert weights "
        "idle), "
        f"{forward_flops_per_token(c) / 1e6:.1f} MFLOP/token forward at T={c.block_size}"
    )
