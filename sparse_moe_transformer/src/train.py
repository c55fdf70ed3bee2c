"""Sparse Mixture-of-Experts transformer: the model and its training loop, in reading order.

Model (the first half)

    Config, PRESETS             t1000 (the reference model: 158.77M parameters, 18.97M active per
                                token outside the embeddings and head), cpu-demo (the offline demo),
                                cpu-small (nanoGPT's CPU model as 8 experts), tiny (tests); analytic
                                parameter, active-parameter and FLOP counts
    moe_losses                  the training objective lm + aux + z from what the model returns (nothing
                                is kept on a module), with Phase 2's load_balancing_loss (Switch, from
                                expert counts) and router_z_loss (ST-MoE), taught in its MoE lesson
    SparseMoEFFN                gate -> top-k -> softmax over the chosen logits -> experts, with the
                                sorted dispatch of moe_dispatch.py; returns (out, gate logits, routing)
    CausalSelfAttention         F.scaled_dot_product_attention, causal, with Phase 5's KVCache;
                                options: RoPE (Phase 2's), QK-norm
    SparseMoETransformerLayer   pre-norm: x + attn(ln1(x)); x + moe(ln2(x))
    SparseMoETransformer        embeddings, layers, final norm, untied head; forward(idx, targets)
                                -> MoEOutput (training: the head and loss chunk by chunk,
                                chunked_loss.py); generate / stream_generate (Phase 5's sampling)

Training (the second half)

    TrainSettings, TRAINING_PRESETS   batch, accumulation, schedule, intervals per preset
    make_optimizer              AdamW; weight decay on the parameters the model lists as decayed;
                                or Muon for the hidden matrices + that AdamW (moe_optimizer.py)
    setup_runtime               device, precision (bf16 only where the GPU has it natively), DDP
    train_step                  gradient accumulation, autocast + fp16 GradScaler, NaN guard, clip
    evaluate, sample_text       validation loss over real tokens; a short sample
    train_main                  resolve the run, build the state, the loop, save

The other modes (eval, generate, benchmark, plan, plot) and the command line live in cli.py:
    python sparse_moe_transformer/src/train.py --help
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute_in_backward

from phase1_foundation.src.validation import check_int, check_number
from phase2_architecture.src.generation import evaluating, stream_tokens
from phase2_architecture.src.mixture_of_experts import expert_capacity, load_balancing_loss, router_z_loss
from phase2_architecture.src.positional_encoding import RotaryEmbedding
from phase3_components.src.hardware import (
    PRECISIONS,
    Choice,
    choose_newton_schulz_dtype,
    choose_precision,
    hardware_facts,
    hardware_report,
)
from phase3_components.src.lr_schedules import (
    linear_decay_lr,
    linear_warmup_lr,
    set_learning_rate,
    warmup_cosine_lr,
)
from phase4_training.src.training_loop import autocast_context, capture_rng_state, restore_rng_state
from phase5_production.src.kv_cache import KVCache, shifted_causal_mask
from phase5_production.src.sampling import sampler
from sparse_moe_transformer.src.checkpointing import (
    BEST_NAME,
    LATEST_NAME,
    RunFolderLock,
    check_same_config,
    load_model_state,
    read_checkpoint,
    remove_stale_temp_files,
    save_run_checkpoints,
)
from sparse_moe_transformer.src.chunked_loss import linear_cross_entropy
from sparse_moe_transformer.src.cpu_memory import keep_freed_memory
from sparse_moe_transformer.src.data_pipeline import (
    BlockBatchSampler,
    blocks_to_batch,
    data_source_from_namespace,
    iter_eval_batches,
    prepare_data,
)
from sparse_moe_transformer.src.expert_parallel import (
    ExpertParallelModel,
    check_layout,
    every_rank_batches,
    expert_parallel_ffn,
    init_expert_parallel,
    keep_local_optimizer_state,
    shard_experts,
)
from sparse_moe_transformer.src.memory_plan import format_memory_plan, plan_memory
from sparse_moe_transformer.src.moe_dispatch import Routing, expert_ffn, route_tokens
from sparse_moe_transformer.src.moe_optimizer import MuonAdamW
from sparse_moe_transformer.src.rank_checks import (
    TIMEOUT_ENV,
    RankHeartbeat,
    check_same_inputs,
    is_collective_failure,
    process_group_timeout,
)
from sparse_moe_transformer.src.text_tokenizers import tokenizer_from_state
from sparse_moe_transformer.src.training_plots import METRICS_FILE, make_plots

# ----------------------------------------------------------------------------- Config


@dataclass(frozen=True)
class Config:
    """Model hyper-parameters, named as in the Phase 2 GPT. `Config.from_preset(name, **overrides)`."""

    vocab_size: int = 4096
    block_size: int = 128  # the longest context (learned positions 0 .. block_size-1)
    n_layer: int = 4
    n_head: int = 6
    d_model: int = 192
    n_expert: int = 8
    top_k: int = 2  # experts per token
    d_ff: int = 384  # hidden size of each expert
    dropout: float = 0.0  # on embeddings, attention output and expert output (the residual branches)
    attn_dropout: float | None = None  # on the attention probabilities; None = the same as dropout
    # None = dropless (default). Else each expert takes ceil(cf*N*k/E) pairs and drops the rest;
    # the limit is shared by the whole batch, so it is not strictly causal (see moe_dispatch.py).
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.01  # Switch load-balancing loss coefficient
    z_loss_coef: float = 1e-3  # router z-loss coefficient
    init_std: float = 0.02
    # Recipe options from the modded-nanogpt speedrun (issue 15); the defaults are the original recipe,
    # so configs saved before these fields existed load unchanged.
    pos: str = "learned"  # "learned": a table of block_size position vectors; "rope": rotary, in attention
    qk_norm: bool = False  # RMS-normalise every head's queries and keys (no weights) before the dot product
    zero_init_proj: bool = False  # the residual projections (attention out, expert w2) start at 0
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap); None = no cap
    expert_activation: str = "gelu"  # "gelu" or "relu2" (relu(h)^2) inside every expert

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "n_expert", "top_k", "d_ff"):
            check_int(f"Config.{name}", getattr(self, name), minimum=1)
        if self.d_model % self.n_head:
            raise ValueError(
                f"Config.n_head must divide d_model: d_model={self.d_model} is not a multiple of "
                f"n_head={self.n_head}."
            )
        if self.top_k > self.n_expert:
            raise ValueError(
                f"Config.top_k must be <= n_expert, got top_k={self.top_k} > n_expert={self.n_expert}."
            )
        check_number("Config.dropout", self.dropout, low=0, below=1)
        if self.attn_dropout is not None:
            check_number("Config.attn_dropout (None = dropout)", self.attn_dropout, low=0, below=1)
        if self.capacity_factor is not None:
            check_number("Config.capacity_factor (None = dropless)", self.capacity_factor, above=0)
        for name in ("aux_loss_coef", "z_loss_coef"):
            check_number(f"Config.{name}", getattr(self, name), low=0)
        check_number("Config.init_std", self.init_std, low=0, high=1)
        if self.pos not in ("learned", "rope"):
            raise ValueError(f"Config.pos must be 'learned' or 'rope', got {self.pos!r}.")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(
                f"Config.pos='rope' rotates feature pairs: head_dim = d_model / n_head = {self.head_dim} "
                "must be even; change d_model or n_head."
            )
        if self.logit_softcap is not None:
            check_number("Config.logit_softcap (None = off)", self.logit_softcap, above=0)
        if self.expert_activation not in ("gelu", "relu2"):
            raise ValueError(
                f"Config.expert_activation must be 'gelu' or 'relu2', got {self.expert_activation!r}."
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> Config:
        """A named preset with some fields replaced: Config.from_preset("cpu-demo", dropout=0.1)."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"Unknown Config field(s) {unknown}; the fields are {sorted(known)}.")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def from_saved(cls, saved: dict) -> Config:
        """The Config of a checkpoint, written by this version or an earlier one.

        Fields renamed since (n_layers -> n_layer, ...) take their new names; fields added since
        take their defaults, which reproduce the behaviour from before they existed (attn_dropout
        None = "the same as dropout"); a field this version does not know is an error."""
        values = {CONFIG_RENAMES.get(key, key): value for key, value in saved.items()}
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"the checkpoint's config has field(s) {unknown} that this version of the model does not "
                "know: it was written by a newer or foreign version; use the matching llm-foundation"
            )
        return cls(**values)


CONFIG_RENAMES = {
    "n_layers": "n_layer",
    "n_heads": "n_head",
    "n_experts": "n_expert",
    "max_len": "block_size",
}

# The architecture of the time-to-quality recipe (issue 15; BENCHMARKS.md, "Time to quality", has the
# measurements and the ablation of each part): rotary positions, QK-norm, residual projections that start
# at zero. (The logit soft-cap was measured too and left out: on this CPU it cost 6% of the step time and
# gained nothing.) Its training half (Muon, warmup-stable-decay) is TRAINING_RECIPE below.
RECIPE = dict(pos="rope", qk_norm=True, zero_init_proj=True)

