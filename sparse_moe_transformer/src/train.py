"""Sparse Mixture-of-Experts transformer: the model, its training loop and its CLI in one readable file.

Model

    Config                      presets `t1000` (the reference model, ~158.8M params, ~19M active
                                per token outside the embeddings), `cpu-demo` (the offline demo),
                                `cpu-small` (nanoGPT's CPU model as 8 experts), plus `tiny` for tests;
                                analytic parameter / active-parameter / FLOP counts
    SparseMoEFFN                gate -> top-k -> softmax over the selected logits -> experts, with the
                                fast sorted dispatch of moe_dispatch.py; Switch aux loss, router z-loss
                                and routing statistics
    CausalSelfAttention         F.scaled_dot_product_attention, causal, with an optional KV cache
    SparseMoETransformerLayer   pre-norm: x + attn(ln1(x)); x + moe(ln2(x))
    SparseMoETransformer        embeddings, layers, final norm, untied head; forward / generate /
                                stream_generate (sampling from phase5_production.src.sampling)

Training (the second half of the file)
    TrainSettings, TRAINING_PRESETS  batch, accumulation, schedule, intervals (per preset, overridable)
    make_optimizer              AdamW without weight decay on norms, biases and embeddings
    train_step                  gradient accumulation, fp16 GradScaler / bf16 autocast, NaN guard,
                                clipping, AdamW; GlobalLoadBalance makes the aux loss global under DDP
    evaluate / sample_text      validation loss + perplexity over real tokens; a short sample
    train_main                  data (data_pipeline.py), checkpoints (checkpointing.py), memory plan
                                (memory_plan.py), tqdm + metrics.jsonl + plots (training_plots.py),
                                resume, Ctrl-C, DDP under torchrun
    eval_main, generate_main, benchmark_main, plan_main, plot_main, main: the other --mode's

Run `python sparse_moe_transformer/src/train.py --help` for every mode and flag; the offline demo is
    python sparse_moe_transformer/src/train.py --mode train --preset cpu-demo --dataset synthetic \
        --tokenizer bpe
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F

from phase3_components.src.lr_schedules import set_learning_rate, warmup_cosine_lr
from phase4_training.src.training_loop import (
    autocast_context,
    capture_rng_state,
    resolve_precision,
    restore_rng_state,
)
from phase5_production.src.sampling import sample_next_token
from sparse_moe_transformer.src.checkpointing import (
    LATEST_NAME,
    check_same_config,
    load_model_state,
    read_checkpoint,
    save_run_checkpoints,
)
from sparse_moe_transformer.src.cpu_memory import keep_freed_memory
from sparse_moe_transformer.src.data_pipeline import (
    BlockBatchSampler,
    add_data_arguments,
    blocks_to_batch,
    data_source_from_namespace,
    iter_eval_batches,
    prepare_data,
)
from sparse_moe_transformer.src.memory_plan import format_memory_plan, plan_memory
from sparse_moe_transformer.src.moe_dispatch import expert_capacity, expert_ffn, route_tokens
from sparse_moe_transformer.src.text_tokenizers import tokenizer_from_state
from sparse_moe_transformer.src.training_plots import METRICS_FILE, make_plots

# ----------------------------------------------------------------------------- Config


@dataclass(frozen=True)
class Config:
    """Model hyper-parameters. Build one with `Config.from_preset(name, **overrides)` or directly."""

    vocab_size: int = 4096
    d_model: int = 192
    n_heads: int = 6
    n_layers: int = 4
    n_experts: int = 8
    top_k: int = 2
    d_ff: int = 384  # hidden size of each expert
    max_len: int = 128
    dropout: float = 0.0  # on embeddings, attention output and expert output (the residual branches)
    attn_dropout: float | None = None  # on the attention probabilities; None = the same as dropout
    # None = dropless (default). Else each expert takes ceil(cf*N*k/E) pairs and drops the rest;
    # the limit is shared by the whole batch, so it is not strictly causal (see moe_dispatch.py).
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.01  # Switch load-balancing loss coefficient
    z_loss_coef: float = 1e-3  # router z-loss coefficient
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "n_experts", "top_k", "d_ff", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Config.{name} must be a positive integer, got {value!r}.")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"Config.n_heads must divide d_model: d_model={self.d_model} is not a multiple of "
                f"n_heads={self.n_heads}."
            )
        if self.top_k > self.n_experts:
            raise ValueError(
                f"Config.top_k must be <= n_experts, got top_k={self.top_k} > n_experts={self.n_experts}."
            )
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"Config.dropout must be in [0, 1), got {self.dropout!r}.")
        ad = self.attn_dropout
        if ad is not None and (not isinstance(ad, (int, float)) or isinstance(ad, bool) or not 0 <= ad < 1):
            raise ValueError(f"Config.attn_dropout must be None (= dropout) or in [0, 1), got {ad!r}.")
        cf = self.capacity_factor
        if cf is not None and (not isinstance(cf, (int, float)) or isinstance(cf, bool) or not cf > 0):
            raise ValueError(f"Config.capacity_factor must be None (dropless) or a number > 0, got {cf!r}.")
        for name in ("aux_loss_coef", "z_loss_coef", "init_std"):
            value = getattr(self, name)
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"Config.{name} must be a finite number >= 0, got {value!r}.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

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
    def saved_fields(cls, saved: dict) -> dict:
        """A checkpoint's config dict, completed with the defaults of fields added after it was written.

        A new field must default to the behaviour from before it existed (attn_dropout=None means
        "the same as dropout", as before the split), so an older checkpoint resumes unchanged.
        """
        defaults = {f.name: f.default for f in fields(cls)}
        return {**defaults, **saved}


PRESETS: dict[str, Config] = {
    # The reference model: GPT-2 vocabulary, 6 layers of 16 experts (top-2), learned positions.
    "t1000": Config(
        vocab_size=50257, d_model=512, n_heads=8, n_layers=6, n_experts=16, top_k=2, d_ff=1024,
        max_len=256, dropout=0.1,
    ),
    # Trains on a 2-core CPU: small BPE vocabulary, 4 layers of 8 experts.
    "cpu-demo": Config(
        vocab_size=4096, d_model=192, n_heads=6, n_layers=4, n_experts=8, top_k=2, d_ff=384,
        max_len=128, dropout=0.0,
    ),
    # nanoGPT's small CPU model (4 layers, 4 heads, d 128, block 256: 0.8M active parameters per
    # token outside the embeddings) with its FFN split into 8 experts of 256, top-2. Dropout on
    # the residual branches only (attention dropout would leave SDPA's fused CPU kernel).
    "cpu-small": Config(
        vocab_size=4096, d_model=128, n_heads=4, n_layers=4, n_experts=8, top_k=2, d_ff=256,
        max_len=256, dropout=0.1, attn_dropout=0.0,
    ),
    # For unit tests: a few milliseconds per forward.
    "tiny": Config(
        vocab_size=97, d_model=32, n_heads=4, n_layers=2, n_experts=4, top_k=2, d_ff=48, max_len=32,
        dropout=0.0,
    ),
}  # fmt: skip


def _layer_param_counts(c: Config) -> dict[str, int]:
    C, E, Fh = c.d_model, c.n_experts, c.d_ff
    return {
        "attention": 4 * (C * C + C),  # q, k, v, out projections with biases
        "norms": 2 * 2 * C,  # ln1, ln2 (weight + bias)
        "gate": C * E + E,
        "one_expert": C * Fh + Fh + Fh * C + C,  # w1, b1, w2, b2 of one expert
    }


def count_parameters(c: Config) -> int:
    """Total parameters: embeddings + layers (all experts) + final norm + untied head."""
    p = _layer_param_counts(c)
    layer = p["attention"] + p["norms"] + p["gate"] + c.n_experts * p["one_expert"]
    embeddings = c.vocab_size * c.d_model + c.max_len * c.d_model
    return embeddings + c.n_layers * layer + 2 * c.d_model + c.d_model * c.vocab_size


def count_active_parameters(c: Config, include_embeddings: bool = False) -> int:
    """Parameters used by one token: only top_k of the n_experts run.

    By default the embedding tables and the output head are left out (the usual "active
    parameters" figure); include_embeddings=True counts the token's embedding row, its position
    row and the whole head (every logit is computed).
    """
    p = _layer_param_counts(c)
    layer = p["attention"] + p["norms"] + p["gate"] + c.top_k * p["one_expert"]
    active = c.n_layers * layer + 2 * c.d_model
    if include_embeddings:
        active += 2 * c.d_model + c.d_model * c.vocab_size
    return active


def forward_flops_per_token(c: Config, seq_len: int | None = None, include_attention: bool = True) -> int:
    """Forward FLOPs per token (2 per multiply-add of every matmul) for sequences of seq_len.

    Per layer: q,k,v,out projections 8*C^2, router 2*C*E, top_k experts top_k * 4*C*F, and the
    attention scores and weighted values 4*T*C (counted for the full T x T matrix, as
    torch.utils.flop_counter does, not halved for causality). Plus the head 2*C*V.
    Element-wise work (norms, GELU, softmax) is not counted.
    """
    T = c.max_len if seq_len is None else seq_len
    C = c.d_model
    layer = 8 * C * C + 2 * C * c.n_experts + c.top_k * 4 * C * c.d_ff
    if include_attention:
        layer += 4 * T * C
    return c.n_layers * layer + 2 * C * c.vocab_size


def parameter_summary(c: Config) -> str:
    total, active = count_parameters(c), count_active_parameters(c)
    return (
        f"{total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token outside embeddings/head "
        f"({c.top_k}/{c.n_experts} experts, {100 * (1 - c.top_k / c.n_experts):.1f}% of expert weights "
        "idle), "
        f"{forward_flops_per_token(c) / 1e6:.1f} MFLOP/token forward at T={c.max_len}"
    )


# ----------------------------------------------------------------------------- SparseMoEFFN


@dataclass
class RoutingStats:
    """What one MoE layer's router did on the last forward (detached tensors, no host sync)."""

    tokens_per_expert: torch.Tensor  # [E] (token, slot) pairs routed to each expert, before drops
    load_cv: torch.Tensor  # coefficient of variation std/mean of tokens_per_expert (0 = perfect balance)
    router_entropy: torch.Tensor  # mean over tokens of the entropy of the full router softmax (nats)
    dropped: int  # pairs dropped by the capacity limit


def load_balancing_loss(router_probs: torch.Tensor, topk_index: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss  E * sum_i f_i * P_i.

    f_i = fraction of the N*top_k (token, slot) assignments that chose expert i (not differentiable),
    P_i = mean over tokens of the router probability softmax(gate_logits)[:, i].
    sum_i f_i = sum_i P_i = 1, so at perfect balance (f_i = P_i = 1/E) the loss equals 1.
    """
    counts = torch.bincount(topk_index.reshape(-1), minlength=n_experts)  # [E]
    f = counts.to(router_probs.dtype) / topk_index.numel()  # [E]
    P = router_probs.mean(0)  # [E]
    return n_experts * torch.sum(f * P)


def router_z_loss(gate_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(gate_logits)^2 (keeps logits small)."""
    return torch.logsumexp(gate_logits, dim=-1).square().mean()


class SparseMoEFFN(nn.Module):
    """y = sum over the top_k experts e chosen for x of  g_e(x) * (GELU(x W1_e + b1_e) W2_e + b2_e).

    Gate logits z = x W_g + b_g [N, E]; the top_k logits are softmaxed among themselves into the
    routing weights g. Only top_k of n_experts expert FFNs run per token. After each forward,
    `aux_loss`, `z_loss` and `stats` hold this layer's losses and routing statistics.
    """

    def __init__(self, config: Config):
        super().__init__()
        C, E, Fh = config.d_model, config.n_experts, config.d_ff
        self.n_experts, self.top_k, self.capacity_factor = E, config.top_k, config.capacity_factor
        self.gate = nn.Linear(C, E)
        self.w1 = nn.Parameter(torch.empty(E, C, Fh))  # [E, C, F]
        self.b1 = nn.Parameter(torch.zeros(E, Fh))  # [E, F]
        self.w2 = nn.Parameter(torch.empty(E, Fh, C))  # [E, F, C]
        self.b2 = nn.Parameter(torch.zeros(E, C))  # [E, C]
        nn.init.normal_(self.w1, std=config.init_std)
        nn.init.normal_(self.w2, std=config.init_std)
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.stats: RoutingStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, C]
        gate_logits = self.gate(x)  # [N, E]
        capacity = expert_capacity(x.shape[0], self.top_k, self.n_experts, self.capacity_factor)
        routing = route_tokens(gate_logits, self.top_k, capacity)
        out = expert_ffn(x, self.w1, self.b1, self.w2, self.b2, routing)  # [N, C]

        log_probs = torch.log_softmax(gate_logits, dim=-1)  # [N, E]
        probs = log_probs.exp()
        self.aux_loss = load_balancing_loss(probs, routing.topk_index, self.n_experts)
        self.z_loss = router_z_loss(gate_logits)
        with torch.no_grad():
            load = routing.routed_counts.float()  # [E]
            self.stats = RoutingStats(
                tokens_per_expert=routing.routed_counts,
                load_cv=load.std(correction=0) / load.mean().clamp_min(1e-9),
                router_entropy=-(probs * log_probs).sum(-1).mean(),
                dropped=routing.dropped,
            )
        self.last_routing = routing
        return out.reshape(shape)


# ----------------------------------------------------------------------------- attention and layer


class KVCache:
    """Preallocated keys and values of every layer: [B, H, max_len, Dh] each, filled up to `length`."""

    def __init__(self, config: Config, batch_size: int, device=None, dtype=torch.float32):
        shape = (config.n_layers, batch_size, config.n_heads, config.max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = config.max_len


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.n_heads = config.n_heads
        # Dropout on the attention probabilities. On the CPU, SDPA has no fused kernel with dropout
        # and falls back to the unfused math path (about 30% slower training at d_model 128).
        self.dropout = config.dropout if config.attn_dropout is None else config.attn_dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)  # q, k, v projections fused
        self.out_proj = nn.Linear(config.d_model, config.d_model)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)  # 3 x [B, T, C]
        q, k, v = (
            t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v)
        )  # [B,H,T,Dh]
        mask, is_causal = None, T > 1
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start : start + T] = k
            cache.v[layer, :, :, start : start + T] = v
            k, v = cache.k[layer, :, :, : start + T], cache.v[layer, :, :, : start + T]  # [B, H, start+T, Dh]
            if start > 0:  # new queries attend to all cached keys and causally among themselves
                is_causal = False
                if T > 1:  # query i (absolute start+i) may see keys j <= start+i
                    mask = (
                        torch.arange(start + T, device=x.device)
                        <= start + torch.arange(T, device=x.device)[:, None]
                    )
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # [B, T, C]
        return self.resid_drop(self.out_proj(y))


