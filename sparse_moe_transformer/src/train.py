"""Sparse Mixture-of-Experts transformer: the model and its training loop, in reading order.

The model

    Config, PRESETS             the model's fields; each preset pairs a Config with its training values:
                                t1000 (the reference model: 158.77M parameters, 18.97M active per token
                                outside the embeddings and head), cpu-demo (the offline demo), cpu-small
                                (nanoGPT's CPU model as 8 experts), tiny (tests)
    SparseMoEFFN                router (fp32) -> top-k -> softmax over the chosen logits -> experts, with the
                                sorted dispatch of moe_dispatch.py (+ shared experts); returns (out, router
                                logits, routing); options: SwiGLU experts, shared experts, bias balancing
    CausalSelfAttention         F.scaled_dot_product_attention, causal, with Phase 5's KVCache;
                                options: RoPE (Phase 2's), QK-norm
    SparseMoETransformerLayer   pre-norm: x + attn(ln1(x)); x + moe(ln2(x))
    SparseMoETransformer        embeddings, layers, final norm, untied head; forward(idx, targets)
                                -> MoEOutput (training: the head and loss chunk by chunk, chunked_loss.py);
                                generate / stream_generate (Phase 2's generation loop, Phase 5's sampling)
    moe_losses                  the objective lm + aux_loss_coef * aux + z_loss_coef * z from what the
                                model returns, with Phase 2's load_balancing_loss (Switch) and
                                router_z_loss (ST-MoE)

The training loop

    train_step                  gradient accumulation, autocast + fp16 GradScaler, NaN guard, clip, update,
                                then (balance "bias") the routing biases move towards equal load
    evaluate, sample_text       validation loss over real tokens; a short sample
    train                       the loop over a built state (fresh or resumed exactly): step, log (with the
                                routing health), evaluate, save (atomic latest.pt / best.pt), stop on Ctrl-C

Around it, each in its own module: the settings and the schedule (train_settings.py: TrainSettings, whose
defaults are the recipe, and lr_at), the optimizer (moe_optimizer.py), the runtime (runtime.py: device,
precision, DDP, stop requests), flags -> a run and its state (run_config.py), parameter counts
(param_counts.py), what a run writes (run_folder.py), and the command line (cli.py):
    python sparse_moe_transformer/src/train.py --help
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute_in_backward
from tqdm.auto import tqdm

from phase1_foundation.src.validation import check_int, check_number
from phase2_architecture.src.generation import evaluating, stream_tokens
from phase2_architecture.src.mixture_of_experts import (
    expert_capacity,
    load_balancing_loss,
    router_z_loss,
    update_balance_bias,
)
from phase2_architecture.src.positional_encoding import RotaryEmbedding
from phase3_components.src.lr_schedules import (
    set_learning_rate,
)
from phase5_production.src.kv_cache import KVCache, shifted_causal_mask
from phase5_production.src.sampling import sampler
from sparse_moe_transformer.src.batches import blocks_to_batch, iter_eval_batches
from sparse_moe_transformer.src.checkpointing import (
    RunFolderLock,
)
from sparse_moe_transformer.src.chunked_loss import linear_cross_entropy
from sparse_moe_transformer.src.expert_parallel import (
    ExpertParallelModel,
    every_rank_batches,
    expert_parallel_ffn,
)
from sparse_moe_transformer.src.moe_dispatch import Routing, SharedExperts, expert_ffn, route_tokens
from sparse_moe_transformer.src.rank_checks import RankHeartbeat, is_collective_failure
from sparse_moe_transformer.src.routing_health import progress_postfix, summarize_load
from sparse_moe_transformer.src.run_folder import MetricsLog, diverged, print_header, save, start_run_folder
from sparse_moe_transformer.src.runtime import (
    Runtime,
    StopRequest,
    TrainingDiverged,
    stop_requested,
    sum_over_ranks,
    unwrap,
)
from sparse_moe_transformer.src.train_settings import TrainSettings, lr_at

if TYPE_CHECKING:  # annotations only: run_config.py builds the Run and its TrainState from the flags
    from sparse_moe_transformer.src.run_config import Run, TrainState

# ----------------------------------------------------------------------------- Config

# Fields renamed since the first checkpoints were written: Config.from_saved reads those under today's names.
CONFIG_RENAMES = {
    "n_layers": "n_layer",
    "n_heads": "n_head",
    "n_experts": "n_expert",
    "max_len": "block_size",
}


@dataclass(frozen=True)
class Config:
    """Model hyper-parameters, named as in the Phase 2 GPT. A preset: `preset_config(name, **overrides)`."""

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
    # Options of the modded-nanogpt speedrun's recipe (RECIPE below turns them on in the presets); the
    # defaults reproduce the model from before they existed, so every saved config loads unchanged.
    pos: str = "learned"  # "learned": a table of block_size position vectors; "rope": rotary, in attention
    qk_norm: bool = False  # RMS-normalise every head's queries and keys (no weights) before the dot product
    zero_init_proj: bool = False  # the residual projections (attention out, expert w2) start at 0
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap); None = no cap
    expert_activation: str = "gelu"  # "gelu", "relu2" (relu(h)^2) or "swiglu" (silu(gate) * up), per expert
    # Options of today's sparse models (DeepSeekMoE, DeepSeek-V3); off by default, as above.
    n_shared_expert: int = 0  # dense experts of d_ff every token passes through, added to the routed output
    balance: str = "aux_loss"  # "aux_loss": the Switch loss alone; "bias": + a per-expert routing bias
    balance_bias_step: float = 1e-3  # "bias": how far one optimizer step moves a bias towards equal load

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
        check_int("Config.n_shared_expert", self.n_shared_expert, minimum=0)
        if self.balance not in ("aux_loss", "bias"):
            raise ValueError(f"Config.balance must be 'aux_loss' or 'bias', got {self.balance!r}.")
        check_number("Config.balance_bias_step", self.balance_bias_step, above=0)
        if self.expert_activation not in ("gelu", "relu2", "swiglu"):
            raise ValueError(
                f"Config.expert_activation must be gelu, relu2 or swiglu, got {self.expert_activation!r}."
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

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


# ----------------------------------------------------------------------------- presets

# The architecture of the time-to-quality recipe (BENCHMARKS.md, "Time to quality", measures each part):
# rotary positions, QK-norm, residual projections that start at zero. (The logit soft-cap was measured
# too and left out: on a CPU it cost 6% of the step time and gained nothing.) Its training half, Muon +
# warmup-stable-decay, is TrainSettings' defaults.
RECIPE = dict(pos="rope", qk_norm=True, zero_init_proj=True)


class Preset(NamedTuple):
    model: Config
    training: dict  # TrainSettings values; each one can be overridden by its flag (--batch-size, ...)


PRESETS: dict[str, Preset] = {
    # The reference model: GPT-2 vocabulary, 6 layers of 16 experts (top-2). The recipe without RoPE:
    # the learned position table is part of the reference size (158.77M); --set pos=rope drops it.
    # No dropout: 41M training tokens (5,000 steps x 4 x 8 x 256) see TinyStories less than once.
    "t1000": Preset(
        Config(vocab_size=50257, block_size=256, n_layer=6, n_head=8, d_model=512, n_expert=16, top_k=2,
               d_ff=1024, dropout=0.0, **{**RECIPE, "pos": "learned"}),
        dict(batch_size=4, grad_accum_steps=8, max_steps=5000, max_lr=6e-4, min_lr=6e-5, warmup_steps=200,
             eval_interval=250, eval_batches=50, log_interval=10, save_interval=250),
    ),
    # Trains on a 2-core CPU: small BPE vocabulary, 4 layers of 16 fine-grained experts (top-4 of 192:
    # the active size of top-2 of 384, measured better: BENCHMARKS.md, "The expert recipe").
    "cpu-demo": Preset(
        Config(vocab_size=4096, block_size=128, n_layer=4, n_head=6, d_model=192, n_expert=16, top_k=4,
               d_ff=192, dropout=0.0, **RECIPE),
        dict(batch_size=16, grad_accum_steps=1, max_steps=250, max_lr=3e-3, min_lr=3e-4, warmup_steps=20,
             eval_interval=50, eval_batches=10, log_interval=10, save_interval=50),
    ),
    # nanoGPT's small CPU model (4 layers, 4 heads, d 128, block 256: 0.8M active parameters per token
    # outside the embeddings) with its FFN split into 16 fine-grained experts of 128, top-4, and its CPU
    # batch (16 x 256) and AdamW lr (1e-3 -> 1e-4). Dropout on the residual branches only (attention
    # dropout would leave SDPA's fused CPU kernel): its 238K-token TinyStories sample is seen about 14
    # times in 800 steps.
    "cpu-small": Preset(
        Config(vocab_size=4096, block_size=256, n_layer=4, n_head=4, d_model=128, n_expert=16, top_k=4,
               d_ff=128, dropout=0.1, attn_dropout=0.0, **RECIPE),
        dict(batch_size=16, grad_accum_steps=1, max_steps=800, max_lr=1e-3, min_lr=1e-4, warmup_steps=30,
             eval_interval=250, eval_batches=50, log_interval=10, save_interval=250),
    ),
    # For unit tests: a few milliseconds per forward; trains with cpu-demo's values.
    "tiny": Preset(
        Config(vocab_size=97, block_size=32, n_layer=2, n_head=4, d_model=32, n_expert=4, top_k=2, d_ff=48,
               dropout=0.0),
        dict(batch_size=16, grad_accum_steps=1, max_steps=250, max_lr=3e-3, min_lr=3e-4, warmup_steps=20,
             eval_interval=50, eval_batches=10, log_interval=10, save_interval=50),
    ),
}  # fmt: skip


def preset_config(name: str, **overrides) -> Config:
    """A named preset's model with some fields replaced: preset_config("cpu-demo", dropout=0.1)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"Unknown Config field(s) {unknown}; the fields are {sorted(known)}.")
    return replace(PRESETS[name].model, **overrides)