PRESETS: dict[str, Config] = {
    # The reference model: GPT-2 vocabulary, 6 layers of 16 experts (top-2). The recipe without RoPE:
    # the learned position table is part of the reference size (158.77M); --set pos=rope drops it.
    # No dropout: 41M training tokens see TinyStories less than once.
    "t1000": Config(
        vocab_size=50257, block_size=256, n_layer=6, n_head=8, d_model=512, n_expert=16, top_k=2,
        d_ff=1024, dropout=0.0, **{**RECIPE, "pos": "learned"},
    ),
    # Trains on a 2-core CPU: small BPE vocabulary, 4 layers of 8 experts.
    "cpu-demo": Config(
        vocab_size=4096, block_size=128, n_layer=4, n_head=6, d_model=192, n_expert=8, top_k=2,
        d_ff=384, dropout=0.0, **RECIPE,
    ),
    # nanoGPT's small CPU model (4 layers, 4 heads, d 128, block 256: 0.8M active parameters per
    # token outside the embeddings) with its FFN split into 8 experts of 256, top-2. Dropout on
    # the residual branches only (attention dropout would leave SDPA's fused CPU kernel): its
    # 238K-token TinyStories sample is seen about 14 times in 800 steps.
    "cpu-small": Config(
        vocab_size=4096, block_size=256, n_layer=4, n_head=4, d_model=128, n_expert=8, top_k=2,
        d_ff=256, dropout=0.1, attn_dropout=0.0, **RECIPE,
    ),
    # For unit tests: a few milliseconds per forward.
    "tiny": Config(
        vocab_size=97, block_size=32, n_layer=2, n_head=4, d_model=32, n_expert=4, top_k=2, d_ff=48,
        dropout=0.0,
    ),
}  # fmt: skip


def _layer_param_counts(c: Config) -> dict[str, int]:
    C, E, Fh = c.d_model, c.n_expert, c.d_ff
    return {
        "attention": 4 * (C * C + C),  # q, k, v, out projections with biases
        "norms": 2 * 2 * C,  # ln1, ln2 (weight + bias)
        "gate": C * E + E,
        "one_expert": C * Fh + Fh + Fh * C + C,  # w1, b1, w2, b2 of one expert
    }


def count_parameters(c: Config) -> int:
    """Total parameters: embeddings + layers (all experts) + final norm + untied head."""
    p = _layer_param_counts(c)
    layer = p["attention"] + p["norms"] + p["gate"] + c.n_expert * p["one_expert"]
    embeddings = c.vocab_size * c.d_model + (c.block_size * c.d_model if c.pos == "learned" else 0)
    return embeddings + c.n_layer * layer + 2 * c.d_model + c.d_model * c.vocab_size


def count_hidden_matrix_parameters(c: Config) -> int:
    """The parameters Muon updates (SparseMoETransformer.hidden_matrices): q/k/v and output
    projections and every expert's w1 and w2."""
    return c.n_layer * (4 * c.d_model * c.d_model + 2 * c.n_expert * c.d_model * c.d_ff)


def count_active_parameters(c: Config, include_embeddings: bool = False) -> int:
    """Parameters used by one token: only top_k of the n_expert experts run.

    By default the embedding tables and the output head are left out (the usual "active
    parameters" figure); include_embeddings=True counts the token's embedding row, its position
    row and the whole head (every logit is computed).
    """
    p = _layer_param_counts(c)
    layer = p["attention"] + p["norms"] + p["gate"] + c.top_k * p["one_expert"]
    active = c.n_layer * layer + 2 * c.d_model
    if include_embeddings:
        active += (2 if c.pos == "learned" else 1) * c.d_model + c.d_model * c.vocab_size
    return active


def forward_flops_per_token(c: Config, seq_len: int | None = None, include_attention: bool = True) -> int:
    """Forward FLOPs per token (2 per multiply-add of every matmul) for sequences of seq_len.

    Per layer: q,k,v,out projections 8*C^2, router 2*C*E, top_k experts top_k * 4*C*F, and the
    attention scores and weighted values 4*T*C (counted for the full T x T matrix, as
    torch.utils.flop_counter does, not halved for causality). Plus the head 2*C*V.
    Element-wise work (norms, GELU, softmax) is not counted.
    """
    T = c.block_size if seq_len is None else seq_len
    C = c.d_model
    layer = 8 * C * C + 2 * C * c.n_expert + c.top_k * 4 * C * c.d_ff
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


# ----------------------------------------------------------------------------- MoE losses


@dataclass
class MoELosses:
    lm: torch.Tensor  # cross-entropy of the next token
    aux: torch.Tensor  # load-balancing loss, mean over layers (unscaled)
    z: torch.Tensor  # router z-loss, mean over layers (unscaled)
    total: torch.Tensor  # lm + aux_loss_coef * aux + z_loss_coef * z: what training minimises


def moe_losses(
    out: MoEOutput, config: Config, reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> MoELosses:
    """The training objective from a forward pass with targets. `reduce_counts` (e.g. an all_reduce
    over DDP ranks) turns this rank's expert counts into the global batch's before the balance loss."""
    if out.loss is None:
        raise ValueError("moe_losses needs the LM loss: call the model with targets")
    aux, z = [], []
    for gate_logits, routing in zip(out.router_logits, out.routing):
        logits = gate_logits.float()  # [N, E]
        counts = routing.routed_counts.float()  # [E]
        if reduce_counts is not None:
            counts = reduce_counts(counts)
        aux.append(load_balancing_loss(torch.softmax(logits, dim=-1), counts))
        z.append(router_z_loss(logits))
    aux, z = torch.stack(aux).mean(), torch.stack(z).mean()
    return MoELosses(out.loss, aux, z, out.loss + config.aux_loss_coef * aux + config.z_loss_coef * z)


# ----------------------------------------------------------------------------- SparseMoEFFN


class SparseMoEFFN(nn.Module):
    """y = sum over the top_k experts e chosen for x of  g_e(x) * (act(x W1_e + b1_e) W2_e + b2_e).

    act = GELU, or ReLU^2 with Config.expert_activation="relu2".

    Gate logits z = x W_g + b_g [N, E]; the top_k logits are softmaxed among themselves into the
    routing weights g. Only top_k of n_expert expert FFNs run per token (moe_dispatch.py).
    forward returns (y, gate logits, routing): the losses are computed from them by the caller.
    """

    def __init__(self, config: Config):
        super().__init__()
        C, E, Fh = config.d_model, config.n_expert, config.d_ff
        self.n_expert, self.top_k, self.capacity_factor = E, config.top_k, config.capacity_factor
        self.activation = config.expert_activation
        self.gate = nn.Linear(C, E)
        self.w1 = nn.Parameter(torch.empty(E, C, Fh))  # [E, C, F]
        self.b1 = nn.Parameter(torch.zeros(E, Fh))  # [E, F]
        self.w2 = nn.Parameter(torch.empty(E, Fh, C))  # [E, F, C]
        self.b2 = nn.Parameter(torch.zeros(E, C))  # [E, C]
        nn.init.normal_(self.w1, std=config.init_std)
        nn.init.normal_(self.w2, std=config.init_std)
        self.expert_parallel = None  # set by expert_parallel.shard_experts: this rank holds a slice

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Routing]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, C]
        gate_logits = self.gate(x)  # [N, E]
        if self.expert_parallel is not None:  # the other experts live on other ranks: all-to-all
            out, routing = expert_parallel_ffn(self, x, gate_logits, self.expert_parallel)
            return out.reshape(shape), gate_logits, routing
        capacity = expert_capacity(x.shape[0], self.top_k, self.n_expert, self.capacity_factor)
        routing = route_tokens(gate_logits, self.top_k, capacity)
        out = expert_ffn(x, self.w1, self.b1, self.w2, self.b2, routing, self.activation)  # [N, C]
        return out.reshape(shape), gate_logits, routing


# ----------------------------------------------------------------------------- attention and layer