class SparseMoETransformerLayer(nn.Module):
    """Pre-norm block: x = x + attn(ln1(x)); x = x + dropout(moe(ln2(x)))."""

    def __init__(self, config: Config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.moe = SparseMoEFFN(config)
        self.ffn_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer)  # [B, T, C]
        return x + self.ffn_drop(self.moe(self.ln2(x)))


# ----------------------------------------------------------------------------- model


@dataclass
class MoEOutput:
    logits: torch.Tensor  # [B, T, V]
    loss: torch.Tensor | None  # LM cross-entropy (labels -100 ignored), None without labels
    aux_loss: torch.Tensor  # load-balancing loss, averaged over layers (unscaled)
    z_loss: torch.Tensor  # router z-loss, averaged over layers (unscaled)
    routing_stats: list[RoutingStats] = field(default_factory=list)  # one per layer

    def total_loss(self, config: Config) -> torch.Tensor:
        """loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss (what training minimises)."""
        if self.loss is None:
            raise ValueError("total_loss needs labels: call the model with labels=...")
        return self.loss + config.aux_loss_coef * self.aux_loss + config.z_loss_coef * self.z_loss


class SparseMoETransformer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        if not isinstance(config, Config):
            raise TypeError(f"SparseMoETransformer needs a Config, got {type(config).__name__}.")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model)  # learned positions
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(SparseMoETransformerLayer(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)  # untied
        self.apply(self._init_weights)
        # GPT-2's scaled init: the two projections that write into the residual stream in each of
        # the L layers (attention output, expert output) start at std / sqrt(2L), so the residual
        # stream's variance at init does not grow with depth.
        residual_std = config.init_std / math.sqrt(2 * config.n_layers)
        for layer in self.layers:
            nn.init.normal_(layer.attn.out_proj.weight, std=residual_std)
            nn.init.normal_(layer.moe.w2, std=residual_std)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)

    def _check_input_ids(self, input_ids: torch.Tensor, start: int = 0) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long or input_ids.dim() != 2:
            raise TypeError("input_ids must be a LongTensor of shape [batch, seq_len].")
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids is empty: give at least one token per sequence.")
        if start + T > self.config.max_len:
            raise ValueError(
                f"sequence length {start + T} exceeds max_len={self.config.max_len}; "
                f"crop the input to the last {self.config.max_len} tokens or use a larger Config.max_len."
            )
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(
                f"token ids must be in [0, {self.config.vocab_size}), got values in [{lo}, {hi}]; "
                "check that the tokenizer matches Config.vocab_size."
            )

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> MoEOutput:
        """input_ids [B, T] -> MoEOutput. labels [B, T] (already shifted: labels[t] is the target
        of position t, -100 = ignore). With a cache, positions continue from cache.length."""
        start = 0 if cache is None else cache.length
        self._check_input_ids(input_ids, start)
        T = input_ids.shape[1]
        pos = torch.arange(start, start + T, device=input_ids.device)  # [T]
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))  # [B, T, C]
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.ln_f(x))  # [B, T, V]
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {tuple(labels.shape)}."
                )
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        moes = [layer.moe for layer in self.layers]
        return MoEOutput(
            logits=logits,
            loss=loss,
            aux_loss=torch.stack([m.aux_loss for m in moes]).mean(),
            z_loss=torch.stack([m.z_loss for m in moes]).mean(),
            routing_stats=[m.stats for m in moes],
        )

    # ------------------------------------------------------------------------- generation

    @torch.no_grad()
    def stream_generate(
        self,
        input_ids: torch.Tensor,
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

        Sampling is phase5_production's sample_next_token (temperature 0 = greedy); the repetition
        penalty sees the prompt and the tokens generated so far. Rows that produced eos_token_id
        keep producing it; generation stops once every row has. With use_cache the prompt is
        prefilled once and each step feeds one token; without it every step recomputes the whole
        prefix (same tokens, slower). prompt + max_new_tokens must fit in max_len.
        """
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}.")
        self._check_input_ids(input_ids)
        B, T0 = input_ids.shape
        if T0 + max_new_tokens > self.config.max_len:
            raise ValueError(
                f"prompt length {T0} + max_new_tokens {max_new_tokens} exceeds "
                f"max_len={self.config.max_len}; "
                "shorten the prompt or ask for fewer tokens."
            )
        if eos_token_id is not None and not 0 <= eos_token_id < self.config.vocab_size:
            raise ValueError(f"eos_token_id must be in [0, {self.config.vocab_size}), got {eos_token_id!r}.")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        try:
            ids = input_ids
            cache = None
            if use_cache:
                dtype = self.tok_emb.weight.dtype
                cache = KVCache(self.config, B, device=input_ids.device, dtype=dtype)
            logits = self(ids, cache=cache).logits[:, -1]  # prefill -> [B, V]
            finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
            for step in range(max_new_tokens):
                next_token = sample_next_token(
                    logits,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    repetition_penalty=repetition_penalty,
                    previous_ids=ids,
                    generator=generator,
                )  # [B]
                if eos_token_id is not None:
                    next_token = next_token.masked_fill(finished, eos_token_id)
                    finished |= next_token == eos_token_id
                yield next_token
                ids = torch.cat([ids, next_token[:, None]], dim=1)  # [B, T + 1]
                if step == max_new_tokens - 1 or bool(finished.all()):
                    break
                if cache is not None:
                    logits = self(next_token[:, None], cache=cache).logits[:, -1]
                else:
                    logits = self(ids).logits[:, -1]
        finally:
            self.train(was_training)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """input_ids [B, T] -> [B, T + n] with n <= max_new_tokens new tokens (fewer if every row hit EOS).

        Keyword arguments as in stream_generate: temperature, top_k, top_p, repetition_penalty,
        eos_token_id, seed, use_cache.
        """
        new = list(self.stream_generate(input_ids, max_new_tokens, **kwargs))
        if not new:
            return input_ids.clone()
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)


# =============================================================================================
# Training: settings, optimizer, one optimizer step, evaluation
# =============================================================================================
#
# `python sparse_moe_transformer/src/train.py --mode train ...` runs `train_main` below:
#
#   data        tokenize once into a memory-mapped cache (data_pipeline.prepare_data), packed with EOT
#   model       Config (preset + --set overrides, vocab_size from the tokenizer) -> SparseMoETransformer
#   optimizer   AdamW; weight decay on matrices only (not on norms, biases, embeddings)
#   schedule    linear warmup + cosine decay (phase 3's warmup_cosine_lr), a pure function of the step
#   one step    grad_accum micro-batches: loss = lm + aux_coef * aux + z_coef * z, / grad_accum,
#               backward (through the fp16 GradScaler on GPUs without bf16), clip, AdamW step
#   every N     log (tqdm bar + metrics.jsonl), evaluate (val loss, perplexity, a short sample),
#               checkpoint (latest.pt, best.pt), plots at the end
#   resume      latest.pt holds model, optimizer, schedule, scaler, step, sampler position, RNGs,
#               config and tokenizer: the resumed run repeats the uninterrupted one exactly
#   DDP         under torchrun each rank trains on its slice of every global batch; gradients are
#               averaged by DistributedDataParallel; only rank 0 logs and saves.

# Training defaults per preset (model presets live in Config). Every value can be overridden by its
# flag (--batch-size, --lr, ...). t1000: 5,000 steps x 4 x 8 x 256 = 41M tokens on a 4 GB GPU.
TRAINING_PRESETS = {
    "t1000": dict(
        batch_size=4,
        grad_accum=8,
        max_steps=5000,
        lr=6e-4,
        min_lr=6e-5,
        warmup_steps=200,
        eval_interval=250,
        eval_batches=50,
        log_interval=10,
        save_interval=250,
    ),
    "cpu-demo": dict(
        batch_size=16,
        grad_accum=1,
        max_steps=250,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=20,
        eval_interval=50,
        eval_batches=10,
        log_interval=10,
        save_interval=50,
    ),
    "cpu-small": dict(  # nanoGPT's CPU recipe: batch 16 x 256, lr 1e-3 -> 1e-4
        batch_size=16,
        grad_accum=1,
        max_steps=1400,
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=100,
        eval_interval=250,
        eval_batches=50,
        log_interval=10,
        save_interval=250,
    ),
}
TRAINING_FALLBACK = TRAINING_PRESETS["cpu-demo"]


@dataclass
class TrainSettings:
    """Everything about a training run that is not the model (stored in every checkpoint)."""

    batch_size: int  # sequences per micro-batch per rank
    grad_accum: int  # micro-batches per optimizer step
    block_size: int  # tokens per sequence (<= config.max_len)
    max_steps: int  # optimizer steps; the cosine schedule ends here
    lr: float  # peak learning rate
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

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "block_size", "max_steps"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in (
            "warmup_steps",
            "eval_interval",
            "eval_batches",
            "log_interval",
            "save_interval",
            "sample_tokens",
        ):
            _check_int(name, getattr(self, name), minimum=0)
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"--warmup-steps ({self.warmup_steps}) exceeds --max-steps ({self.max_steps})")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(
                f"need --lr > 0 and 0 <= --min-lr <= --lr, got lr={self.lr}, min_lr={self.min_lr}"
            )
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("--weight-decay and --grad-clip must be >= 0")
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(
                f"unknown --precision {self.precision!r}: choose one of {', '.join(PRECISION_CHOICES)}"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.block_size * self.world_size


PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"--{name.replace('_', '-')} must be an int >= {minimum}, got {value!r}")


def lr_at(step: int, s: TrainSettings) -> float:
    """The learning rate of optimizer step `step` (0-based): warmup, then cosine to min_lr."""
    return warmup_cosine_lr(
        step, max_lr=s.lr, min_lr=s.min_lr, warmup_steps=s.warmup_steps, total_steps=s.max_steps
    )


def make_optimizer(model: nn.Module, s: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW with two groups: decay for weight matrices (attention, gate, experts, head),
    none for norms, biases and embeddings (decaying them pulls gains/offsets/token vectors to 0)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()
            is_bias = name.startswith("b") and (name == "bias" or name[1:].isdigit())  # bias, b1, b2
            if is_norm or is_bias or isinstance(module, nn.Embedding):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [
        {"params": decay, "weight_decay": s.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"  # one kernel for all parameters on GPUs; foreach on the CPU
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), fused=fused, foreach=not fused)


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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        return autocast_context(self.device.type, self.amp_dtype)


def setup_runtime(device_name: str, precision: str) -> Runtime:
    """Pick the device (CUDA when present), the autocast dtype, and join torchrun's process group.

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
            torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    amp_dtype = resolve_precision(precision, device.type)
    if device.type == "cpu":
        keep_freed_memory()  # reuse big per-step buffers instead of page-faulting them in (cpu_memory.py)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores where present
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, amp_dtype, rank, world_size, local_rank)


