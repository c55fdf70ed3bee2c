"""Training and validation batches cut from a packed token stream (the only data code the loop touches).

A training example is a window of block_size + 1 consecutive tokens of the stream
(doc_1 EOT doc_2 EOT ..., written by `token_cache.py`): x = window[:-1], y = window[1:], so every
label is the real next token and nothing is padded.

`BlockBatchSampler` draws non-overlapping windows (starts at multiples of block_size) in a per-epoch
permutation fixed by (seed, epoch); each DDP rank takes its slice of every global batch, and
`state_dict()` / `load_state_dict()` resume at exactly the next batch. `blocks_to_batch` cuts the
windows into (x, y); `iter_eval_batches` walks the validation stream in order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from phase1_foundation.src.validation import check_int


class BlockBatchSampler:
    """Deterministic, resumable, DDP-aware sampler of training windows.

    Epoch e cuts the stream of `num_tokens` tokens into windows of block_size + 1 tokens starting
    at o_e, o_e + block_size, o_e + 2*block_size, ...: inputs never overlap and every token after
    the first o_e + 1 is a label exactly once per epoch. Epoch 0 starts at o_0 = 0; every later
    epoch draws its grid offset o_e from [0, block_size) with (seed, e), so on a corpus seen many
    times the model meets each token in new contexts and at new positions instead of the same
    windows again (fixed windows are memorised much sooner: they overfit a small corpus).

    Epoch e visits its windows in the permutation drawn from (seed, e). A global batch is
    batch_size * world_size consecutive entries of that permutation; rank r takes entries
    [r*batch_size, (r+1)*batch_size). So two ranks with batch B together see exactly what one rank
    with batch 2B sees, in the same order. An epoch has n_blocks // global_batch batches (the
    windows left over at the end of an epoch's permutation are skipped in that epoch).

    `next(sampler)` returns the start offsets [batch_size] of this rank's next batch;
    `state_dict()` after N batches and `load_state_dict()` in a new sampler continue with batch N+1.
    """

    def __init__(
        self,
        num_tokens: int,
        block_size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        for name, v in (("block_size", block_size), ("batch_size", batch_size), ("world_size", world_size)):
            check_int(name, v, minimum=1)
        check_int("rank", rank, minimum=0, maximum=world_size - 1)
        self.num_tokens = int(num_tokens)
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.global_batch = batch_size * world_size
        self.n_blocks = (self.num_tokens - 1) // block_size
        if self.n_blocks < 1:
            raise ValueError(
                f"the corpus ({self.num_tokens} tokens) is shorter than one block of block_size + 1 = "
                f"{block_size + 1} tokens: use more data or a smaller --block-size"
            )
        if self.n_blocks < self.global_batch:
            raise ValueError(
                f"the corpus has {self.n_blocks} blocks of {block_size} tokens, fewer than one global batch "
                f"({batch_size} x {world_size} ranks = {self.global_batch}): use more data, or a smaller "
                "--batch-size or --block-size"
            )
        self.batches_per_epoch = self.n_blocks // self.global_batch  # of epoch 0 (offset 0)
        self.epoch = 0
        self.index = 0  # batches already drawn in this epoch
        self._perm = None
        self._offset = 0  # o_e of the current epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches of epoch `epoch`: len(self) for epoch 0; a later epoch's shifted grid can hold fewer."""
        return len(self._epoch_plan(epoch)[1]) // self.global_batch

    def _epoch_plan(self, epoch: int) -> tuple[int, np.ndarray]:
        """(grid offset o_e, permutation of the epoch's window numbers), both drawn from (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        offset = 0 if epoch == 0 else int(rng.integers(self.block_size))
        n_blocks = (self.num_tokens - 1 - offset) // self.block_size  # windows that fit after o_e
        if n_blocks < self.global_batch:  # a corpus of barely one batch: keep the grid at 0
            offset, n_blocks = 0, self.n_blocks
        return offset, rng.permutation(n_blocks)

    def __next__(self) -> np.ndarray:
        if self._perm is None:
            self._offset, self._perm = self._epoch_plan(self.epoch)
        if self.index >= len(self._perm) // self.global_batch:
            self.epoch, self.index = self.epoch + 1, 0
            self._offset, self._perm = self._epoch_plan(self.epoch)
        first = self.index * self.global_batch + self.rank * self.batch_size
        blocks = self._perm[first : first + self.batch_size]  # [B] window numbers
        self.index += 1
        return self._offset + blocks.astype(np.int64) * self.block_size  # [B] token offsets

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_tokens": self.num_tokens,
            "block_size": self.block_size,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "num_tokens", "block_size", "global_batch"):
            if state.get(k) != getattr(self, k):
                raise ValueError(
                    f"cannot resume the batch sampler: {k} was {state.get(k)!r} in the checkpoint and is "
                    f"{getattr(self, k)!r} now; resume with the same data, seed, block size and global batch"
                )
        self.epoch, self.index, self._perm = int(state["epoch"]), int(state["index"]), None


def blocks_to_batch(
    tokens: np.ndarray, starts: np.ndarray, block_size: int, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut windows at `starts` from the stream: x = tokens[s : s+T], y = tokens[s+1 : s+T+1].

    Returns LongTensors x, y of shape [B, T]. Every y is the real next token (no padding).
    """
    windows = np.stack([np.asarray(tokens[s : s + block_size + 1]) for s in starts])  # [B, T+1]
    if windows.shape[1] != block_size + 1:
        raise ValueError(
            f"a window starting at {int(max(starts))} runs past the end of the {len(tokens)}-token stream"
        )
    windows = torch.from_numpy(windows.astype(np.int64))
    x, y = windows[:, :-1], windows[:, 1:]  # [B, T] each
    if device is not None and torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    if device is not None:
        x, y = x.to(device), y.to(device)
    return x, y


def iter_eval_batches(
    tokens: np.ndarray,
    block_size: int,
    batch_size: int,
    *,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The validation stream in fixed order: windows 0, 1, 2, ... (stride block_size), batched.

    With several ranks, global batch i is split like the training sampler's. The last batch may be
    smaller; weight losses by the number of tokens (x.numel()) when averaging.
    `max_batches` limits the number of global batches (a fixed, cheap subset for periodic evals).
    """
    n_blocks = (len(tokens) - 1) // block_size
    if n_blocks < 1:
        raise ValueError(
            f"the validation split ({len(tokens)} tokens) is shorter than one block of {block_size + 1} "
            "tokens: use a larger validation set or a smaller --block-size"
        )
    global_batch = batch_size * world_size
    n_global = -(-n_blocks // global_batch)
    if max_batches is not None:
        n_global = min(n_global, max_batches)
    for b in range(n_global):
        blocks = np.arange(b * global_batch, min((b + 1) * global_batch, n_blocks))
        mine = blocks[rank * batch_size : (rank + 1) * batch_size]
        if len(mine):
            yield blocks_to_batch(tokens, mine * block_size, block_size, device)