class CausalSelfAttention(nn.Module):
    """softmax(q k^T / sqrt(Dh)) v per head, causal. Options: qk_norm (queries and keys RMS-normalised
    per head, which bounds the attention logits) and pos="rope" (queries and keys rotated by their
    positions, Phase 2's RoPE, so the scores depend on relative positions only)."""

    def __init__(self, config: Config):
        super().__init__()
        self.n_head, self.qk_norm = config.n_head, config.qk_norm
        # RoPE's cos/sin tables are buffers left out of the state dict (recomputed, never saved)
        self.rope = RotaryEmbedding(config.head_dim, config.block_size) if config.pos == "rope" else None
        # Dropout on the attention probabilities. On the CPU, SDPA has no fused kernel with dropout
        # and falls back to the unfused math path (about 30% slower training at d_model 128).
        self.dropout = config.dropout if config.attn_dropout is None else config.attn_dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)  # q, k, v projections fused
        self.out_proj = nn.Linear(config.d_model, config.d_model)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, start: int = 0
    ) -> torch.Tensor:
        """x [B, T, C] at positions start..start+T-1; with a cache, `start` tokens of `layer` are cached."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)  # 3 x [B, T, C]
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)
        )  # [B,H,T,Dh]
        if self.qk_norm:
            q, k = F.rms_norm(q, (q.shape[-1],)), F.rms_norm(k, (k.shape[-1],))  # each head vector: RMS 1
        if self.rope is not None:
            q, k = self.rope(q, start), self.rope(k, start)  # rotated by positions start .. start+T-1
        mask, is_causal = None, T > 1
        if start > 0:  # new queries see every cached key and, among themselves, the past
            mask = shifted_causal_mask(T, start, device=x.device)  # [T, start + T]
            is_causal = False
        if cache is not None:
            k, v = cache.append(layer, k, v)  # [B, H, start + T, Dh]
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # [B, T, C]
        return self.resid_drop(self.out_proj(y))


class SparseMoETransformerLayer(nn.Module):
    """Pre-norm block: x = x + attn(ln1(x)); x = x + dropout(moe(ln2(x))).

    With `activation_checkpointing` set, training keeps only the layer's input and recomputes the
    rest in the backward pass (torch.utils.checkpoint, non-reentrant; it restores the RNG state,
    so dropout masks repeat exactly): less memory for about a third more compute.
    """

    def __init__(self, config: Config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.moe = SparseMoEFFN(config)
        self.ffn_drop = nn.Dropout(config.dropout)
        self.activation_checkpointing = False

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        """x [B, T, C] -> (x [B, T, C], gate logits [B*T, E], routing)."""
        if self.activation_checkpointing and torch.is_grad_enabled() and cache is None:
            return recompute_in_backward(self._forward, x, use_reentrant=False)
        return self._forward(x, cache, layer, start)

    def _forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        x = x + self.attn(self.ln1(x), cache, layer, start)  # [B, T, C]
        moe_out, gate_logits, routing = self.moe(self.ln2(x))
        return x + self.ffn_drop(moe_out), gate_logits, routing


# ----------------------------------------------------------------------------- model


@dataclass
class MoEOutput:
    logits: torch.Tensor | None  # [B, T, V]; None from forward(..., return_logits=False)
    loss: torch.Tensor | None  # LM cross-entropy (targets -100 ignored); None without targets
    router_logits: list[torch.Tensor]  # per layer, [B*T, E]: the input of the MoE losses
    routing: list[Routing]  # per layer: which experts each token used (routing.routed_counts [E])


@dataclass
class TokenRouting:
    """The router's decisions as plain tensors, per token and layer (SparseMoETransformer.token_routing)."""

    experts: torch.Tensor  # [B, T, L, k] long: the top-k experts, in the order topk ranked them
    weights: torch.Tensor  # [B, T, L, k]: their routing weights (softmax over the k chosen logits)
    kept: torch.Tensor  # [B, T, L, k] bool: False where the expert capacity dropped the pair
    probs: torch.Tensor  # [B, T, L, E]: the full router distribution (softmax over all E logits)