# ----------------------------------------------------------------------------- SparseMoEFFN


class SparseMoEFFN(nn.Module):
    """y = sum over the top_k experts e chosen for x of  g_e(x) * (act(x W1_e + b1_e) W2_e + b2_e)
    (+ the shared experts' output, when Config.n_shared_expert > 0).

    act = GELU, ReLU^2 with Config.expert_activation="relu2", or SwiGLU with "swiglu": W1_e then holds the
    gate and up projections side by side [C, 2F], and act(h) = silu(h_gate) * h_up.

    Gate logits z = x W_g + b_g [N, E], in fp32 even under fp16/bf16 autocast. The top_k logits are
    softmaxed among themselves into the routing weights g. With Config.balance="bias" the experts are
    chosen by the top_k of z + b instead, b a per-expert bias that train_step moves towards equal load
    after every optimizer step; g still comes from z alone, so b never scales an expert's output
    (DeepSeek-V3; Phase 2's route_with_bias). Only top_k of n_expert expert FFNs run per token
    (moe_dispatch.py). forward returns (y, gate logits, routing): the losses are computed from them.
    """

    def __init__(self, config: Config):
        super().__init__()
        C, E, Fh = config.d_model, config.n_expert, config.d_ff
        self.n_expert, self.top_k, self.capacity_factor = E, config.top_k, config.capacity_factor
        self.activation = config.expert_activation
        self.gate = nn.Linear(C, E)
        up = 2 * Fh if config.expert_activation == "swiglu" else Fh  # SwiGLU: gate and up, side by side
        self.w1 = nn.Parameter(torch.empty(E, C, up))  # [E, C, F] (SwiGLU: [E, C, 2F])
        self.b1 = nn.Parameter(torch.zeros(E, up))  # [E, F] (SwiGLU: [E, 2F])
        self.w2 = nn.Parameter(torch.empty(E, Fh, C))  # [E, F, C]
        self.b2 = nn.Parameter(torch.zeros(E, C))  # [E, C]
        nn.init.normal_(self.w1, std=config.init_std)
        nn.init.normal_(self.w2, std=config.init_std)
        # a buffer: saved in checkpoints, moved by train_step (not by the optimizer), None unless "bias"
        self.register_buffer("balance_bias", torch.zeros(E) if config.balance == "bias" else None)
        hidden = config.n_shared_expert * Fh  # the shared experts as one dense FFN (moe_dispatch.py)
        self.shared = SharedExperts(C, hidden, config.expert_activation) if hidden else None
        self.expert_parallel = None  # set by expert_parallel.shard_experts: this rank holds a slice

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C] -> gate logits [N, E] in fp32 (or wider) whatever the autocast dtype: in fp16 or bf16,
        near-ties between experts would round to ties and the choice would follow the rounding."""
        dtype, device = torch.promote_types(x.dtype, torch.float32), x.device.type
        low = torch.is_autocast_enabled(device)  # leaving autocast costs ~6 us per call: skipped in fp32
        with torch.autocast(device, enabled=False) if low else nullcontext():
            return F.linear(x.to(dtype), self.gate.weight.to(dtype), self.gate.bias.to(dtype))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Routing]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, C]
        gate_logits = self.router_logits(x)  # [N, E] fp32
        if self.expert_parallel is not None:  # the other experts live on other ranks: all-to-all
            out, routing = expert_parallel_ffn(self, x, gate_logits, self.expert_parallel)
        else:
            capacity = expert_capacity(x.shape[0], self.top_k, self.n_expert, self.capacity_factor)
            routing = route_tokens(gate_logits, self.top_k, capacity, choice_bias=self.balance_bias)
            out = expert_ffn(x, self.w1, self.b1, self.w2, self.b2, routing, self.activation)  # [N, C]
        if self.shared is not None:
            out = out + self.shared(x)
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
            shared = [layer.moe.shared.w2.weight] if layer.moe.shared is not None else []
            for weight in [layer.attn.out_proj.weight, layer.moe.w2, *shared]:
                nn.init.normal_(weight, std=residual_std)
                if config.zero_init_proj:  # modded-nanogpt: every layer starts as the identity
                    nn.init.zeros_(weight)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)

    def hidden_matrices(self) -> list[nn.Parameter]:
        """What Muon updates (TrainSettings.optimizer "muon"): the attention projections, the expert
        stacks (each expert orthogonalised separately) and the shared experts' matrices; not the
        embeddings, router or head."""
        hidden = []
        for layer in self.layers:
            hidden += [layer.attn.qkv.weight, layer.attn.out_proj.weight, layer.moe.w1, layer.moe.w2]
            if layer.moe.shared is not None:
                hidden += [layer.moe.shared.w1.weight, layer.moe.shared.w2.weight]
        return hidden

    @torch.no_grad()
    def update_balance_biases(self, expert_counts: torch.Tensor) -> None:
        """Config.balance "bias": after an optimizer step, each layer's routing bias moves by
        balance_bias_step towards equal load, from expert_counts [L, E] of that step (every rank's
        counts, so that every rank moves its biases alike; Phase 2's update_balance_bias)."""
        for layer, counts in zip(self.layers, expert_counts):
            bias = layer.moe.balance_bias
            bias.copy_(update_balance_bias(bias, counts, self.config.balance_bias_step))

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


# =============================================================================================
# The training loop
# =============================================================================================

# ----------------------------------------------------------------------------- one step, evaluation, a sample


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
    if config.balance == "bias":  # towards equal load over the global batch: the same move on every rank
        unwrap(model).update_balance_biases(
            sum_over_ranks(expert_counts.clone()) if rt.distributed else expert_counts
        )
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
    stream = raw.stream_generate(
        ids, max_new_tokens, temperature=0.8, top_k=50, eos_token_id=tokenizer.eot_id, seed=seed
    )
    new = [int(t[0]) for t in stream]
    return prompt + tokenizer.decode([t for t in new if t != tokenizer.eot_id])


# ----------------------------------------------------------------------------- the run


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


def step_and_log(run: Run, state: TrainState, metrics: MetricsLog, bar) -> None:
    """One optimizer step at this step's learning rate; every log_interval steps, a metrics record of the
    window's mean losses, expert load and throughput."""
    s, rt = run.settings, run.runtime
    t0 = time.perf_counter()
    lr = lr_at(state.step, s)
    set_learning_rate(state.optimizer, lr)
    batches = [
        blocks_to_batch(run.data.train_tokens, next(state.sampler), s.seq_len, rt.device)
        for _ in range(s.grad_accum_steps)
    ]
    result = train_step(state.train_model, state.optimizer, state.scaler, batches, s, rt)
    dt = time.perf_counter() - t0
    state.step, state.tokens, state.train_time = (
        state.step + 1,
        state.tokens + s.tokens_per_step,
        state.train_time + dt,
    )
    bar.update(1)
    metrics.add(result, dt, s.tokens_per_step)
    if state.step % s.log_interval == 0 or state.step == s.max_steps:
        record = metrics.write_train_record(state, lr, result["grad_norm"], rt)
        health = progress_postfix(summarize_load(record["expert_load"]))  # the worst layer's max/min share
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}",
                        aux=f"{record['aux_loss']:.3f}", **health)  # fmt: skip
        if "routing_warning" in record and rt.is_main:
            bar.write(record["routing_warning"])


