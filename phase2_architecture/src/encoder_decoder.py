"""The original encoder–decoder transformer (Vaswani et al., 2017), assembled from this phase's blocks.

    src [B, S] --src_emb * sqrt(C) + sinusoidal--> N x EncoderBlock --> memory [B, S, C]
    tgt [B, T] --tgt_emb * sqrt(C) + sinusoidal--> N x DecoderBlock(memory) --> lm_head --> [B, T, V_tgt]

The encoder reads the whole source at once (bidirectional attention, padding masked out). The
decoder generates the target left to right: its self-attention is causal, and its cross-attention
lets every target position look at every (non-padding) source position. Embeddings are scaled by
sqrt(d_model) as in the paper; initialised with std 1/sqrt(d_model), they then have the same size
as the unit-amplitude sinusoids.

Post-norm by default (the paper); `norm_first=True` gives the pre-norm variant, which adds a final
LayerNorm after each stack (as torch.nn.Transformer does with norm_first).

Padding: pass `src_key_mask` [B, S] (True = real token) or build the model with `pad_id`, in
which case the mask is `src != pad_id`. Padded target positions need no mask (they come after
the real tokens, so causal attention never lets a real token see them); give them target -100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from phase1_foundation.src.validation import check_int
from phase2_architecture.src.norms import LayerNorm
from phase2_architecture.src.positional_encoding import SinusoidalPositionalEncoding
from phase2_architecture.src.transformer_blocks import DecoderBlock, EncoderBlock


@dataclass
class EncoderDecoderConfig:
    """src/tgt_vocab_size: vocabularies; block_size: longest source or target; d_ff default 4*d_model.

    pad_id: source padding id (mask derived from it) or None.  norm_first: False = post-norm (paper).
    """

    src_vocab_size: int
    tgt_vocab_size: int
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    d_ff: int | None = None
    dropout: float = 0.0
    pad_id: int | None = None
    norm_first: bool = False

    def __post_init__(self):
        for name in ("src_vocab_size", "tgt_vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            check_int(f"EncoderDecoderConfig.{name}", value, minimum=1)
        if self.d_model % self.n_head != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}).")


class EncoderDecoderTransformer(nn.Module):
    """Sequence-to-sequence transformer: forward(src, tgt, targets=None) -> (logits, loss or None)."""

    def __init__(self, config: EncoderDecoderConfig):
        super().__init__()
        self.config = config
        C = config.d_model
        block_args = dict(d_ff=config.d_ff, dropout=config.dropout, norm_first=config.norm_first)
        self.src_emb = nn.Embedding(config.src_vocab_size, C)
        self.tgt_emb = nn.Embedding(config.tgt_vocab_size, C)
        self.pos_enc = SinusoidalPositionalEncoding(config.block_size, C)
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(
            EncoderBlock(C, config.n_head, **block_args) for _ in range(config.n_layer)
        )
        self.decoder = nn.ModuleList(
            DecoderBlock(C, config.n_head, **block_args) for _ in range(config.n_layer)
        )
        # Pre-norm stacks end un-normalised, so they get a final norm; post-norm blocks end with one already.
        self.enc_norm = LayerNorm(C) if config.norm_first else nn.Identity()
        self.dec_norm = LayerNorm(C) if config.norm_first else nn.Identity()
        self.lm_head = nn.Linear(C, config.tgt_vocab_size)
        # Embeddings ~ N(0, 1/C), so that after the sqrt(C) scaling they have unit size, like the
        # sinusoids they are added to (with PyTorch's default N(0, 1) the tokens would drown the positions).
        for table in (self.src_emb, self.tgt_emb):
            nn.init.normal_(table.weight, mean=0.0, std=C**-0.5)

    def _embed(self, ids: torch.Tensor, table: nn.Embedding, name: str) -> torch.Tensor:
        if ids.dtype != torch.long or ids.dim() != 2:
            raise TypeError(
                f"{name} must be a LongTensor [B, L], got {ids.dtype} of shape {tuple(ids.shape)}."
            )
        if int(ids.min()) < 0 or int(ids.max()) >= table.num_embeddings:
            raise ValueError(
                f"{name} ids must be in [0, {table.num_embeddings - 1}], "
                f"got [{int(ids.min())}, {int(ids.max())}]."
            )
        x = table(ids) * math.sqrt(self.config.d_model)  # [B, L, C]
        return self.drop(self.pos_enc(x))  # pos_enc checks L <= block_size

    def source_mask(self, src: torch.Tensor, src_key_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """[B, S] True for real source tokens: the given mask, else src != pad_id, else None (no padding)."""
        if src_key_mask is not None:
            if src_key_mask.shape != src.shape:
                raise ValueError(
                    f"src_key_mask must have the shape of src {tuple(src.shape)}, "
                    f"got {tuple(src_key_mask.shape)}."
                )
            return src_key_mask
        if self.config.pad_id is not None:
            return src != self.config.pad_id
        return None

    def encode(self, src: torch.Tensor, src_key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src [B, S] -> memory [B, S, C]."""
        mask = self.source_mask(src, src_key_mask)
        x = self._embed(src, self.src_emb, "src")
        for block in self.encoder:
            x = block(x, mask)
        return self.enc_norm(x)

    def decode(
        self, tgt: torch.Tensor, memory: torch.Tensor, src_key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tgt [B, T], memory [B, S, C] -> logits [B, T, V_tgt]. `src_key_mask` is [B, S] (True = real)."""
        x = self._embed(tgt, self.tgt_emb, "tgt")
        for block in self.decoder:
            x = block(x, memory, src_key_mask)
        return self.lm_head(self.dec_norm(x))

    def forward(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        targets: torch.Tensor | None = None,
        src_key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: logits for every target position; loss against `targets` (-100 ignored)."""
        mask = self.source_mask(src, src_key_mask)
        logits = self.decode(tgt, self.encode(src, mask), mask)  # [B, T, V]
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def greedy_decode(
        self, src: torch.Tensor, bos_id: int, max_new_tokens: int, src_key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encode once, then append the most likely token max_new_tokens times -> [B, 1 + max_new_tokens]."""
        if max_new_tokens + 1 > self.config.block_size:
            raise ValueError(
                f"1 + max_new_tokens must be <= block_size {self.config.block_size}, "
                f"got {max_new_tokens + 1}."
            )
        was_training = self.training
        self.eval()
        try:
            mask = self.source_mask(src, src_key_mask)
            memory = self.encode(src, mask)  # [B, S, C], computed once
            out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
            for _ in range(max_new_tokens):
                next_id = self.decode(out, memory, mask)[:, -1].argmax(dim=-1, keepdim=True)  # [B, 1]
                out = torch.cat([out, next_id], dim=1)
        finally:
            self.train(was_training)
        return out