class SparseMoETransformer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        if not isinstance(config, Config):
            raise TypeError(f"SparseMoETransformer needs a Config, got {type(config).__name__}.")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.pos == "learned":
            self.pos_emb = nn.Embedding(config.block_size, config.d_model)  # learned positions
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(SparseMoETransformerLayer(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)  # untied
        self.apply(self._init_weights)
        # GPT-2's scaled init: the two projections that write into the residual stream in each of
        # the L layers (attention output, expert output) start at std / sqrt(2L), so the residual
        # stream's variance at init does not grow with depth.
        residual_std = config.init_std / math.sqrt(2 * config.n_layer)
        for layer in self.layers:
            nn.init.normal_(layer.attn.out_proj.weight, std=residual_std)
            nn.init.normal_(layer.moe.w2, std=residual_std)
            if config.zero_init_proj:  # modded-nanogpt: every layer starts as the identity
                nn.init.zeros_(layer.attn.out_proj.weight)
                nn.init.zeros_(layer.moe.w2)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)

    def decayed_parameters(self) -> list[nn.Parameter]:
        """The weight matrices AdamW decays: attention, gate, experts, head. Norms, biases and the
        embedding tables are left out (decaying them pulls gains, offsets and token vectors to 0)."""
        decayed = [self.lm_head.weight]
        for layer in self.layers:
            decayed += [layer.attn.qkv.weight, layer.attn.out_proj.weight, layer.moe.gate.weight]
            decayed += [layer.moe.w1, layer.moe.w2]
        return decayed

    def hidden_matrices(self) -> list[nn.Parameter]:
        """What Muon updates (TrainSettings.optimizer "muon"): the attention projections and the expert
        stacks (each expert orthogonalised separately); not the embeddings, router or head."""
        hidden = []
        for layer in self.layers:
            hidden += [layer.attn.qkv.weight, layer.attn.out_proj.weight, layer.moe.w1, layer.moe.w2]
        return hidden

    def set_activation_checkpointing(self, enabled: bool) -> None:
        for layer in self.layers:
            layer.activation_checkpointing = enabled

    def _check_idx(self, idx: torch.Tensor, start: int = 0) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.dim() != 2:
            raise TypeError("idx must be a LongTensor of shape [batch, seq_len].")
        B, T = idx.shape
        if T == 0:
            raise ValueError("idx is empty: give at least one token per sequence.")
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence length {start + T} exceeds block_size={self.config.block_size}; crop the "
                f"input to the last {self.config.block_size} tokens or use a larger Config.block_size."
            )
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(
                f"token ids must be in [0, {self.config.vocab_size}), got values in [{lo}, {hi}]; "
                "check that the tokenizer matches Config.vocab_size."
            )

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_logits: bool = True,
    ) -> MoEOutput:
        """idx [B, T] -> MoEOutput. targets [B, T] (already shifted: targets[t] is the token after
        position t, -100 = ignore). With a cache, positions continue from cache.length.

        return_logits=False (training and evaluation, with targets): the head and the cross-entropy
        run chunk by chunk (chunked_loss.linear_cross_entropy, the same loss), the [B, T, V] logits
        are never materialised, and MoEOutput.logits is None."""
        start = 0 if cache is None else cache.length
        self._check_idx(idx, start)
        T = idx.shape[1]
        x = self.tok_emb(idx)  # [B, T, C]
        if self.config.pos == "learned":
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))  # + [T, C]
        x = self.drop(x)
        router_logits, routing = [], []
        for i, layer in enumerate(self.layers):
            x, gate_logits, layer_routing = layer(x, cache, i, start)
            router_logits.append(gate_logits)
            routing.append(layer_routing)
        x = self.ln_f(x)  # [B, T, C]
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(
                f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}."
            )
        if not return_logits:
            if targets is None:
                raise ValueError("return_logits=False computes the loss only: pass targets")
            cap = self.config.logit_softcap
            loss = linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), cap)
            return MoEOutput(None, loss, router_logits, routing)
        logits = self.lm_head(x)  # [B, T, V]
        if self.config.logit_softcap is not None:  # smoothly bounded to (-cap, cap)
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return MoEOutput(logits, loss, router_logits, routing)

    @torch.no_grad()
    def token_routing(self, idx: torch.Tensor) -> TokenRouting:
        """idx [B, T] -> which experts each token went to in each layer, from one forward pass.

        The forward already computes these for the dispatch (Routing.topk_index / topk_weight);
        this only regroups them by token, so asking costs a forward pass and not asking costs nothing.
        """
        B, T = idx.shape
        out = self(idx)
        N = B * T
        experts = torch.stack([r.topk_index for r in out.routing], dim=1)  # [N, L, k]
        weights = torch.stack([r.topk_weight for r in out.routing], dim=1)  # [N, L, k]
        # unsort_index is slot-major ([k*N]); a dropped pair points one past the kept pairs
        kept = torch.stack([(r.unsort_index < r.token_index.numel()).view(-1, N).t() for r in out.routing], 1)
        probs = torch.softmax(torch.stack(out.router_logits, dim=1).float(), dim=-1)  # [N, L, E]
        shape = (B, T, *experts.shape[1:])  # [B, T, L, k]
        return TokenRouting(
            experts.view(shape), weights.view(shape), kept.view(shape), probs.view(*shape[:3], -1)
        )

    # ------------------------------------------------------------------------- generation

    @torch.no_grad()
    def stream_generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        eos_token_id: int | None = None,
        seed: int | None = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, LongTensor [B], one step at a time.

        The loop is Phase 2's stream_tokens (the course GPT's), sampling Phase 5's sample_next_token
        (temperature 0 = greedy; the repetition penalty sees the prompt and the tokens generated so
        far). Rows that produced eos_token_id keep producing it; generation stops once every row has.
        With use_cache the prompt is prefilled once into Phase 5's KVCache and each step feeds one
        token; without it every step recomputes the whole prefix (same tokens, slower). Past
        block_size the model sees the last block_size tokens (the window slides, as in the course
        GPT; phase2_architecture/src/generation.py says why).
        """
        if not torch.is_tensor(idx) or idx.dim() != 2:
            self._check_idx(idx)  # raises: idx must be a LongTensor [B, T]
        for window in idx.split(self.config.block_size, dim=1):  # a longer prompt: every id checked
            self._check_idx(window)
        if eos_token_id is not None and not 0 <= eos_token_id < self.config.vocab_size:
            raise ValueError(f"eos_token_id must be in [0, {self.config.vocab_size}), got {eos_token_id!r}.")
        generator = None if seed is None else torch.Generator(device=idx.device).manual_seed(seed)
        knobs = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)

        def logits_fn(ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
            return self(ids, cache=cache).logits  # [B, T, V]

        with evaluating(self):
            yield from stream_tokens(
                logits_fn,
                idx,
                max_new_tokens,
                sampler(**knobs, generator=generator),
                block_size=self.config.block_size,
                cache=KVCache(self.config.n_layer, self.config.block_size) if use_cache else None,
                eos_token_id=eos_token_id,
            )

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """idx [B, T] -> [B, T + n] with n <= max_new_tokens new tokens (fewer if every row hit EOS).

        Keyword arguments as in stream_generate: temperature, top_k, top_p, repetition_penalty,
        eos_token_id, seed, use_cache.
        """
        new = list(self.stream_generate(idx, max_new_tokens, **kwargs))
        if not new:
            return idx.clone()
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1)


def load_trained_model(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """A checkpoint (file or run folder; best.pt preferred) -> (model in eval mode, tokenizer, checkpoint).

    The file is read onto the CPU first (a 4 GB GPU never holds two copies of the weights)."""
    checkpoint = read_checkpoint(path)
    config = Config.from_saved(checkpoint["config"])
    model = SparseMoETransformer(config)
    load_model_state(model, checkpoint)
    if "tokenizer" not in checkpoint:
        raise ValueError(f"{checkpoint['path']} holds no tokenizer: it was not written by --mode train")
    tokenizer = tokenizer_from_state(checkpoint["tokenizer"])
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"{checkpoint['path']}: tokenizer ({tokenizer.vocab_size} ids) and model "
            f"(vocab_size {config.vocab_size}) disagree; the checkpoint is damaged"
        )
    return model.to(device).eval(), tokenizer, checkpoint


# =============================================================================================
# Training
# =============================================================================================
#
# `python sparse_moe_transformer/src/train.py --mode train ...` runs `train_main` below:
#
#   data        tokenize once into a memory-mapped cache (data_pipeline.prepare_data), packed with EOT
#   model       Config (preset + --set overrides, vocab_size from the tokenizer) -> SparseMoETransformer
#   optimizer   AdamW; weight decay on the model's decayed_parameters() only
#   schedule    linear warmup + cosine decay (Phase 3's warmup_cosine_lr), a pure function of the step
#   one step    grad_accum_steps micro-batches: loss = lm + aux_coef * aux + z_coef * z, / grad_accum_steps,
#               backward (through the fp16 GradScaler where fp16 is used), clip, AdamW step
#   every N     log (tqdm bar + metrics.jsonl), evaluate (val loss, perplexity, a short sample),
#               checkpoint (latest.pt, best.pt), plots at the end
#   resume      latest.pt holds model, optimizer, schedule, scaler, step, sampler position, RNGs,
#               config and tokenizer: the resumed run repeats the uninterrupted one exactly
#   DDP         under torchrun each rank trains on its slice of every global batch; gradients are
#               averaged by DistributedDataParallel; only rank 0 logs and saves.
#   experts     --expert-parallel E: groups of E ranks share one copy of the experts and exchange tokens by
#               all-to-all (expert_parallel.py); checkpoints keep one process's layout.

# Training defaults per preset (model presets live in PRESETS). Every value can be overridden by its
# flag (--batch-size, --max-lr, ...). t1000: 5,000 steps x 4 x 8 x 256 = 41M tokens on a 4 GB GPU.
# The training half of the recipe: Muon (lr 0.02) for the attention and expert matrices, AdamW (max_lr)
# for the rest; warmup, a constant learning rate, then a linear cool-down over the last 40% of the steps.
TRAINING_RECIPE = dict(optimizer="muon", muon_lr=0.02, lr_schedule="wsd")

TRAINING_PRESETS = {
    "t1000": dict(
        batch_size=4, grad_accum_steps=8, max_steps=5000, max_lr=6e-4, min_lr=6e-5, warmup_steps=200,
        eval_interval=250, eval_batches=50, log_interval=10, save_interval=250, **TRAINING_RECIPE,
    ),
    "cpu-demo": dict(
        batch_size=16, grad_accum_steps=1, max_steps=250, max_lr=3e-3, min_lr=3e-4, warmup_steps=20,
        eval_interval=50, eval_batches=10, log_interval=10, save_interval=50, **TRAINING_RECIPE,
    ),
    "cpu-small": dict(  # nanoGPT's CPU batch (16 x 256) and AdamW lr (1e-3 -> 1e-4)
        batch_size=16, grad_accum_steps=1, max_steps=800, max_lr=1e-3, min_lr=1e-4, warmup_steps=30,
        eval_interval=250, eval_batches=50, log_interval=10, save_interval=250, **TRAINING_RECIPE,
    ),
}  # fmt: skip
TRAINING_PRESETS["tiny"] = TRAINING_PRESETS["cpu-demo"]


@dataclass
class TrainSettings:
    """Everything about a training run that is not the model (stored in every checkpoint)."""

    batch_size: int  # sequences per micro-batch per rank
    grad_accum_steps: int  # micro-batches per optimizer step
    seq_len: int  # tokens per training sequence (<= config.block_size)
    max_steps: int  # optimizer steps; the cosine schedule ends here
    max_lr: float  # peak learning rate
    min_lr: float  # end of the cosine
    warmup_steps: int
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    eval_interval: int = 100  # optimizer steps between evaluations (0 = only at the end)
    eval_batches: int = 20  # validation batches per evaluation (0 = the whole validation split)
    log_interval: int = 10  # optimizer steps between metrics.jsonl records
    save_interval: int = 100  # optimizer steps between latest.pt saves (0 = evaluations and end only)
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    activation_checkpointing: bool = False
    compile: bool = False
    sample_tokens: int = 48  # tokens of the sample printed at each evaluation (0 = none)
    world_size: int = 1  # ranks the run was launched with (global batch = batch * accum * world)
    expert_parallel: int = 1  # E: ranks that share one copy of the experts (expert_parallel.py)
    # Recipe options (issue 15); the defaults are the original recipe, so older checkpoints resume as before.
    lr_schedule: str = "cosine"  # "cosine": warmup + cosine; "wsd": warmup, constant, linear cool-down
    cooldown_frac: float = 0.4  # wsd: the last fraction of max_steps that decays linearly to min_lr
    optimizer: str = "adamw"  # "adamw"; "muon": Muon for attention and expert matrices, AdamW for the rest
    muon_lr: float = 0.02  # Muon's peak lr (follows the schedule: muon_lr * lr_at(step) / max_lr)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0  # Muon's decoupled decay, times Muon's lr
    ns_dtype: str = "auto"  # Newton-Schulz dtype: auto (the fastest here: hardware.py) | fp32 | bf16 | fp16

    def __post_init__(self):
        for name in ("batch_size", "grad_accum_steps", "seq_len", "max_steps", "log_interval"):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name), minimum=1)
        for name in ("warmup_steps", "eval_interval", "eval_batches", "save_interval", "sample_tokens"):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name), minimum=0)
        check_int("--expert-parallel", self.expert_parallel, minimum=1)
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"--warmup-steps ({self.warmup_steps}) exceeds --max-steps ({self.max_steps})")
        check_number("--max-lr", self.max_lr, above=0)
        check_number("--min-lr", self.min_lr, low=0, high=self.max_lr)
        check_number("--weight-decay", self.weight_decay, low=0)
        check_number("--grad-clip (0 = off)", self.grad_clip, low=0)
        for name in ("beta1", "beta2"):
            check_number(f"TrainSettings.{name}", getattr(self, name), low=0, below=1)
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown --precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.lr_schedule not in ("cosine", "wsd"):
            raise ValueError(f"unknown --lr-schedule {self.lr_schedule!r}: choose cosine or wsd")
        check_number("--cooldown-frac", self.cooldown_frac, low=0, high=1)
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"unknown --optimizer {self.optimizer!r}: choose adamw or muon")
        check_number("--muon-lr", self.muon_lr, above=0)
        check_number("--muon-momentum", self.muon_momentum, low=0, below=1)
        check_number("--muon-weight-decay", self.muon_weight_decay, low=0)
        if self.ns_dtype not in PRECISIONS:
            raise ValueError(f"unknown --ns-dtype {self.ns_dtype!r}: choose one of {', '.join(PRECISIONS)}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum_steps * self.seq_len * self.world_size

    @classmethod
    def from_saved(cls, saved: dict) -> dict:
        """A checkpoint's train_args under today's names (lr -> max_lr, grad_accum -> grad_accum_steps,
        block_size -> seq_len)."""
        return {SETTINGS_RENAMES.get(key, key): value for key, value in saved.items()}


SETTINGS_RENAMES = {"lr": "max_lr", "grad_accum": "grad_accum_steps", "block_size": "seq_len"}


def lr_at(step: int, s: TrainSettings) -> float:
    """The learning rate of optimizer step `step` (0-based): warmup, then cosine to min_lr; or
    (lr_schedule "wsd") warmup, max_lr until the last cooldown_frac of the steps, then linear to min_lr."""
    if s.lr_schedule == "wsd":
        cooldown = round(s.cooldown_frac * s.max_steps)
        if step < s.warmup_steps:
            return linear_warmup_lr(step, max_lr=s.max_lr, warmup_steps=s.warmup_steps)
        if step < s.max_steps - cooldown:
            return s.max_lr
        done = step - (s.max_steps - cooldown)  # steps into the cool-down
        return linear_decay_lr(done, max_lr=s.max_lr, min_lr=s.min_lr, total_steps=max(cooldown, 1))
    return warmup_cosine_lr(
        step, max_lr=s.max_lr, min_lr=s.min_lr, warmup_steps=s.warmup_steps, total_steps=s.max_steps
    )


def make_optimizer(
    model: SparseMoETransformer, s: TrainSettings, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW with weight decay on the model's decayed_parameters() and none on the rest; or (optimizer
    "muon") Muon for the model's hidden_matrices() and that AdamW for the others (moe_optimizer.py)."""
    decayed = {id(p) for p in model.decayed_parameters()}
    muon = {id(p) for p in model.hidden_matrices()} if s.optimizer == "muon" else set()
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in muon]
    groups = [
        {"params": [p for p in params if id(p) in decayed], "weight_decay": s.weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]
    if s.optimizer == "muon":
        return MuonAdamW(
            model.hidden_matrices(), groups, lr=s.max_lr, lr_ratio=s.muon_lr / s.max_lr,
            momentum=s.muon_momentum, muon_weight_decay=s.muon_weight_decay, betas=(s.beta1, s.beta2),
            ns_dtype=choose_newton_schulz_dtype(s.ns_dtype, device).dtype,
        )  # fmt: skip
    fused = device.type == "cuda"  # one kernel for all parameters on GPUs; foreach on the CPU
    return torch.optim.AdamW(groups, lr=s.max_lr, betas=(s.beta1, s.beta2), fused=fused, foreach=not fused)


# ---------------------------------------------------------------------------------------------
# Runtime: device, precision, distributed
# ---------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    """Where and how this process trains."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None = fp32 (no autocast)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    precision_reason: str = ""  # why this precision (printed in the run header)
    newton_schulz: Choice | None = None  # Muon's Newton-Schulz dtype and why (None: not decided here)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def hardware(self) -> dict:
        """The machine's facts and this run's dtype decisions (run header, metrics.jsonl, benchmarks)."""
        choices = [Choice("precision", self.precision, self.precision_reason)]
        return hardware_report(self.device, *choices, *([self.newton_schulz] if self.newton_schulz else []))

    def autocast(self):
        return autocast_context(self.device.type, self.amp_dtype)


def setup_runtime(device_name: str, precision: str, ns_dtype: str = "auto") -> Runtime:
    """Pick the device (CUDA when present), the autocast dtype and Newton-Schulz's dtype (asked of the
    hardware: Phase 3's hardware.py), and join torchrun's process group.

    Under `torchrun --nproc_per_node N`, RANK/WORLD_SIZE/LOCAL_RANK are set: GPUs use NCCL (one GPU
    per process, cuda:LOCAL_RANK), CPUs use gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available: use --device cpu")
    if device_name not in ("cpu", "cuda") and not device_name.startswith("cuda:"):
        raise ValueError(f"unknown --device {device_name!r}: use auto, cpu, cuda or cuda:N")
    device = torch.device(device_name)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not torch_dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch_dist.init_process_group(backend=backend, timeout=process_group_timeout())
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    choice = choose_precision(precision, device)
    if device.type == "cpu":
        keep_freed_memory()  # reuse big per-step buffers instead of page-faulting them in (cpu_memory.py)
    if device.type == "cuda":  # fp32 means IEEE fp32: TF32 would round matmul inputs to 10 mantissa bits
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    ns = choose_newton_schulz_dtype(ns_dtype, device)
    return Runtime(device, choice.autocast_dtype, rank, world_size, local_rank, choice.reason, ns)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def unwrap(model: nn.Module) -> SparseMoETransformer:
    """The plain SparseMoETransformer inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


# ---------------------------------------------------------------------------------------------
# One optimizer step, evaluation, a sample
# ---------------------------------------------------------------------------------------------


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or infinite."""


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def train_step(model, optimizer, scaler, batches, s: TrainSettings, rt: Runtime) -> dict:
    """One optimizer step over `batches` (grad_accum_steps micro-batches of (x, y) [B, T]).

    The loss of each micro-batch is divided by the number of micro-batches, so the summed
    gradients are those of the mean loss over the whole step. Under DDP the balance loss uses the
    expert counts of the global batch (summed over ranks), and gradients are all-reduced only on
    the last micro-batch (no_sync on the others). A non-finite loss or gradient norm raises
    TrainingDiverged before the weights change (fp16: the GradScaler skips such steps itself).
    Returns the mean losses of the global batch [lm, aux, z, total], this rank's expert counts
    [L, E], and the gradient norm before clipping.
    """
    config = unwrap(model).config
    reduce_counts = sum_over_ranks if rt.distributed else None
    stats = torch.zeros(4, device=rt.device)  # lm, aux, z, total (sums over micro-batches)
    expert_counts = torch.zeros(config.n_layer, config.n_expert, device=rt.device)
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        with nullcontext() if (last or not rt.distributed) else model.no_sync():
            with rt.autocast():
                out = model(x, y, return_logits=False)  # the chunked head + loss: no [B, T, V] logits
                losses = moe_losses(out, config, reduce_counts)
            scaler.scale(losses.total / len(batches)).backward()
        stats += torch.stack([losses.lm, losses.aux, losses.z, losses.total]).detach().float()
        expert_counts += torch.stack([r.routed_counts for r in out.routing]).float()
    stats /= len(batches)
    sync_gradients = getattr(model, "sync_gradients", None)
    if sync_gradients is not None:  # expert parallel: each gradient averaged over the ranks holding it
        sync_gradients()
    if rt.distributed:  # the global batch's mean losses, the same on every rank
        stats = sum_over_ranks(stats) / rt.world_size
    if not torch.isfinite(stats).all():  # checked before the update: the weights stay good
        lm, aux, z, total = stats.tolist()
        raise TrainingDiverged(f"the loss is not finite (lm {lm}, aux {aux}, z {z})")
    scaler.unscale_(optimizer)  # fp16: the true gradients again before clipping
    max_norm = s.grad_clip if s.grad_clip > 0 else float("inf")
    if hasattr(model, "clip_grad_norm_"):  # expert parallel: the norm counts every rank's experts
        grad_norm = model.clip_grad_norm_(max_norm)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), max_norm)
    if not scaler.is_enabled() and not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"the gradient norm is {float(grad_norm)}")
    scaler.step(optimizer)  # fp16: skipped when a gradient overflowed (the scaler then lowers its scale)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return {"losses": stats, "grad_norm": grad_norm, "expert_counts": expert_counts}


@torch.no_grad()
def evaluate(
    model, tokens: np.ndarray, s: TrainSettings, rt: Runtime, max_batches: int | None = None
) -> dict:
    """Validation loss over real tokens: the token-weighted mean of the LM loss over the first
    `max_batches` global batches of the validation stream (all of it when None), and exp(loss).

    Every position of a packed window is a real token (no padding), so the loss counts real tokens
    only. Runs in eval mode (no dropout) and does not touch the global random generators.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=rt.device)  # [sum of loss * tokens, tokens]
    batches = iter_eval_batches(
        tokens,
        s.seq_len,
        s.batch_size,
        max_batches=max_batches,
        rank=rt.rank,
        world_size=rt.world_size,
        device=rt.device,
    )
    if s.expert_parallel > 1:  # every forward is collective: a rank out of batches still serves its experts
        batches = every_rank_batches(batches, rt.device)
    for x, y in batches:
        with rt.autocast():
            if y is None:
                unwrap(model)(x)
                continue
            out = unwrap(model)(x, y, return_logits=False)
        sums += torch.stack([out.loss.double() * y.numel(), torch.tensor(y.numel(), device=rt.device)])
    if rt.distributed:
        torch_dist.all_reduce(sums)
    model.train(was_training)
    loss = (sums[0] / sums[1]).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": int(sums[1].item())}


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids of a prompt; the empty prompt starts from the end-of-text token."""
    return tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, device, seed: int = 0) -> str:
    """A short sample for the progress log (temperature 0.8, top-50). Uses its own seeded generator,
    so the training run's random streams (dropout, data) are untouched and resume stays exact."""
    raw = unwrap(model)
    ids = torch.tensor([prompt_ids(tokenizer, prompt)], dtype=torch.long, device=device)
    max_new_tokens = min(max_new_tokens, raw.config.block_size - ids.shape[1])
    stream = raw.stream_generate(
        ids, max_new_tokens, temperature=0.8, top_k=50, eos_token_id=tokenizer.eot_id, seed=seed
    )
    new = [int(t[0]) for t in stream]
    return prompt + tokenizer.decode([t for t in new if t != tokenizer.eot_id])