def run_steps(run: Run, state: TrainState, metrics: MetricsLog, bar, stop: StopRequest) -> tuple[str, dict]:
    """The loop: optimizer steps, evaluating and saving every eval_interval steps and saving every
    save_interval steps; at the end save, then evaluate. Returns (status, the last evaluation)."""
    s = run.settings
    last_eval = None
    # evaluate the untrained model once, so the validation curve starts at step 0
    if state.step == 0 and run.resume_checkpoint is None and s.eval_interval:
        last_eval = evaluate_and_log(run, state, metrics, bar)
    while state.step < run.stop_at:
        step_and_log(run, state, metrics, bar)
        if state.step < s.max_steps and s.eval_interval and state.step % s.eval_interval == 0:
            last_eval = evaluate_and_log(run, state, metrics, bar)
            save(run, state, is_best=last_eval["is_best"])
        elif s.save_interval and state.step % s.save_interval == 0:
            save(run, state, is_best=False)
        if stop_requested(stop.requested, run.runtime):  # Ctrl-C / SIGTERM on any rank
            save(run, state, is_best=False)
            return "interrupted", last_eval
    save(run, state, is_best=False)  # first, so a failing evaluation or sample loses nothing
    if state.step < s.max_steps:
        return "stopped", last_eval  # --stop-at-step
    last_eval = evaluate_and_log(run, state, metrics, bar)
    if last_eval["is_best"]:
        save(run, state, is_best=True)
    return "finished", last_eval