def all_reduce_mean(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.distributed:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
        t = t / rt.world_size
    return t


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ---------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def model_losses(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, balance: GlobalLoadBalance | None = None
):
    """Forward pass -> (lm_loss, aux_loss, z_loss, total_loss, output).

    total = lm + aux_loss_coef * aux + z_loss_coef * z (the coefficients of the Config). Under DDP
    the aux loss is computed with the expert fractions of the whole global batch (`balance`)."""
    out = model(x, labels=y)
    cfg = unwrap(model).config
    aux = out.aux_loss if balance is None else balance.aux_loss()
    total = out.loss + cfg.aux_loss_coef * aux + cfg.z_loss_coef * out.z_loss
    return out.loss, aux, out.z_loss, total, out


class GlobalLoadBalance:
    """The Switch load-balancing loss over the global batch of a DDP step.

    Each layer's loss is E * sum_i f_i * P_i with f_i the fraction of (token, slot) pairs routed to
    expert i and P_i the mean router probability. f is a count (no gradient), so summing the counts
    over ranks (all_reduce) gives the global f exactly; P is a mean over equally many tokens per rank,
    so DDP's gradient averaging of E * sum_i f_i * P_i(rank) yields the gradient of the global loss.
    Computed per rank on its own tokens alone, the loss would be a different (noisier) objective
    than one process with the whole batch. The gate outputs are captured with forward hooks.
    """

    def __init__(self, model: nn.Module):
        self.moes = [layer.moe for layer in unwrap(model).layers]
        self.gate_logits: dict[int, torch.Tensor] = {}
        self.handles = [moe.gate.register_forward_hook(self._capture(i)) for i, moe in enumerate(self.moes)]

    def _capture(self, i: int):
        def hook(module, inputs, output):
            self.gate_logits[i] = output  # [N, E]

        return hook

    def aux_loss(self) -> torch.Tensor:
        losses = []
        for i, moe in enumerate(self.moes):
            counts = moe.last_routing.routed_counts.float()  # [E] pairs this rank routed to each expert
            torch_dist.all_reduce(counts)  # [E] the whole global batch's
            f = counts / counts.sum()  # [E]
            P = torch.softmax(self.gate_logits[i].float(), dim=-1).mean(0)  # [E], differentiable
            losses.append(moe.n_experts * torch.sum(f * P))
        return torch.stack(losses).mean()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain SparseMoETransformer inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute each layer's activations during the backward pass instead of keeping them.

    Only every layer's input stays in memory; torch.utils.checkpoint (non-reentrant) reruns the
    layer in the backward pass with the same dropout masks (it restores the RNG state)."""
    for layer in unwrap(model).layers:
        if enabled and "_plain_forward" not in layer.__dict__:
            plain = layer.forward
            layer._plain_forward = plain

            def checkpointed(*args, _plain=plain, **kwargs):
                if torch.is_grad_enabled():
                    return torch.utils.checkpoint.checkpoint(_plain, *args, use_reentrant=False, **kwargs)
                return _plain(*args, **kwargs)

            layer.forward = checkpointed
        elif not enabled and "_plain_forward" in layer.__dict__:
            del layer.__dict__["_plain_forward"]
            del layer.__dict__["forward"]  # the class's forward again


def train_step(model, optimizer, scaler, batches, s: TrainSettings, rt: Runtime, balance=None) -> dict:
    """One optimizer step over `batches` (grad_accum micro-batches of (x, y) [B, T]).

    The loss of each micro-batch is divided by grad_accum, so the summed gradients are those of
    the mean loss over the whole step. Returns the mean losses of the global batch [lm, aux, z,
    total] (averaged over ranks), this rank's expert token counts [L, E], and the gradient norm
    before clipping. A non-finite loss raises TrainingDiverged before the weights change. Under
    DDP, gradients are all-reduced only on the last micro-batch (no_sync on the others).
    """
    stats = torch.zeros(4, device=rt.device)  # lm, aux, z, total (sums over micro-batches)
    expert_counts = None
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        sync = nullcontext() if (last or not rt.distributed) else model.no_sync()
        with sync:
            with rt.autocast():
                lm, aux, z, total, out = model_losses(model, x, y, balance)
            scaler.scale(total / len(batches)).backward()
        stats += torch.stack([lm.detach(), aux.detach(), z.detach(), total.detach()]).float()
        counts = routing_counts(out)
        expert_counts = counts if expert_counts is None else expert_counts + counts
    stats /= len(batches)
    stats = all_reduce_mean(stats, rt)  # the global batch's mean losses, the same on every rank
    if not torch.isfinite(stats).all():  # checked before the update: the weights stay good
        lm, aux, z, total = stats.tolist()
        raise TrainingDiverged(
            f"the loss is not finite (lm {lm}, aux {aux}, z {z}): stopping without updating the weights. "
            "Lower --lr, keep --grad-clip on, or use --precision fp32/bf16 instead of fp16"
        )
    scaler.unscale_(optimizer)  # fp16: the true gradients again before clipping
    max_norm = s.grad_clip if s.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), max_norm)
    scaler.step(optimizer)  # skipped when an fp16 gradient overflowed (the scaler then lowers its scale)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return {"losses": stats, "grad_norm": grad_norm, "expert_counts": expert_counts}


def routing_counts(out) -> torch.Tensor:
    """Tokens routed to each expert in this forward pass: [n_layers, n_experts] (float)."""
    return torch.stack([stats.tokens_per_expert.float() for stats in out.routing_stats])


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
    for x, y in iter_eval_batches(
        tokens,
        s.block_size,
        s.batch_size,
        max_batches=max_batches,
        rank=rt.rank,
        world_size=rt.world_size,
        device=rt.device,
    ):
        with rt.autocast():
            out = unwrap(model)(x, labels=y)
        sums += torch.stack([out.loss.double() * y.numel(), torch.tensor(y.numel(), device=rt.device)])
    if rt.distributed:
        torch_dist.all_reduce(sums)
    model.train(was_training)
    loss = (sums[0] / sums[1]).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": int(sums[1].item())}


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, device, seed: int = 0, **sampling) -> str:
    """A short sample for the progress log. Uses its own seeded generator, so the training run's
    random streams (dropout, data) are untouched and resume stays exact."""
    raw = unwrap(model)
    was_training = raw.training
    ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    new = [
        int(t[0])
        for t in raw.stream_generate(
            ids,
            max_new_tokens=min(max_new_tokens, raw.config.max_len - ids.shape[1]),
            temperature=sampling.get("temperature", 0.8),
            top_k=sampling.get("top_k", 50),
            eos_token_id=tokenizer.eot_id,
            seed=seed,
        )
    ]
    raw.train(was_training)
    return prompt + tokenizer.decode([t for t in new if t != tokenizer.eot_id])


# =============================================================================================
# Configs from the command line
# =============================================================================================


def parse_overrides(items: list[str] | None) -> dict:
    """['n_layers=4', 'dropout=0.0'] -> {'n_layers': 4, 'dropout': 0.0}, typed by the Config fields."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ValueError(f"--set expects FIELD=VALUE (e.g. --set n_layers=4), got {item!r}")
        if key not in fields:
            raise ValueError(
                f"unknown config field {key!r} in --set {item}: the fields are {', '.join(sorted(fields))}"
            )
        out[key] = _parse_value(key, text, fields[key])
    return out


def _parse_value(key: str, text: str, field):
    """Convert the text of one --set value to the type of its Config field."""
    default = field.default if field.default is not dataclasses.MISSING else None
    type_name = (
        field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    )
    if text.lower() in ("none", "null") and ("None" in type_name or default is None):
        return None
    try:
        if isinstance(default, bool) or type_name.startswith("bool"):
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(default, int) or type_name.startswith("int"):
            return int(text)
        if isinstance(default, float) or type_name.startswith("float"):
            return float(text)
    except ValueError:
        kind = {"bool": "true or false", "int": "an int", "float": "a float"}.get(
            type_name.split(" ")[0], type_name
        )
        raise ValueError(f"--set {key}={text}: {key} must be {kind}") from None
    return text


def resolve_model_config(preset: str | None, overrides: dict, saved: dict | None, vocab_size: int) -> Config:
    """The model config: the checkpoint's when resuming (a different --preset/--set is an error),
    else the preset with the overrides; vocab_size always comes from the tokenizer."""
    if "vocab_size" in overrides and overrides["vocab_size"] != vocab_size:
        raise ValueError(
            f"--set vocab_size={overrides['vocab_size']} disagrees with the tokenizer ({vocab_size} ids): "
            "the vocabulary size is taken from the tokenizer; drop it or change --vocab-size"
        )
    overrides = {**overrides, "vocab_size": vocab_size}
    if saved is not None and preset is None:
        return Config(**{**saved, **overrides})
    config = Config.from_preset(preset or "cpu-demo", **overrides)
    return config


def training_setting_defaults(preset: str | None) -> dict:
    return dict(TRAINING_PRESETS.get(preset or "cpu-demo", TRAINING_FALLBACK))


# =============================================================================================
# --mode train
# =============================================================================================


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


def train_main(args) -> dict:
    """Train (or resume) a model; returns a summary dict (also printed)."""
    out_dir = Path(args.out_dir)
    resume_ckpt = read_checkpoint(out_dir / LATEST_NAME) if args.resume else None
    if args.resume is False and (out_dir / LATEST_NAME).exists() and not args.overwrite:
        raise ValueError(
            f"{out_dir / LATEST_NAME} exists: continue it with --resume, choose another --out-dir, "
            "or pass --overwrite to start again from scratch"
        )

    # -- settings: explicit flags > the checkpoint's (on resume) > the preset's defaults --------
    preset = args.preset or (resume_ckpt.get("preset") if resume_ckpt else None) or "cpu-demo"
    values = training_setting_defaults(preset)
    if resume_ckpt is not None:
        values.update(resume_ckpt["train_args"])
    for f in dataclasses.fields(TrainSettings):
        if getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    values.setdefault("block_size", None)
    args.seed = values.setdefault("seed", 0)  # also the synthetic-story and hold-out seed
    precision = values.get("precision", "auto")
    rt = setup_runtime(args.device, precision)
    values["world_size"] = rt.world_size

    # -- model config and settings, checked before any data work -----------------------------------
    overrides = parse_overrides(args.set)
    saved_config = Config.saved_fields(resume_ckpt["config"]) if resume_ckpt else None
    vocab_guess = saved_config["vocab_size"] if saved_config else Config.from_preset(preset).vocab_size
    config = resolve_model_config(args.preset, overrides, saved_config, vocab_guess)  # validates the fields
    if values["block_size"] is None:
        values["block_size"] = config.max_len
    if values["block_size"] > config.max_len:
        raise ValueError(f"--block-size {values['block_size']} exceeds the model's max_len {config.max_len}")
    s = TrainSettings(
        **{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(TrainSettings)}}
    )

    # -- data: rank 0 tokenizes (and trains the bpe tokenizer) once; the others read the cache -----
    source = data_source_from_namespace(args)
    tokenizer = tokenizer_from_state(resume_ckpt["tokenizer"]) if resume_ckpt else args.tokenizer
    if rt.distributed and not rt.is_main:
        torch_dist.barrier()
    data = prepare_data(
        source, tokenizer, vocab_size=args.vocab_size, cache_dir=args.cache_dir, progress=rt.is_main
    )
    if rt.distributed and rt.is_main:
        torch_dist.barrier()
    tokenizer = data.tokenizer
    config = resolve_model_config(args.preset, overrides, saved_config, tokenizer.vocab_size)
    if resume_ckpt is not None:
        check_same_config(saved_config, asdict(config), resume_ckpt["path"])

    # -- model, optimizer, scaler, sampler -------------------------------------------------------
    seed_everything(s.seed)  # the same initial weights on every rank
    model = SparseMoETransformer(config).to(rt.device)
    optimizer = make_optimizer(model, s, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    sampler = BlockBatchSampler(
        len(data.train_tokens), s.block_size, s.batch_size, s.seed, rt.rank, rt.world_size
    )
    seed_everything(s.seed + rt.rank)  # dropout streams differ between ranks
    step, tokens_seen, best_val = 0, 0, None
    train_time = 0.0  # seconds spent in optimizer steps (evaluation, sampling and saving excluded)
    if resume_ckpt is not None:
        load_model_state(model, resume_ckpt)
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        if resume_ckpt.get("scaler"):
            scaler.load_state_dict(resume_ckpt["scaler"])
        sampler.load_state_dict(resume_ckpt["sampler"])
        rng_states = resume_ckpt["rng"]
        restore_rng_state(rng_states[rt.rank % len(rng_states)])
        step, tokens_seen = int(resume_ckpt["step"]), int(resume_ckpt["tokens"])
        best_val = resume_ckpt.get("best_val_loss")
        train_time = float(resume_ckpt.get("train_time_s", 0.0))

    log = print if rt.is_main else (lambda *a, **k: None)
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out_dir / "tokenizer.json")
        (out_dir / "config.json").write_text(
            json.dumps({"preset": preset, "model": asdict(config), "training": asdict(s)}, indent=2)
        )
        if args.overwrite and not args.resume and (out_dir / METRICS_FILE).exists():
            (out_dir / METRICS_FILE).unlink()
    log(
        f"data      {data.info['source']}: {len(data.train_tokens):,} train / {len(data.valid_tokens):,} "
        f"valid tokens ({'cache reused' if data.reused else 'tokenized'}: {data.cache_path})"
    )
    log(f"tokenizer {tokenizer.name}, {tokenizer.vocab_size} ids")
    log(
        f"model     {preset}: {config.n_layers} layers, d_model {config.d_model}, {config.n_heads} heads, "
        f"{config.n_experts} experts (top-{config.top_k}, hidden {config.d_ff}), max_len {config.max_len}, "
        f"dropout {config.dropout}"
        + ("" if config.attn_dropout is None else f" (attention {config.attn_dropout})")
        + f"\n          {parameter_summary(config)}"
    )
    log(
        f"device    {rt.device} x {rt.world_size} rank(s), precision "
        f"{'fp32' if rt.amp_dtype is None else str(rt.amp_dtype).replace('torch.', '')}"
        f"{', activation checkpointing' if s.activation_checkpointing else ''}"
        f"{', torch.compile' if s.compile else ''}"
    )
    log(
        f"batch     {s.batch_size} x {s.grad_accum} accum x {rt.world_size} rank(s) x {s.block_size} "
        f"tokens = {s.tokens_per_step:,} tokens/step, {s.max_steps} steps"
    )
    plan = plan_memory(
        config,
        s.batch_size,
        s.block_size,
        n_params=count_parameters(config),
        precision=_precision_name(rt),
        activation_checkpointing=s.activation_checkpointing,
    )
    log(format_memory_plan(plan))
    if resume_ckpt is not None:
        log(f"resumed   from {resume_ckpt['path']} at step {step} ({tokens_seen:,} tokens)")

    # -- wrappers: activation checkpointing, torch.compile, DDP ------------------------------------
    set_activation_checkpointing(model, s.activation_checkpointing)
    train_model = torch.compile(model) if s.compile else model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    balance = GlobalLoadBalance(model) if rt.distributed else None
    model.train()

    def save(is_best: bool) -> None:
        rng = capture_rng_state()
        rng_all = [None] * rt.world_size
        if rt.distributed:
            torch_dist.all_gather_object(rng_all, rng)
        else:
            rng_all = [rng]
        if not rt.is_main:
            return
        save_run_checkpoints(
            out_dir,
            model,
            optimizer,
            step,
            is_best=is_best,
            tokens=tokens_seen,
            preset=preset,
            scheduler={
                "kind": "warmup_cosine",
                "max_lr": s.lr,
                "min_lr": s.min_lr,
                "warmup_steps": s.warmup_steps,
                "total_steps": s.max_steps,
                "step": step,
            },
            scaler=scaler.state_dict(),
            sampler=sampler.state_dict(),
            rng=rng_all,
            config=asdict(config),
            train_args=asdict(s),
            tokenizer=tokenizer.to_state(),
            best_val_loss=best_val,
            train_time_s=train_time,
        )

    metrics_file = open(out_dir / METRICS_FILE, "a", encoding="utf-8") if rt.is_main else None

    def write_metrics(record: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def run_eval() -> dict:
        nonlocal best_val
        result = evaluate(model, data.valid_tokens, s, rt, max_batches=s.eval_batches or None)
        is_best = best_val is None or result["val_loss"] < best_val
        best_val = result["val_loss"] if is_best else best_val
        sample = ""
        if rt.is_main and s.sample_tokens:
            sample = sample_text(
                model, tokenizer, args.sample_prompt, s.sample_tokens, rt.device, seed=s.seed
            )
        record = {"kind": "eval", "step": step, "tokens": tokens_seen, "train_time_s": train_time}
        write_metrics({**record, **result, "sample": sample})
        if rt.is_main:
            bar.write(
                f"step {step:>6} | val loss {result['val_loss']:.4f} | ppl {result['val_ppl']:.2f}"
                + (" | best" if is_best else "")
                + (f"\n    {sample!r}" if sample else "")
            )
        return {"is_best": is_best, **result}

    from tqdm.auto import tqdm

    bar = tqdm(
        total=s.max_steps,
        initial=step,
        desc="training",
        unit="step",
        disable=not rt.is_main,
        dynamic_ncols=True,
    )
    window = {
        "losses": torch.zeros(4, device=rt.device),
        "counts": None,
        "steps": 0,
        "time": 0.0,
        "tokens": 0,
    }
    last_eval = None
    stop_at = args.stop_at_step if args.stop_at_step is not None else s.max_steps
    status = "finished"
    try:
        with StopRequest() as stop:
            if step == 0 and resume_ckpt is None and s.eval_interval:
                last_eval = run_eval()
            while step < min(stop_at, s.max_steps):
                t0 = time.perf_counter()
                lr = lr_at(step, s)
                set_learning_rate(optimizer, lr)
                batches = [
                    blocks_to_batch(data.train_tokens, next(sampler), s.block_size, rt.device)
                    for _ in range(s.grad_accum)
                ]
                result = train_step(train_model, optimizer, scaler, batches, s, rt, balance)
                step += 1
                tokens_seen += s.tokens_per_step
                dt = time.perf_counter() - t0
                window["losses"] += result["losses"]
                counts = result["expert_counts"]
                window["counts"] = counts if window["counts"] is None else window["counts"] + counts
                window["steps"] += 1
                window["time"] += dt
                window["tokens"] += s.tokens_per_step
                train_time += dt
                if step % s.log_interval == 0 or step == s.max_steps:
                    lm, aux, z, total = (window["losses"] / window["steps"]).tolist()
                    if rt.distributed:  # every rank's routing decisions, not only rank 0's
                        torch_dist.all_reduce(window["counts"])
                    load = window["counts"] / window["counts"].sum(dim=1, keepdim=True).clamp_min(1)  # [L, E]
                    tok_s = window["tokens"] / max(window["time"], 1e-9)
                    write_metrics(
                        {
                            "kind": "train",
                            "step": step,
                            "tokens": tokens_seen,
                            "lr": lr,
                            "loss": lm,
                            "aux_loss": aux,
                            "z_loss": z,
                            "total_loss": total,
                            "grad_norm": float(result["grad_norm"]),
                            "tokens_per_s": tok_s,
                            "train_time_s": train_time,
                            "expert_load": load.tolist(),
                        }
                    )
                    bar.set_postfix(loss=f"{lm:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", aux=f"{aux:.3f}")
                    window = {
                        "losses": torch.zeros(4, device=rt.device),
                        "counts": None,
                        "steps": 0,
                        "time": 0.0,
                        "tokens": 0,
                    }
                bar.update(1)
                evaluated = s.eval_interval and step % s.eval_interval == 0
                if evaluated:
                    last_eval = run_eval()
                stop_now = stop_requested(stop.requested, rt)
                if evaluated or stop_now or (s.save_interval and step % s.save_interval == 0):
                    save(is_best=bool(evaluated and last_eval["is_best"]))
                if stop_now:
                    status = "interrupted"
                    break
            if status == "finished" and step >= s.max_steps:
                if last_eval is None or not (s.eval_interval and step % s.eval_interval == 0):
                    last_eval = run_eval()
                    save(is_best=last_eval["is_best"])
            elif status == "finished":
                status = "stopped"
                save(is_best=False)
    except TrainingDiverged as err:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        raise TrainingDiverged(
            f"step {step + 1}: {err}. The last good checkpoint is "
            f"{out_dir / LATEST_NAME} (resume from it with --resume)"
        ) from None
    bar.close()
    if metrics_file is not None:
        metrics_file.close()
    summary = {
        "status": status,
        "step": step,
        "tokens": tokens_seen,
        "best_val_loss": best_val,
        "val_loss": last_eval["val_loss"] if last_eval else None,
        "out_dir": str(out_dir),
    }
    if rt.is_main:
        if status == "interrupted":
            log(
                f"interrupted at step {step}: checkpoint saved to {out_dir / LATEST_NAME}; "
                f"continue with the same command plus --resume"
            )
        elif status == "stopped":
            log(f"stopped at step {step} (--stop-at-step): continue with --resume")
        if s.eval_interval or status == "finished":
            try:
                make_plots(out_dir)
            except ValueError as err:
                log(f"no plots: {err}")
        log(
            f"done: step {step}, best val loss {best_val:.4f}, checkpoints in {out_dir}"
            if best_val is not None
            else f"done: step {step}, checkpoints in {out_dir}"
        )
    if rt.distributed:
        # Leave together: a rank that tears down its gloo connections while another is still
        # working (rank 0 drawing plots) can make the other abort with "connection closed".
        torch_dist.barrier()
    return summary


def stop_requested(local: bool, rt: Runtime) -> bool:
    """True on every rank when any rank received Ctrl-C (so they all stop at the same step)."""
    if not rt.distributed:
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=rt.device)
    torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
    return bool(flag.item())