# =============================================================================================
# --mode train: resolve the run, build the state, save, and the loop
# =============================================================================================


@dataclass
class Run:
    """Everything decided before the first step: a run that would fail later fails here instead."""

    out_dir: Path
    preset: str
    config: Config
    settings: TrainSettings
    runtime: Runtime
    data: object  # data_pipeline.PreparedData
    tokenizer: object  # text_tokenizers.TextTokenizer
    sample_prompt: str
    stop_at: int
    resume_checkpoint: dict | None
    changed_on_resume: list[str]


RESUME_KEYS = ("model", "optimizer", "sampler", "rng", "train_args", "tokenizer", "config", "step", "tokens")


def resolve_run(args) -> Run:
    """Settings (flags > checkpoint on resume > preset defaults), model config, device, data, checks."""
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file: pass a folder for the run's checkpoints")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out-dir and --overwrite deletes it: choose one")
    if not args.resume and (out_dir / LATEST_NAME).exists() and not args.overwrite:
        raise ValueError(
            f"{out_dir / LATEST_NAME} exists: continue it with --resume, choose another --out-dir, "
            "or pass --overwrite to start again from scratch (its checkpoints are then deleted)"
        )
    ckpt = read_checkpoint(out_dir / LATEST_NAME) if args.resume else None
    if ckpt is not None:
        missing = [key for key in RESUME_KEYS if key not in ckpt]
        if missing:
            raise ValueError(
                f"{ckpt['path']} cannot be resumed: it has no {', '.join(missing)} entr"
                f"{'y' if len(missing) == 1 else 'ies'} (it is damaged or was not written by --mode train); "
                "train into a new --out-dir"
            )

    # -- settings: explicit flags > the checkpoint's (on resume) > the preset's defaults ----------
    preset = args.preset or (ckpt.get("preset") if ckpt else None) or "cpu-demo"
    values = dict(TRAINING_PRESETS.get(preset, TRAINING_PRESETS["cpu-demo"]))
    saved = TrainSettings.from_saved(ckpt["train_args"]) if ckpt else {}
    values.update(saved)
    changed = []
    for f in fields(TrainSettings):
        flag = getattr(args, f.name, None)
        if flag is not None:
            if f.name == "optimizer" and saved.get("optimizer", "adamw") != flag and ckpt is not None:
                raise ValueError(
                    f"--optimizer {flag} differs from the checkpoint's ({saved.get('optimizer', 'adamw')}): "
                    "its optimizer state cannot carry over; drop --optimizer or train into a new --out-dir"
                )
            if f.name in saved and saved[f.name] != flag and f.name != "world_size":
                changed.append(f"{f.name} {saved[f.name]!r} -> {flag!r}")
            values[f.name] = flag
    values["seed"] = args.seed = values.get("seed", 0)  # also the synthetic-story and hold-out seed
    if getattr(args, "dist_timeout", None) is not None:
        os.environ[TIMEOUT_ENV] = str(args.dist_timeout)  # read by process_group_timeout()
    rt = setup_runtime(args.device, values.get("precision", "auto"), values.get("ns_dtype", "auto"))
    values["world_size"] = rt.world_size
    values["expert_parallel"] = getattr(args, "expert_parallel", None) or 1  # the layout: never the saved one

    # -- model config, checked before any data work -------------------------------------------
    overrides = args.overrides  # --set FIELD=VALUE, parsed by cli.py
    saved_config = asdict(Config.from_saved(ckpt["config"])) if ckpt else None
    vocab_guess = saved_config["vocab_size"] if saved_config else Config.from_preset(preset).vocab_size
    config = resolve_model_config(args.preset, overrides, saved_config, vocab_guess)  # validates the fields
    values.setdefault("seq_len", config.block_size)
    if values["seq_len"] > config.block_size:
        raise ValueError(f"--seq-len {values['seq_len']} exceeds the model's block_size {config.block_size}")
    s = TrainSettings(**{k: v for k, v in values.items() if k in {f.name for f in fields(TrainSettings)}})
    stop_at = min(s.max_steps, args.stop_at_step if args.stop_at_step is not None else s.max_steps)
    if s.expert_parallel > 1:
        check_layout(s.expert_parallel, rt.world_size, config.n_expert, rt.precision, s.compile)

    # -- data: rank 0 tokenizes (and trains the bpe tokenizer) once; the others read the cache ----
    if ckpt is not None:
        saved_tokenizer = ckpt["tokenizer"].get("name")
        if args.tokenizer is not None and args.tokenizer != saved_tokenizer:
            raise ValueError(
                f"--tokenizer {args.tokenizer} differs from the checkpoint's tokenizer ({saved_tokenizer}): "
                "a resumed run keeps its tokenizer; drop --tokenizer or train into a new --out-dir"
            )
        if args.vocab_size is not None and args.vocab_size != saved_config["vocab_size"]:
            raise ValueError(
                f"--vocab-size {args.vocab_size} differs from the checkpoint's "
                f"({saved_config['vocab_size']}): "
                "a resumed run keeps its tokenizer; drop --vocab-size or train into a new --out-dir"
            )
    tokenizer = tokenizer_from_state(ckpt["tokenizer"]) if ckpt else (args.tokenizer or "bpe")
    if rt.distributed and not rt.is_main:
        torch_dist.barrier()
    data = prepare_data(
        data_source_from_namespace(args),
        tokenizer,
        vocab_size=args.vocab_size or 4096,
        cache_dir=args.cache_dir,
        progress=rt.is_main,
    )
    if rt.distributed and rt.is_main:
        torch_dist.barrier()
    if rt.distributed:  # before the first step: ranks that averaged gradients of different data
        check_same_inputs(rt, data.tokenizer, data)
    config = resolve_model_config(args.preset, overrides, saved_config, data.tokenizer.vocab_size)
    if ckpt is not None:
        check_same_config(saved_config, asdict(config), ckpt["path"])
        base = {**TRAINING_PRESETS.get(preset, TRAINING_PRESETS["cpu-demo"]), **saved}
        check_schedule_on_resume(base, s, int(ckpt["step"]), args.stop_at_step)
        changed = [replan_note(c, s, int(ckpt["step"])) for c in changed]

    # -- what would otherwise fail after the last step ---------------------------------------------
    if len(data.valid_tokens) < s.seq_len + 1:
        raise ValueError(
            f"the validation split has {len(data.valid_tokens)} tokens, fewer than one sequence of "
            f"--seq-len {s.seq_len} + 1: give more validation text or a smaller --seq-len"
        )
    n_prompt = len(prompt_ids(data.tokenizer, args.sample_prompt))
    if s.sample_tokens and n_prompt >= config.block_size:
        raise ValueError(
            f"--sample-prompt is {n_prompt} tokens, the model's context is {config.block_size}: "
            "shorten it or pass --sample-tokens 0"
        )
    return Run(
        out_dir, preset, config, s, rt, data, data.tokenizer, args.sample_prompt, stop_at, ckpt, changed
    )


