"""Sparse Mixture-of-Experts transformer: config, model and generation in one readable file.

    Config                      presets `t1000` (the reference model, ~158.8M params, ~19M active
                                per token outside the embeddings) and `cpu-demo`, plus `tiny` for tests;
                                analytic parameter / active-parameter / FLOP counts
    SparseMoEFFN                gate -> top-k -> softmax over the selected logits -> experts, with the
                                fast sorted dispatch of moe_dispatch.py; Switch aux loss, router z-loss
                                and routing statistics
    CausalSelfAttention         F.scaled_dot_product_attention, causal, with an optional KV cache
    SparseMoETransformerLayer   pre-norm: x + attn(ln1(x)); x + moe(ln2(x))
    SparseMoETransformer        embeddings, layers, final norm, untied head; forward / generate /
                                stream_generate (sampling from phase5_production.src.sampling)

Run `python sparse_moe_transformer/src/train.py` to print the parameter summary of the presets.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from phase5_production.src.sampling import sample_next_token
from sparse_moe_transformer.src.moe_dispatch import expert_capacity, expert_ffn, route_tokens

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
    dropout: float = 0.0
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
        self.n_heads, self.dropout = config.n_heads, config.dropout
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


if __name__ == "__main__":
    for preset in ("t1000", "cpu-demo"):
        print(f"{preset:9s} {parameter_summary(Config.from_preset(preset))}")