def _precision_name(rt: Runtime) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[rt.amp_dtype]


# =============================================================================================
# --mode eval / generate / benchmark / plan / plot
# =============================================================================================


def load_trained_model(path: str, device: torch.device):
    """A checkpoint (file or run folder; best.pt preferred) -> (model in eval mode, tokenizer, checkpoint)."""
    checkpoint = read_checkpoint(path)
    config = Config(**checkpoint["config"])
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


def eval_main(args) -> dict:
    """Validation loss and perplexity of a checkpoint on a dataset's validation split."""
    rt = setup_runtime(args.device, args.precision or "auto")
    model, tokenizer, checkpoint = load_trained_model(_checkpoint_arg(args), rt.device)
    data = prepare_data(data_source_from_namespace(args), tokenizer, cache_dir=args.cache_dir)
    train_args = checkpoint.get("train_args", {})
    s = TrainSettings(
        **{
            **TRAINING_FALLBACK,
            **train_args,
            "world_size": 1,
            "batch_size": args.batch_size or train_args.get("batch_size", 8),
            "block_size": args.block_size or train_args.get("block_size", model.config.max_len),
        }
    )
    result = evaluate(model, data.valid_tokens, s, rt, max_batches=args.eval_batches or None)
    print(f"checkpoint {checkpoint['path']} (step {checkpoint['step']})")
    print(f"data       {data.info['source']}, validation split")
    print(f"val loss   {result['val_loss']:.4f} nats/token over {result['val_tokens']:,} real tokens")
    print(f"perplexity {result['val_ppl']:.3f}")
    return result