# The flags that shape the schedule over the steps (not its height: a new --max-lr is the user's own
# choice and is applied as asked). Changing them on resume re-plans the remaining steps.
SCHEDULE_SHAPE = ("max_steps", "warmup_steps", "lr_schedule", "cooldown_frac")


def check_schedule_on_resume(base: dict, s: TrainSettings, step: int, stop_at_step: int | None) -> None:
    """Refuse a resume whose new schedule shape moves the learning rate of the next step.

    Refusing rather than re-planning from the current lr: a cool-down that restarted at the peak would
    undo the decay the run has already done, and bending the new schedule to start from today's lr is a
    schedule no flag describes. Where the next lr is unchanged (a wsd run extended before its cool-down,
    a cosine run still in its warmup) the new plan applies as it stands, and replan_note announces it."""
    if s.max_steps < step:
        raise ValueError(
            f"--max-steps {s.max_steps} is below the step this run has reached ({step}): the run is past "
            f"that schedule's end; pass --max-steps {step} or more, or evaluate its checkpoint as it is"
        )
    if stop_at_step is not None and stop_at_step <= step:
        raise ValueError(
            f"--stop-at-step {stop_at_step} is not after the step this run has reached ({step}): "
            f"pass a later step, or drop --stop-at-step"
        )
    old = replace(s, **{k: base[k] for k in SCHEDULE_SHAPE if k in base})
    new_lr, old_lr = lr_at(step, s), lr_at(step, old)
    if math.isclose(new_lr, old_lr, rel_tol=1e-9, abs_tol=0.0):
        return
    moved = [k for k in SCHEDULE_SHAPE if getattr(old, k) != getattr(s, k)]
    asked = ", ".join(f"--{k.replace('_', '-')} {getattr(s, k)}" for k in moved)
    keep = ", ".join(f"--{k.replace('_', '-')} {getattr(old, k)}" for k in moved)
    extend = ""
    if old.lr_schedule == "wsd":
        start = wsd_cooldown_start(old) + 1
        extend = f"; a wsd run can be extended before its cool-down starts at step {start}"
    raise ValueError(
        f"{asked} on resume would move the learning rate of step {step + 1} from {old_lr:.3g} to "
        f"{new_lr:.3g} (the schedule is planned over the whole run): keep {keep}, or train into a new "
        f"--out-dir{extend}"
    )