def train(run: Run, state: TrainState) -> dict:
    """Train `state` (fresh or resumed: run_config.build_state) to the run's last step, to --stop-at-step,
    or until Ctrl-C; returns a summary.

    Diverging (NaN loss or gradients) stops without saving the damaged weights; a torchrun peer that stops
    answering is named (rank_checks.py)."""
    s, rt = run.settings, run.runtime
    with RunFolderLock(run.out_dir, enabled=rt.is_main), RankHeartbeat(rt.rank, rt.world_size) as heartbeat:
        if rt.is_main:
            start_run_folder(run, overwrite=run.overwrite)
            print_header(run, state)
        bar = tqdm(total=s.max_steps, initial=state.step, desc="training", unit="step",
                   disable=not rt.is_main, dynamic_ncols=True)  # fmt: skip
        metrics = MetricsLog(run)
        metrics.write({"kind": "hardware", "step": state.step, **rt.hardware()})  # what the figures ran on
        try:
            with StopRequest() as stop:
                status, last_eval = run_steps(run, state, metrics, bar, stop)
        except TrainingDiverged as err:
            raise diverged(run, state, err) from None
        except RuntimeError as err:
            if rt.distributed and is_collective_failure(err):
                raise heartbeat.explain(err, state.step) from None
            raise
        finally:
            bar.close()
            metrics.close()
    return {
        "status": status,
        "step": state.step,
        "tokens": state.tokens,
        "best_val_loss": state.best_val,
        "val_loss": last_eval["val_loss"] if last_eval else None,
        "out_dir": str(run.out_dir),
    }


if __name__ == "__main__":
    # The command line (every --mode) is in cli.py. Run it through the package modules, so that cli.py
    # and this file share one set of classes instead of this script's __main__ copies.
    from sparse_moe_transformer.src.cli import main

    main()
