"""A decoder-only GPT assembled from this phase's blocks (the architecture of GPT-2).

    idx [B, T] token ids
      -> tok_emb(idx) + pos_emb(0..T-1)          [B, T, C]   token meaning + learned position
      -> drop
      -> blocks[0..n_layer-1]                     [B, T, C]   pre-norm TransformerBlock (causal)
      -> ln_f                                     [B, T, C]
      -> lm_head                                  [B, T, V]   logits for the NEXT token at each position

Training minimises cross-entropy between logits[:, t] and targets[:, t] = idx[:, t + 1]; a target
of -100 is ignored (padding, or positions that should not be scored).

Initialisation follows GPT-2: every Linear and Embedding weight ~ N(0, 0.02), biases 0, and the
two projections that write into the residual stream (attn.out_proj, ffn.down_proj) get std
0.02 / sqrt(2 * n_layer), so the variance of the residual stream does not grow with depth
(each block adds two terms to it).

Run `python phase2_architecture/src/gpt.py` to print the parameter count of a few configurations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from phase1_foundation.src.validation import check_int
from phase2_architecture.src.feed_forward import swiglu_hidden_size
from phase2_architecture.src.generation import evaluating, sample_next_token, stream_tokens
from phase2_architecture.src.norms import make_norm
from phase2_architecture.src.positional_encoding import LearnedPositionalEmbedding
from phase2_architecture.src.transformer_blocks import TransformerBlock


@dataclass
class GPTConfig:
    """Hyper-parameters of a GPT.

    vocab_size: number of token ids V.  block_size: longest context T the model accepts.
    n_layer / n_head / d_model: depth, heads per attention layer, width C (divisible by n_head).
    dropout: on embeddings, attention weights and residual branches.  bias: in Linear and norms.
    norm: "layernorm" (GPT-2) or "rmsnorm".  ffn: "gelu" (GPT-2, hidden 4C) or "swiglu".
    tie_weights: share lm_head.weight with tok_emb.weight (GPT-2 does; saves V*C parameters).
    pos: "learned" (GPT-2: a position table added to the token embeddings) or "rope" (Llama: queries
        and keys rotated by position inside attention; no position table).
    n_kv_head: key/value heads of grouped-query attention (None = n_head; 1 = multi-query).
    gelu_approximate: "none" (exact erf GELU) or "tanh" (the approximation GPT-2 was trained with;
        needed to reproduce its logits, see phase4_training/src/gpt2_weights.py).
    """

    vocab_size: int
    block_size: int
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"
    ffn: str = "gelu"
    tie_weights: bool = False
    pos: str = "learned"
    n_kv_head: int | None = None
    gelu_approximate: str = "none"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            check_int(f"GPTConfig.{name}", value, minimum=1)
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head}) "
                "so that every head gets d_model / n_head features."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}.")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"GPTConfig.norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}.")
        if self.ffn not in ("gelu", "swiglu"):
            raise ValueError(f"GPTConfig.ffn must be 'gelu' or 'swiglu', got {self.ffn!r}.")
        if self.pos not in ("learned", "rope"):
            raise ValueError(f"GPTConfig.pos must be 'learned' or 'rope', got {self.pos!r}.")
        if self.pos == "rope" and (self.d_model // self.n_head) % 2 != 0:
            raise ValueError(
                f"RoPE rotates feature pairs: the head size d_model / n_head = {self.d_model // self.n_head} "
                "must be even; change d_model or n_head."
            )
        if self.n_kv_head is not None and (
            isinstance(self.n_kv_head, bool)
            or not isinstance(self.n_kv_head, int)
            or self.n_kv_head < 1
            or self.n_head % self.n_kv_head != 0
        ):
            raise ValueError(
                f"GPTConfig.n_kv_head must be None or a positive divisor of n_head={self.n_head}, "
                f"got {self.n_kv_head!r}."
            )
        if self.gelu_approximate not in ("none", "tanh"):
            raise ValueError(
                f"GPTConfig.gelu_approximate must be 'none' (exact) or 'tanh', got {self.gelu_approximate!r}."
            )
        if self.ffn != "gelu" and self.gelu_approximate != "none":
            raise ValueError(
                "GPTConfig.gelu_approximate applies to ffn='gelu' only; leave it 'none' for swiglu."
            )


class GPT(nn.Module):
    """Decoder-only transformer language model. See the module docstring for the data flow."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT expects a GPTConfig, got {type(config).__name__}.")
        self.config = config
        C = config.d_model
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        # learned: an nn.Embedding of positions; rope: None (positions rotate q and k in attention)
        self.pos_emb = LearnedPositionalEmbedding(config.block_size, C) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                C,
                config.n_head,
                dropout=config.dropout,
                bias=config.bias,
                norm=config.norm,
                ffn=config.ffn,
                norm_first=True,
                causal=True,
                n_kv_head=config.n_kv_head,
                rope_block_size=config.block_size if config.pos == "rope" else None,
                gelu_approximate=config.gelu_approximate,
            )
            for _ in range(config.n_layer)
        )
        self.ln_f = make_norm(config.norm, C, bias=config.bias)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # Residual projections: std 0.02 / sqrt(2 * n_layer) (two residual additions per block).
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.out_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.ffn.down_proj.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Number of distinct trainable parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())

    def _check_idx(self, idx: torch.Tensor, check_length: bool = True) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.dim() != 2:
            got = (
                f"{idx.dtype} tensor of shape {tuple(idx.shape)}"
                if isinstance(idx, torch.Tensor)
                else type(idx)
            )
            raise TypeError(f"idx must be a LongTensor [B, T] of token ids, got {got}.")
        T = idx.shape[1]
        if T == 0:
            raise ValueError("idx has no tokens (T = 0); feed at least one token.")
        if check_length and T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds block_size {self.config.block_size}; crop the input to the "
                f"last {self.config.block_size} tokens or build the model with a larger block_size."
            )
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(
                f"token ids must be in [0, {self.config.vocab_size - 1}] "
                f"(vocab_size {self.config.vocab_size}), "
                f"got ids in [{lo}, {hi}]; check the tokenizer matches the model's vocab_size."
            )

    def _check_targets(self, targets: torch.Tensor, idx: torch.Tensor) -> None:
        if targets.shape != idx.shape or targets.dtype != torch.long:
            raise ValueError(
                f"targets must be a LongTensor with the same shape as idx {tuple(idx.shape)}, "
                f"got {targets.dtype} {tuple(targets.shape)}."
            )
        valid = targets != -100
        if valid.any():
            scored = targets[valid]
            if int(scored.min()) < 0 or int(scored.max()) >= self.config.vocab_size:
                raise ValueError(
                    f"targets must be token ids in [0, {self.config.vocab_size - 1}] or -100 (ignored), "
                    f"got values in [{int(scored.min())}, {int(scored.max())}]."
                )

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx [B, T] -> (logits [B, T, V], mean cross-entropy over targets != -100, or None)."""
        self._check_idx(idx)
        B, T = idx.shape
        x = self.tok_emb(idx)  # [B, T, C]
        if self.pos_emb is not None:
            x = x + self.pos_emb.positions(T)  # [T, C] learned positions
        x = self.drop(x)  # [B, T, C]
        for block in self.blocks:
            x = block(x)  # [B, T, C]
        x = self.ln_f(x)
        logits = self.lm_head(x)  # [B, T, V]
        if targets is None:
            return logits, None
        self._check_targets(targets, idx)
        loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T), ignore_index=-100)
        return logits, loss

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        eos_token_id: int | None = None,
    ) -> torch.Tensor:
        """Append up to `max_new_tokens` sampled tokens to idx [B, T]; returns [B, T + n].

        The loop is `generation.stream_tokens`, run here without a cache: every step re-runs the whole
        sequence (Phase 5's `generate_with_cache` runs the same loop with a KV cache).
        temperature = 0 picks the most likely token (greedy); top_k keeps only the k most likely.
        Past block_size the model sees the last block_size tokens (the window slides; see
        generation.py for why). With eos_token_id, n < max_new_tokens once every row has produced it.
        Dropout is switched off while generating and the previous train/eval mode restored after.
        """
        self._check_idx(idx, check_length=False)  # longer prompts: the loop keeps the last window
        if eos_token_id is not None:
            check_int("eos_token_id", eos_token_id, minimum=0, maximum=self.config.vocab_size - 1)

        def next_token(logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
            return sample_next_token(logits, temperature=temperature, top_k=top_k, generator=generator)

        def logits_fn(ids: torch.Tensor, cache: None) -> torch.Tensor:
            return self(ids)[0]  # [B, T, V]

        with evaluating(self):
            stream = stream_tokens(
                logits_fn,
                idx,
                max_new_tokens,
                next_token,
                block_size=self.config.block_size,
                eos_token_id=eos_token_id,
            )
            new_tokens = [token[:, None] for token in stream]  # each [B, 1]
        return torch.cat([idx, *new_tokens], dim=1)


def gpt_parameter_count(config: GPTConfig) -> int:
    """Number of parameters of GPT(config), from the formula (checked against the module in the tests).

    With C = d_model, V = vocab_size, T = block_size, L = n_layer, b = 1 if bias else 0:
        embeddings   V*C + T*C                [RoPE: V*C, no position table]
        per block    norms 2 * (C + b*C)      [RMSNorm: 2 * C]
                     attention 2 * (C*C + b*C) + 2 * (C*K + b*K)    (q, out; k, v: K = n_kv_head * C / n_head)
                     FFN gelu   2*C*H + b*(H + C), H = 4C
                         swiglu 3*C*H + b*(2H + C), H = swiglu_hidden_size(C)
        final norm   C + b*C                 [RMSNorm: C]
        lm_head      V*C (0 when tied to the token embedding)
    """
    C, V, T, L = config.d_model, config.vocab_size, config.block_size, config.n_layer
    b = 1 if config.bias else 0
    norm = C + b * C if config.norm == "layernorm" else C
    K = (config.n_kv_head or config.n_head) * (C // config.n_head)  # width of the k and v projections
    attention = 2 * (C * C + b * C) + 2 * (C * K + b * K)
    if config.ffn == "gelu":
        H = 4 * C
        ffn = 2 * C * H + b * (H + C)
    else:
        H = swiglu_hidden_size(C)
        ffn = 3 * C * H + b * (2 * H + C)
    per_block = 2 * norm + attention + ffn
    lm_head = 0 if config.tie_weights else V * C
    positions = T * C if config.pos == "learned" else 0
    return V * C + positions + L * per_block + norm + lm_head


if __name__ == "__main__":
    for cfg in (
        GPTConfig(vocab_size=65, block_size=64),
        GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768, tie_weights=True),
        GPTConfig(
            vocab_size=32000, block_size=2048, n_layer=8, n_head=8, d_model=512, norm="rmsnorm", ffn="swiglu"
        ),
    ):
        print(f"{gpt_parameter_count(cfg):>12,d} parameters  {cfg}")