def wsd_cooldown_start(s: TrainSettings) -> int:
    """The 0-based index of the first wsd cool-down step (as lr_at computes it); the log numbers steps
    from 1, so the log calls it step index + 1."""
    return s.max_steps - round(s.cooldown_frac * s.max_steps)


def replan_note(change: str, s: TrainSettings, step: int) -> str:
    """A changed max_steps, announced with the re-planned schedule the remaining steps will follow."""
    if not change.startswith("max_steps "):
        return change
    if s.lr_schedule == "wsd":
        plan = (
            f"lr {lr_at(step, s):.3g}, then a linear cool-down towards {s.min_lr:.3g} over steps "
            f"{wsd_cooldown_start(s) + 1}-{s.max_steps}"
        )
    else:
        plan = f"cosine from lr {lr_at(step, s):.3g} towards {s.min_lr:.3g} by step {s.max_steps}"
    return f"{change} (schedule re-planned: {plan})"


@dataclass
class TrainState:
    model: SparseMoETransformer  # the plain model (what is saved)
    train_model: nn.Module  # the same, wrapped by torch.compile / DDP when asked
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: BlockBatchSampler
    step: int = 0
    tokens: int = 0
    best_val: float | None = None
    train_time: float = 0.0  # seconds spent in optimizer steps (evaluation, sampling, saving excluded)


def build_state(run: Run) -> TrainState:
    """Model, optimizer, scaler and sampler: fresh, or exactly as the resumed checkpoint left them."""
    s, rt, ckpt = run.settings, run.runtime, run.resume_checkpoint
    seed_everything(s.seed)  # the same initial weights on every rank
    model = SparseMoETransformer(run.config).to(rt.device)
    model.set_activation_checkpointing(s.activation_checkpointing)
    if s.expert_parallel > 1:  # keep this rank's experts only (loading a checkpoint keeps its slice)
        shard_experts(model, init_expert_parallel(s.expert_parallel, run.config.n_expert))
    optimizer = make_optimizer(model, s, rt.device)
    if s.expert_parallel > 1:  # it loads one process's optimizer state and keeps this rank's slices
        keep_local_optimizer_state(optimizer, model)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    sampler = BlockBatchSampler(
        len(run.data.train_tokens), s.seq_len, s.batch_size, s.seed, rt.rank, rt.world_size
    )
    seed_everything(s.seed + rt.rank)  # dropout streams differ between ranks
    state = TrainState(model, model, optimizer, scaler, sampler)
    if ckpt is not None:
        load_model_state(model, ckpt)
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        sampler.load_state_dict(ckpt["sampler"])
        restore_rng_state(ckpt["rng"][rt.rank % len(ckpt["rng"])])
        state.step, state.tokens = int(ckpt["step"]), int(ckpt["tokens"])
        state.best_val = ckpt.get("best_val_loss")
        state.train_time = float(ckpt.get("train_time_s", 0.0))
    if s.compile:
        state.train_model = torch.compile(model)
    if s.expert_parallel > 1:  # in place of DDP: gradients synced per parameter's holders
        state.train_model = ExpertParallelModel(model)
    elif rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        devices = [rt.local_rank] if rt.device.type == "cuda" else None
        state.train_model = DDP(state.train_model, device_ids=devices)
    model.train()
    return state


def save(run: Run, state: TrainState, is_best: bool) -> None:
    """latest.pt (and best.pt when is_best), atomically, on rank 0; every rank's RNG state goes in.

    Weights that are not finite are never saved: the previous checkpoint stays the good one."""
    rt = run.runtime
    rng = [capture_rng_state()]
    if rt.distributed:
        rng = [None] * rt.world_size
        torch_dist.all_gather_object(rng, capture_rng_state())
    model, optimizer = state.model, state.optimizer
    if isinstance(state.train_model, ExpertParallelModel):  # collective: every rank's experts, gathered
        model, optimizer = state.train_model.full_state(state.optimizer)
    if not rt.is_main:
        return
    if not all(torch.isfinite(p).all() for p in state.model.parameters()):
        raise TrainingDiverged("the weights are not finite; they were not saved")
    s = run.settings
    save_run_checkpoints(
        run.out_dir,
        model,
        optimizer,
        state.step,
        is_best=is_best,
        tokens=state.tokens,
        preset=run.preset,
        scaler=state.scaler.state_dict(),
        sampler=state.sampler.state_dict(),
        rng=rng,
        scheduler={
            "kind": "warmup_cosine" if s.lr_schedule == "cosine" else "warmup_stable_decay",
            "max_lr": s.max_lr,
            "min_lr": s.min_lr,
            "warmup_steps": s.warmup_steps,
            "total_steps": s.max_steps,
            "step": state.step,
        },
        config=asdict(run.config),
        train_args=asdict(s),
        tokenizer=run.tokenizer.to_state(),
        best_val_loss=state.best_val,
        train_time_s=state.train_time,
    )