def generate_main(args) -> list[str]:
    """Stream samples from a checkpoint to the terminal."""
    rt = setup_runtime(args.device, "fp32")
    model, tokenizer, _ = load_trained_model(_checkpoint_arg(args), rt.device)
    prompt_ids = tokenizer.encode(args.prompt) if args.prompt else [tokenizer.eot_id]
    if len(prompt_ids) + args.max_new_tokens > model.config.max_len:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the model's "
            f"max_len {model.config.max_len}: shorten the prompt or lower --max-new-tokens"
        )
    texts = []
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}/{args.num_samples} ---", flush=True)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=rt.device)
        stream = model.stream_generate(
            ids,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            eos_token_id=tokenizer.eot_id,
            seed=args.seed + i,
        )
        text = print_stream(args.prompt or "", stream, tokenizer)
        texts.append(text)
    return texts


def print_stream(prompt: str, stream, tokenizer) -> str:
    """Print the prompt, then each new piece of text as its tokens arrive.

    Byte-level tokens can end inside a multi-byte character (decoded as U+FFFD); such a tail is held
    back until the next token completes it."""
    print(prompt, end="", flush=True)
    ids, shown = [], ""
    for token in stream:
        token = int(token[0])  # [B] -> this (single) row
        if token == tokenizer.eot_id:
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue
        print(text[len(shown) :], end="", flush=True)
        shown = text
    text = tokenizer.decode(ids)
    print(text[len(shown) :], flush=True)
    return prompt + text


def _checkpoint_arg(args) -> str:
    if args.checkpoint:
        return args.checkpoint
    return str(Path(args.out_dir))  # the run folder: best.pt, else latest.pt


def benchmark_main(args) -> dict:
    """Parameters, FLOPs/token, training tokens/s, generation latency per token (KV cache), peak memory."""
    import platform
    import resource

    rt = setup_runtime(args.device, args.precision or "auto")
    if args.checkpoint:
        model, _, checkpoint = load_trained_model(args.checkpoint, rt.device)
        config, preset = model.config, checkpoint.get("preset", "checkpoint")
        train_args = checkpoint.get("train_args", {})
    else:
        preset = args.preset or "cpu-demo"
        config = Config.from_preset(preset, **parse_overrides(args.set))
        seed_everything(args.seed)
        model = SparseMoETransformer(config).to(rt.device)
        train_args = training_setting_defaults(preset)
    batch = args.batch_size or train_args.get("batch_size", 8)
    block = args.block_size or train_args.get("block_size") or config.max_len
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)

    # -- training throughput: full optimizer steps (forward, backward, AdamW) on random token ids --
    s = TrainSettings(
        **{
            **TRAINING_FALLBACK,
            "batch_size": batch,
            "grad_accum": 1,
            "block_size": block,
            "max_steps": 10**9,
            "lr": 1e-4,
            "min_lr": 1e-4,
            "warmup_steps": 0,
        }
    )
    set_activation_checkpointing(model, args.activation_checkpointing)
    step_model = torch.compile(model) if args.compile else model
    optimizer = make_optimizer(model, s, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    step_times = []
    for i in range(args.bench_warmup + args.bench_steps):
        x = torch.randint(0, config.vocab_size, (batch, block + 1), generator=gen).to(rt.device)
        _sync(rt.device)
        t0 = time.perf_counter()
        train_step(step_model, optimizer, scaler, [(x[:, :-1], x[:, 1:])], s, rt)
        _sync(rt.device)
        if i >= args.bench_warmup:
            step_times.append(time.perf_counter() - t0)
    step_s = float(np.median(step_times))
    set_activation_checkpointing(model, False)

    # -- generation: per-token latency with the KV cache (greedy, batch 1) --------------------------
    model.eval()
    prompt_len = min(16, config.max_len // 4)
    new_tokens = min(args.max_new_tokens, config.max_len - prompt_len)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=gen).to(rt.device)
    stamps = []
    for _ in range(2):  # the first pass warms up; the second is measured
        stamps = [time.perf_counter()]
        for _tok in model.stream_generate(prompt, new_tokens, temperature=0.0):
            _sync(rt.device)
            stamps.append(time.perf_counter())
    gaps = np.diff(stamps)  # gaps[0] = prefill + first token; the rest = one cached decoding step each
    if rt.device.type == "cuda":
        peak_bytes, peak_kind = torch.cuda.max_memory_allocated(rt.device), "CUDA max_memory_allocated"
    else:
        peak_bytes, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"

    result = {
        "preset": preset,
        "device": str(rt.device) if rt.device.type == "cpu" else torch.cuda.get_device_name(rt.device),
        "cpu_threads": torch.get_num_threads(),
        "precision": _precision_name(rt),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "total_params": count_parameters(config),
        "active_params_per_token": count_active_parameters(config),
        "forward_flops_per_token": forward_flops_per_token(config, block),
        "train_batch": [batch, block],
        "train_step_s": step_s,
        "train_tokens_per_s": batch * block / step_s,
        "prefill_and_first_token_ms": 1e3 * float(gaps[0]),
        "decode_ms_per_token_median": 1e3 * float(np.median(gaps[1:])) if len(gaps) > 1 else None,
        "decode_tokens": int(len(gaps) - 1),
        "peak_memory_mb": peak_bytes / 2**20,
        "peak_memory_kind": peak_kind,
        "method": (
            f"training: median of {args.bench_steps} optimizer steps (forward + backward + clip + AdamW) "
            f"after {args.bench_warmup} warm-up steps, batch {batch} x {block} random token ids; "
            f"generation: greedy, batch 1, {prompt_len}-token prompt, {new_tokens} new tokens with the KV "
            "cache, median time between streamed tokens after a warm-up pass; FLOPs: analytic forward "
            f"FLOPs per token (2 per multiply-add, attention at context {block}); peak memory: "
            f"{peak_kind} of the whole run"
        ),
    }
    rows = [
        ("total parameters", f"{result['total_params'] / 1e6:,.2f} M"),
        ("active parameters / token", f"{result['active_params_per_token'] / 1e6:,.2f} M"),
        ("forward FLOPs / token", f"{result['forward_flops_per_token'] / 1e9:,.4f} GFLOPs"),
        ("training tokens / s", f"{result['train_tokens_per_s']:,.0f}  (batch {batch} x {block})"),
        ("prefill + first token", f"{result['prefill_and_first_token_ms']:.2f} ms"),
        (
            "decode latency / token",
            f"{result['decode_ms_per_token_median']:.2f} ms (KV cache, median)"
            if result["decode_ms_per_token_median"] is not None
            else "n/a",
        ),
        ("peak memory", f"{result['peak_memory_mb']:,.0f} MB ({peak_kind})"),
        ("device", f"{result['device']}, {result['precision']}, {result['cpu_threads']} CPU threads"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"Sparse MoE benchmark: {preset}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"  method: {result['method']}")
    out = Path(args.bench_json) if args.bench_json else Path(args.out_dir) / "benchmark.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"saved {out}")
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_main(args) -> dict:
    """Print the memory plan of a config, batch and precision (no model is built)."""
    preset = args.preset or "cpu-demo"
    overrides = parse_overrides(args.set)
    config = Config.from_preset(preset, **overrides)
    defaults = training_setting_defaults(preset)
    batch = args.batch_size or defaults["batch_size"]
    block = args.block_size or config.max_len
    precision = args.precision or "auto"
    if precision == "auto":
        precision = "fp16" if args.plan_device == "cuda" else "fp32"
    plan = plan_memory(
        config,
        batch,
        block,
        n_params=count_parameters(config),
        precision=precision,
        activation_checkpointing=bool(args.activation_checkpointing),
    )
    print(
        f"preset {preset}, batch {batch} x {block} tokens, {precision}"
        f"{', activation checkpointing' if args.activation_checkpointing else ''}"
    )
    print(format_memory_plan(plan, budget_gb=args.gpu_memory_gb))
    return plan.as_dict()


def plot_main(args) -> list[Path]:
    paths = make_plots(args.out_dir)
    for p in paths:
        print(f"wrote {p}")
    return paths


# =============================================================================================
# Command line
# =============================================================================================

MODES = ("train", "eval", "generate", "benchmark", "plan", "plot")

EXAMPLES = """\
examples:
  # offline demo on a fresh machine (synthetic stories, trained BPE, a few minutes on 2 CPU cores)
  python sparse_moe_transformer/src/train.py --mode train --preset cpu-demo --dataset synthetic \\
      --tokenizer bpe
  # TinyStories with the GPT-2 vocabulary on a 4 GB GPU
  python sparse_moe_transformer/src/train.py --mode train --preset t1000 --dataset tinystories \\
      --tokenizer gpt2
  python sparse_moe_transformer/src/train.py --mode train --out-dir runs/cpu-demo --resume   # continue
  python sparse_moe_transformer/src/train.py --mode generate --checkpoint runs/cpu-demo --prompt "Once upon"
  python sparse_moe_transformer/src/train.py --mode eval --checkpoint runs/cpu-demo --dataset synthetic
  python sparse_moe_transformer/src/train.py --mode benchmark --preset cpu-demo
  python sparse_moe_transformer/src/train.py --mode plan --preset t1000 --batch-size 4
  python sparse_moe_transformer/src/train.py --mode plot --out-dir runs/cpu-demo
  torchrun --nproc_per_node 2 sparse_moe_transformer/src/train.py --mode train --preset t1000 ...
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Sparse Mixture-of-Experts transformer: train, evaluate, sample, benchmark, plan memory.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mode", choices=MODES, default="train", help="what to do (default: train)")
    p.add_argument(
        "--out-dir", default=None, help="run folder: checkpoints, metrics.jsonl, plots (default: runs/PRESET)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=None, help="seed of weights, data and dropout (default 0)")

    g = p.add_argument_group("model")
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="model preset and its training defaults (default: cpu-demo, or the checkpoint's)",
    )
    g.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="override a Config field, e.g. --set n_layers=4 --set dropout=0 (repeatable)",
    )

    add_data_arguments(p)

    g = p.add_argument_group("training (defaults come from the preset)")
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch per process")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    g.add_argument("--block-size", type=int, help="tokens per sequence (default: the model's max_len)")
    g.add_argument("--max-steps", type=int, help="optimizer steps (the cosine schedule ends here)")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, help="AdamW decay of weight matrices (default 0.1)")
    g.add_argument("--grad-clip", type=float, help="max global gradient norm, 0 = off (default 1.0)")
    g.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        help="auto: bf16 on GPUs that have it, fp16 + GradScaler on older GPUs, fp32 on CPUs",
    )
    g.add_argument(
        "--activation-checkpointing",
        action="store_true",
        default=None,
        help="recompute each layer in the backward pass: less memory, ~30%% more compute",
    )
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--eval-interval", type=int, help="steps between evaluations (0 = only at the end)")
    g.add_argument("--eval-batches", type=int, help="validation batches per evaluation (0 = all)")
    g.add_argument("--log-interval", type=int, help="steps between metrics.jsonl records")
    g.add_argument("--save-interval", type=int, help="steps between latest.pt saves (also at each eval)")
    g.add_argument("--sample-tokens", type=int, help="tokens of the sample shown at each evaluation")
    g.add_argument("--sample-prompt", default="Once upon a time", help="prompt of those samples")
    g.add_argument("--resume", action="store_true", help="continue from OUT_DIR/latest.pt exactly")
    g.add_argument("--overwrite", action="store_true", help="start again even if OUT_DIR has a checkpoint")
    g.add_argument(
        "--stop-at-step",
        type=int,
        default=None,
        help="save and exit after this step, keeping the --max-steps schedule (split long runs)",
    )

    g = p.add_argument_group("generate / eval / benchmark")
    g.add_argument("--checkpoint", help="a .pt file or a run folder (best.pt preferred); default: OUT_DIR")
    g.add_argument("--prompt", default="Once upon a time", help="text to continue ('' = start from EOT)")
    g.add_argument("--max-new-tokens", type=int, default=120, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep mass p")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    g.add_argument("--num-samples", type=int, default=1, help="samples to generate")
    g.add_argument("--bench-steps", type=int, default=10, help="benchmark: timed training steps")
    g.add_argument("--bench-warmup", type=int, default=3, help="benchmark: untimed warm-up steps")
    g.add_argument("--bench-json", default=None, help="benchmark: JSON path (default OUT_DIR/benchmark.json)")
    g.add_argument(
        "--plan-device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="plan: the device precision 'auto' resolves for (default cuda: fp16)",
    )
    g.add_argument("--gpu-memory-gb", type=float, default=4.0, help="plan: the memory budget to check")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = str(Path("runs") / (args.preset or "cpu-demo"))
    if args.seed is None and args.mode != "train":
        args.seed = 0
    for name in ("batch_size", "grad_accum", "block_size", "max_steps", "max_new_tokens", "num_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    modes = {
        "train": train_main,
        "eval": eval_main,
        "generate": generate_main,
        "benchmark": benchmark_main,
        "plan": plan_main,
        "plot": plot_main,
    }
    try:
        return modes[args.mode](args)
    except TrainingDiverged as err:
        print(f"error: training diverged at {err}", file=sys.stderr)
        raise SystemExit(3) from None
    except (ValueError, TypeError, FileNotFoundError, PermissionError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