def start_run_folder(run: Run, overwrite: bool) -> None:
    """Create the run folder; --overwrite deletes the previous run's checkpoints and metrics; write
    tokenizer.json and config.json; remove temp files that a killed save left behind."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temp_files(run.out_dir)
    if removed:
        print(f"cleanup   removed {len(removed)} temporary file(s) left by an interrupted save")
    if overwrite:
        old = [run.out_dir / n for n in (LATEST_NAME, BEST_NAME, METRICS_FILE)]
        old = [path for path in old if path.exists()]
        for path in old:
            path.unlink()
        if old:
            print(f"overwrite deleted the previous run's {', '.join(p.name for p in old)}")
    run.tokenizer.save(run.out_dir / "tokenizer.json")
    summary = {"preset": run.preset, "model": asdict(run.config), "training": asdict(run.settings)}
    (run.out_dir / "config.json").write_text(json.dumps(summary, indent=2))


def print_header(run: Run, state: TrainState) -> None:
    c, s, rt, data = run.config, run.settings, run.runtime, run.data
    print(
        f"data      {data.info['source']}: {len(data.train_tokens):,} train / {len(data.valid_tokens):,} "
        f"valid tokens ({'cache reused' if data.reused else 'tokenized'}: {data.cache_path})"
    )
    print(f"tokenizer {run.tokenizer.name}, {run.tokenizer.vocab_size} ids")
    print(
        f"model     {run.preset}: {c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads, "
        f"{c.n_expert} experts (top-{c.top_k}, hidden {c.d_ff}), block_size {c.block_size}, "
        f"dropout {c.dropout}"
        + ("" if c.attn_dropout is None else f" (attention {c.attn_dropout})")
        + f"\n          {parameter_summary(c)}"
    )
    print(f"hardware  {hardware_facts(rt.device).summary()}")
    print(
        f"device    {rt.device} x {rt.world_size} rank(s), precision {rt.precision} ({rt.precision_reason})"
        f"{', TF32 off' if rt.device.type == 'cuda' else ''}"
        f"{', activation checkpointing' if s.activation_checkpointing else ''}"
        f"{', torch.compile' if s.compile else ''}"
    )
    if s.optimizer == "muon":
        print(f"optimizer Muon (Newton-Schulz in {rt.newton_schulz.reason}) + AdamW")
    else:
        print("optimizer AdamW")
    print(
        f"batch     {s.batch_size} x {s.grad_accum_steps} accum x {rt.world_size} rank(s) x {s.seq_len} "
        f"tokens = {s.tokens_per_step:,} tokens/step, {s.max_steps} steps"
    )
    plan = plan_memory(
        c,
        s.batch_size,
        s.seq_len,
        n_params=count_parameters(c),
        n_muon_params=count_hidden_matrix_parameters(c) if s.optimizer == "muon" else 0,
        precision=rt.precision,
        activation_checkpointing=s.activation_checkpointing,
        on_gpu=rt.device.type == "cuda",
        expert_parallel=s.expert_parallel,
    )
    print(format_memory_plan(plan))
    if run.resume_checkpoint is not None:
        print(
            f"resumed   from {run.resume_checkpoint['path']} at step {state.step} ({state.tokens:,} tokens)"
        )
        if run.changed_on_resume:
            print(f"changed   on resume, from this step on: {', '.join(run.changed_on_resume)}")


class MetricsLog:
    """metrics.jsonl (rank 0 only), and the sums of losses, expert counts, time and tokens since its last
    train record."""

    def __init__(self, run: Run):
        c = run.config
        self.device, self.shape = run.runtime.device, (c.n_layer, c.n_expert)
        self.file = open(run.out_dir / METRICS_FILE, "a", encoding="utf-8") if run.runtime.is_main else None
        self.reset()

    def reset(self) -> None:
        self.losses = torch.zeros(4, device=self.device)
        self.counts = torch.zeros(self.shape, device=self.device)
        self.steps, self.time, self.tokens = 0, 0.0, 0

    def add(self, result: dict, seconds: float, tokens: int) -> None:
        self.losses += result["losses"]
        self.counts += result["expert_counts"]
        self.steps, self.time, self.tokens = self.steps + 1, self.time + seconds, self.tokens + tokens

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def write_train_record(self, state: TrainState, lr: float, grad_norm, rt: Runtime) -> dict:
        """The window's mean losses and every rank's expert load per layer; then start a new window."""
        lm, aux, z, total = (self.losses / self.steps).tolist()
        if rt.distributed:  # every rank's routing decisions, not only rank 0's
            torch_dist.all_reduce(self.counts)
        load = self.counts / self.counts.sum(dim=1, keepdim=True).clamp_min(1)  # [L, E]
        record = {
            "kind": "train", "step": state.step, "tokens": state.tokens, "lr": lr, "loss": lm,
            "aux_loss": aux, "z_loss": z, "total_loss": total, "grad_norm": float(grad_norm),
            "tokens_per_s": self.tokens / max(self.time, 1e-9), "train_time_s": state.train_time,
            "expert_load": load.tolist(),
        }  # fmt: skip
        self.write(record)
        self.reset()
        return record

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def evaluate_and_log(run: Run, state: TrainState, metrics: MetricsLog, bar) -> dict:
    """Validation loss (the best so far is remembered) and, on rank 0, a short sample; logged."""
    s, rt = run.settings, run.runtime
    result = evaluate(state.model, run.data.valid_tokens, s, rt, max_batches=s.eval_batches or None)
    is_best = state.best_val is None or result["val_loss"] < state.best_val
    if is_best:
        state.best_val = result["val_loss"]
    sample, sample_model = "", state.model
    if isinstance(state.train_model, ExpertParallelModel) and s.sample_tokens:
        sample_model = state.train_model.full_model()  # rank 0 samples alone: it needs every expert
    if rt.is_main and s.sample_tokens:
        sample = sample_text(
            sample_model, run.tokenizer, run.sample_prompt, s.sample_tokens, rt.device, s.seed
        )
    record = {"kind": "eval", "step": state.step, "tokens": state.tokens, "train_time_s": state.train_time}
    metrics.write({**record, **result, "sample": sample})
    if rt.is_main:  # tqdm.write prints even where the bar is disabled: every rank has the same result
        bar.write(
            f"step {state.step:>6} | val loss {result['val_loss']:.4f} | ppl {result['val_ppl']:.2f}"
            + (" | best" if is_best else "")
            + (f"\n    {sample!r}" if sample else "")
        )
    return {**result, "is_best": is_best}


def train_main(args) -> dict:
    """Train (or resume) a model; returns a summary dict (also printed)."""
    from tqdm.auto import tqdm

    run = resolve_run(args)
    s, rt = run.settings, run.runtime
    log = print if rt.is_main else (lambda *a, **k: None)
    with RunFolderLock(run.out_dir, enabled=rt.is_main), RankHeartbeat(rt.rank, rt.world_size) as heartbeat:
        state = build_state(run)
        if rt.is_main:
            start_run_folder(run, overwrite=args.overwrite)
            print_header(run, state)
        bar = tqdm(
            total=s.max_steps,
            initial=state.step,
            desc="training",
            unit="step",
            disable=not rt.is_main,
            dynamic_ncols=True,
        )
        metrics, last_eval, status = MetricsLog(run), None, "finished"
        metrics.write({"kind": "hardware", "step": state.step, **rt.hardware()})  # what the figures ran on
        try:
            with StopRequest() as stop:
                # evaluate the untrained model once, so the validation curve starts at step 0
                if state.step == 0 and run.resume_checkpoint is None and s.eval_interval:
                    last_eval = evaluate_and_log(run, state, metrics, bar)
                while state.step < run.stop_at:
                    # forward, backward and update over grad_accum_steps micro-batches at this step's lr
                    t0 = time.perf_counter()
                    lr = lr_at(state.step, s)
                    set_learning_rate(state.optimizer, lr)
                    batches = [
                        blocks_to_batch(run.data.train_tokens, next(state.sampler), s.seq_len, rt.device)
                        for _ in range(s.grad_accum_steps)
                    ]
                    result = train_step(state.train_model, state.optimizer, state.scaler, batches, s, rt)
                    dt = time.perf_counter() - t0
                    state.step, state.tokens = state.step + 1, state.tokens + s.tokens_per_step
                    state.train_time += dt
                    bar.update(1)
                    # log the window's mean losses, expert load and throughput every log_interval steps
                    metrics.add(result, dt, s.tokens_per_step)
                    if state.step % s.log_interval == 0 or state.step == s.max_steps:
                        record = metrics.write_train_record(state, lr, result["grad_norm"], rt)
                        bar.set_postfix(
                            loss=f"{record['loss']:.3f}",
                            lr=f"{lr:.2e}",
                            tok_s=f"{record['tokens_per_s']:,.0f}",
                            aux=f"{record['aux_loss']:.3f}",
                        )
                    # evaluate (and save) every eval_interval steps; save every save_interval steps
                    if state.step < s.max_steps and s.eval_interval and state.step % s.eval_interval == 0:
                        last_eval = evaluate_and_log(run, state, metrics, bar)
                        save(run, state, is_best=last_eval["is_best"])
                    elif s.save_interval and state.step % s.save_interval == 0:
                        save(run, state, is_best=False)
                    # Ctrl-C / SIGTERM on any rank: save after this step and stop
                    if stop_requested(stop.requested, rt):
                        save(run, state, is_best=False)
                        status = "interrupted"
                        break
                if status == "finished" and state.step >= s.max_steps:
                    # the end: save first, so a failing evaluation or sample loses nothing, then evaluate
                    save(run, state, is_best=False)
                    last_eval = evaluate_and_log(run, state, metrics, bar)
                    if last_eval["is_best"]:
                        save(run, state, is_best=True)
                elif status == "finished":
                    status = "stopped"  # --stop-at-step
                    save(run, state, is_best=False)
        except TrainingDiverged as err:
            latest = run.out_dir / LATEST_NAME
            where = (
                f"the last good checkpoint is {latest} (resume from it with --resume)"
                if latest.exists()
                else "no checkpoint was saved before it"
            )
            raise TrainingDiverged(
                f"step {state.step + 1}: {err}: stopped without saving the damaged weights; {where}. "
                "Lower --max-lr, keep --grad-clip on, or use --precision fp32/bf16 instead of fp16"
            ) from None
        except RuntimeError as err:
            if rt.distributed and is_collective_failure(err):
                raise heartbeat.explain(err, state.step) from None
            raise
        finally:
            bar.close()
            metrics.close()
    summary = {
        "status": status,
        "step": state.step,
        "tokens": state.tokens,
        "best_val_loss": state.best_val,
        "val_loss": last_eval["val_loss"] if last_eval else None,
        "out_dir": str(run.out_dir),
    }
    if status == "interrupted":
        log(
            f"interrupted at step {state.step}: checkpoint saved to {run.out_dir / LATEST_NAME}; "
            "continue with the same command plus --resume"
        )
    elif status == "stopped":
        log(f"stopped at step {state.step} (--stop-at-step): continue with --resume")
    if rt.is_main and (s.eval_interval or status == "finished"):
        try:
            make_plots(run.out_dir)
        except ValueError as err:
            log(f"no plots: {err}")
    best = f", best val loss {state.best_val:.4f}" if state.best_val is not None else ""
    log(f"done: step {state.step}{best}, checkpoints in {run.out_dir}")
    if rt.distributed:
        # Leave together: a rank that tears down its gloo connections while another is still
        # working (rank 0 drawing plots) can make the other abort with "connection closed".
        torch_dist.barrier()
    return summary


def resolve_model_config(preset: str | None, overrides: dict, saved: dict | None, vocab_size: int) -> Config:
    """The model config: the checkpoint's when resuming (a different --preset/--set is an error,
    raised by check_same_config), else the preset with the overrides; vocab_size comes from the tokenizer."""
    if "vocab_size" in overrides and overrides["vocab_size"] != vocab_size:
        raise ValueError(
            f"--set vocab_size={overrides['vocab_size']} disagrees with the tokenizer ({vocab_size} ids): "
            "the vocabulary size is taken from the tokenizer; drop it or change --vocab-size"
        )
    overrides = {**overrides, "vocab_size": vocab_size}
    if saved is not None and preset is None:
        return Config(**{**saved, **overrides})
    return Config.from_preset(preset or "cpu-demo", **overrides)


class StopRequest:
    """SIGINT (Ctrl-C) / SIGTERM handler: the first signal asks the loop to save and stop after the
    current optimizer step; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
            "(press Ctrl-C again to quit at once)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def stop_requested(local: bool, rt: Runtime) -> bool:
    """True on every rank when any rank received Ctrl-C (so they all stop at the same step)."""
    if not rt.distributed:
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=rt.device)
    torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
    return bool(flag.item())


if __name__ == "__main__":
    # The command line (every --mode) is in cli.py. Run it through the package modules, so that cli.py
    # and this file share one set of classes instead of this script's __main__ copies.
    from sparse_moe_transformer.src.cli import main

    main()
