"""From a corpus of documents to training batches for a language model.

A language model learns "given tokens t_0..t_i, predict t_{i+1}". To train it we need batches of
inputs x [B, T] and targets y [B, T] with y = x shifted left by one token. This module shows the
two ways of getting there and the plumbing around them:

Packing (what GPT-2, nanoGPT and most pre-training code do)
    Concatenate every tokenized document into one long stream, with an end-of-text (EOS) token
    after each one:   doc_1 EOS doc_2 EOS doc_3 EOS ...   (`pack_documents`)
    Then cut windows of T + 1 consecutive tokens from it (`make_blocks`, `get_random_batch`).
    No token is wasted; a window may span a document boundary, and the EOS token tells the model
    that what follows is unrelated.

Padding (what fine-tuning on separate examples often does)
    Each document is one row; shorter rows are filled up with a PAD token to the longest length
    (`pad_documents`). The PAD positions are wasted compute, and unless their targets are masked
    out of the loss (`masked_cross_entropy`) the model is trained to predict PAD after PAD, which
    distorts the loss (`unmasked_cross_entropy` shows how).

Storage
    Token streams are stored as memory-mapped files (`write_token_file`, `open_token_file`): the
    operating system pages in only the windows a batch touches, so a corpus larger than RAM costs
    nothing to "load". Ids are stored as uint16 when every id is below 65,536 (GPT-2's 50,257
    fit), else uint32.

Also: `train_val_split` (a held-out tail of the stream), `split_documents` (a shuffled split of a
document list) and `load_text_dataset` (any corpus through Hugging Face `datasets`: local text /
json / parquet / csv files, or TinyStories from the hub for users with internet).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from phase1_foundation.src.validation import check_int
from phase2_architecture.src.atomic_files import atomic_write

IGNORE_INDEX = -100  # the target value torch's cross_entropy skips (ignore_index default)


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------


def pack_documents(documents: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
    """Concatenate tokenized documents into one stream, an EOS token after each:

        [[5, 6], [7], []]  ->  [5, 6, EOS, 7, EOS, EOS]      int64 array of length sum(len) + n_docs

    The EOS after every document (the last one too) teaches the model where texts end, and lets
    it tell two neighbouring documents apart.
    """
    if isinstance(eos_id, bool) or not isinstance(eos_id, (int, np.integer)) or eos_id < 0:
        raise ValueError(f"eos_id must be a non-negative int, got {eos_id!r}")
    if isinstance(documents, (str, bytes)):
        raise TypeError(
            "pack_documents expects a list of token-id lists, got text: tokenize the documents first"
        )
    pieces = []
    eos = np.array([eos_id], dtype=np.int64)
    for k, doc in enumerate(documents):
        ids = np.asarray(doc).reshape(-1) if len(doc) else np.zeros(0, dtype=np.int64)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"document {k} holds {ids.dtype} values, not token ids: pass lists of ints")
        if ids.size and ids.min() < 0:
            raise ValueError(f"document {k} contains a negative token id ({ids.min()}): token ids are >= 0")
        pieces.append(ids.astype(np.int64))
        pieces.append(eos)
    if not pieces:
        raise ValueError("pack_documents got no documents: pass at least one tokenized document")
    return np.concatenate(pieces)  # [n_tokens]


def make_blocks(tokens: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a packed stream into non-overlapping training examples (an epoch in order).

    Window k covers tokens[k*T : k*T + T + 1]; x = window[:-1], y = window[1:]   -> x, y [N, T]
    N = (len(tokens) - 1) // T. The last (len(tokens) - 1) % T tokens do not fill a block and are
    not used (`leftover = (len(tokens) - 1) % block_size` tells how many).
    """
    tokens = np.asarray(tokens)
    _check_stream(tokens, block_size)
    n_blocks = (len(tokens) - 1) // block_size
    used = torch.from_numpy(tokens[: n_blocks * block_size + 1].astype(np.int64))  # [N*T + 1]
    x = used[:-1].view(n_blocks, block_size)  # [N, T]
    y = used[1:].view(n_blocks, block_size)  # [N, T]  (each row is x's row shifted by one)
    return x.clone(), y.clone()


def get_random_batch(
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `batch_size` random windows from a token stream (nanoGPT's get_batch).

    start_b ~ Uniform{0, ..., len - T - 1};  x[b] = tokens[start_b : start_b + T],
    y[b] = tokens[start_b + 1 : start_b + T + 1]                              -> x, y LongTensor [B, T]
    Pass a seeded torch.Generator for reproducible batches. Works on np.memmap without reading
    more than the sampled windows.
    """
    check_int("batch_size", batch_size, minimum=1)
    _check_stream(tokens, block_size)
    starts = torch.randint(0, len(tokens) - block_size, (batch_size,), generator=generator)  # [B]
    x = np.stack([np.asarray(tokens[s : s + block_size], dtype=np.int64) for s in starts.tolist()])  # [B, T]
    y = np.stack([np.asarray(tokens[s + 1 : s + 1 + block_size], dtype=np.int64) for s in starts.tolist()])
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    if device is not None:
        x, y = x.to(device), y.to(device)
    return x, y


def _check_stream(tokens, block_size: int) -> None:
    check_int("block_size", block_size, minimum=1)
    if getattr(tokens, "ndim", 1) != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tokens.shape}: pack the documents first")
    if len(tokens) < block_size + 1:
        raise ValueError(
            f"the token stream has {len(tokens)} tokens, a window needs block_size + 1 = {block_size + 1}: "
            "use more text or a smaller block_size"
        )


def train_val_split(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Split a token stream into a training head and a validation tail (views, no copy).

    The split is contiguous, not shuffled: shuffling individual tokens would destroy the text,
    and a contiguous tail keeps the two parts from sharing windows.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = int(round(len(tokens) * val_fraction))
    if n_val < 1 or n_val >= len(tokens):
        raise ValueError(
            f"val_fraction={val_fraction} of {len(tokens)} tokens leaves an empty split: use more tokens "
            "or another fraction"
        )
    cut = len(tokens) - n_val
    return tokens[:cut], tokens[cut:]


def split_documents(documents: Sequence, val_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """Shuffle a list of documents with `seed` and hold out `val_fraction` of them for validation.

    Splitting by document (before packing) guarantees no document is in both splits.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(documents) * val_fraction))
    if n_val < 1 or n_val >= len(documents):
        raise ValueError(
            f"val_fraction={val_fraction} of {len(documents)} documents leaves an empty split: "
            "use more documents or another fraction"
        )
    val = [documents[i] for i in order[:n_val]]
    train = [documents[i] for i in order[n_val:]]
    return train, val


# ----------------------------------------------------------------------------------------------
# Padding, for comparison
# ----------------------------------------------------------------------------------------------


@dataclass
class PaddedBatch:
    """One document per row, right-padded to the longest one.

    inputs    [B, T]  doc[:-1] then pad_id
    targets   [B, T]  doc[1:]  then pad_id   (what an unmasked loss would train on)
    loss_mask [B, T]  True where the target is a real token
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor

    @property
    def n_real(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def n_padding(self) -> int:
        return int((~self.loss_mask).sum())

    def masked_targets(self) -> torch.Tensor:
        """Targets with padded positions set to -100, which F.cross_entropy ignores."""
        return self.targets.masked_fill(~self.loss_mask, IGNORE_INDEX)


def pad_documents(
    documents: Sequence[Sequence[int]], pad_id: int, block_size: int | None = None
) -> PaddedBatch:
    """Turn each document (>= 2 tokens) into one (input, target) row, right-padded with pad_id.

    A document of n tokens gives n - 1 prediction positions. Rows are padded to T = max(n) - 1,
    or to `block_size` if given (documents longer than block_size + 1 raise: truncate them or pack).
    """
    if len(documents) == 0:
        raise ValueError("pad_documents got no documents")
    lengths = [len(doc) for doc in documents]
    if min(lengths) < 2:
        raise ValueError("every document needs at least 2 tokens to give one (input, target) pair")
    T = max(lengths) - 1 if block_size is None else block_size
    if max(lengths) - 1 > T:
        raise ValueError(
            f"a document has {max(lengths)} tokens, more than block_size + 1 = {T + 1}: "
            "truncate the documents or raise block_size"
        )
    B = len(documents)
    inputs = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T]
    targets = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T]
    loss_mask = torch.zeros((B, T), dtype=torch.bool)  # [B, T]
    for b, doc in enumerate(documents):
        ids = torch.as_tensor(list(doc), dtype=torch.long)  # [n]
        n = len(ids) - 1
        inputs[b, :n] = ids[:-1]
        targets[b, :n] = ids[1:]
        loss_mask[b, :n] = True
    return PaddedBatch(inputs, targets, loss_mask)


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy over real target tokens only.

    logits [B, T, V], targets [B, T], loss_mask [B, T] bool
    loss = sum_{b,t: mask} -log softmax(logits[b, t])[targets[b, t]] / (number of real tokens)
    """
    B, T, V = logits.shape
    per_token = F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T), reduction="none")  # [B*T]
    mask = loss_mask.reshape(B * T).to(per_token.dtype)  # [B*T], 1 on real tokens
    n_real = mask.sum()
    if n_real == 0:
        raise ValueError("loss_mask has no True entry: there is no real token to compute a loss on")
    return (per_token * mask).sum() / n_real


def unmasked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The naive loss: the mean over every position, padding included (what not to do)."""
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T))


# ----------------------------------------------------------------------------------------------
# Memory-mapped token files
# ----------------------------------------------------------------------------------------------

# File layout: a 16-byte header, then the ids, little-endian.
#   bytes 0-7   magic b"LLMTOKS\x00"
#   bytes 8-11  itemsize (uint32): 2 for uint16, 4 for uint32
#   bytes 12-15 reserved (0)
#   bytes 16-   n_tokens ids (n_tokens = (file size - 16) / itemsize)
_MAGIC = b"LLMTOKS\x00"
_HEADER_BYTES = 16
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_CHUNK = 1 << 22  # ids written per chunk, so huge memmaps never get copied whole


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type holding every id of a `vocab_size`-token vocabulary (ids 0 ..
    vocab_size - 1): uint16 when vocab_size <= 65,536, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_token_file(path: str | os.PathLike, ids, dtype=None) -> Path:
    """Write token ids to a memory-mappable file, atomically (phase 2's atomic_write).

    dtype None picks uint16 when max(ids) < 65536, else uint32. An explicit dtype (uint16/uint32)
    that cannot hold an id raises a ValueError instead of wrapping around.
    """
    path = Path(path)
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"write_token_file expects a 1-D sequence of ids, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
    lo, hi = _min_max(ids)
    if lo < 0:
        raise ValueError(f"token ids must be >= 0, found {lo}")
    if dtype is None:
        dtype = token_dtype(hi + 1)  # ids 0..hi: a vocabulary of hi + 1 tokens
    dtype = np.dtype(dtype)
    if dtype.itemsize not in _DTYPES or dtype.kind != "u":
        raise ValueError(f"dtype must be uint16 or uint32, got {dtype}")
    if hi > np.iinfo(dtype).max:
        raise ValueError(
            f"token id {hi} does not fit in {dtype.name} (max {np.iinfo(dtype).max}): "
            "use dtype=np.uint32 or dtype=None to choose automatically"
        )
    file_dtype = _DTYPES[dtype.itemsize]
    header = _MAGIC + np.uint32(dtype.itemsize).tobytes() + bytes(4)
    with atomic_write(path) as f:
        f.write(header)
        for start in range(0, ids.size, _CHUNK):
            f.write(np.ascontiguousarray(ids[start : start + _CHUNK], dtype=file_dtype).tobytes())
    return path


def _min_max(ids: np.ndarray) -> tuple[int, int]:
    if ids.size == 0:
        return 0, 0
    lo, hi = None, None
    for start in range(0, ids.size, _CHUNK):
        chunk = ids[start : start + _CHUNK]
        c_lo, c_hi = int(chunk.min()), int(chunk.max())
        lo = c_lo if lo is None else min(lo, c_lo)
        hi = c_hi if hi is None else max(hi, c_hi)
    return lo, hi


def open_token_file(path: str | os.PathLike) -> np.memmap:
    """Open a file written by `write_token_file` as a read-only np.memmap of its ids (no copy)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no token file at {path}: write one with write_token_file(path, ids)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(_HEADER_BYTES)
    if len(header) < _HEADER_BYTES or header[:8] != _MAGIC:
        raise ValueError(
            f"{path} is not a token file written by write_token_file (bad header); for a raw "
            "nanoGPT-style .bin file use np.memmap(path, dtype=np.uint16, mode='r')"
        )
    itemsize = int(np.frombuffer(header[8:12], dtype="<u4")[0])
    if itemsize not in _DTYPES:
        raise ValueError(f"{path} has an unknown item size {itemsize}: the file is corrupt, write it again")
    n_bytes = size - _HEADER_BYTES
    if n_bytes % itemsize:
        raise ValueError(
            f"{path} is truncated ({n_bytes} data bytes, not a multiple of {itemsize}): write it again"
        )
    n_tokens = n_bytes // itemsize
    if n_tokens == 0:
        return np.zeros(0, dtype=_DTYPES[itemsize])  # np.memmap cannot map an empty region
    return np.memmap(path, dtype=_DTYPES[itemsize], mode="r", offset=_HEADER_BYTES, shape=(n_tokens,))


# ----------------------------------------------------------------------------------------------
# Loading a corpus through Hugging Face `datasets`
# ----------------------------------------------------------------------------------------------

LOCAL_FORMATS = ("text", "json", "parquet", "csv")
TINYSTORIES = "roneneldan/TinyStories"


def load_text_dataset(
    source: str = TINYSTORIES,
    data_files=None,
    *,
    split: str = "train",
    text_column: str = "text",
    max_documents: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    **load_kwargs,
) -> list[str]:
    """Load a corpus as a list of document strings with `datasets.load_dataset`.

    Local files:  load_text_dataset("text", data_files="train.txt")      # one document per line
                  load_text_dataset("text", data_files="a.txt", sample_by="paragraph")
                  load_text_dataset("json", data_files="docs.jsonl", text_column="story")
                  load_text_dataset("parquet", data_files=["part-0.parquet"])
    Hub (needs internet, the first time):  load_text_dataset("roneneldan/TinyStories", split="validation")

    Offline, a hub name fails with one line naming the fix (connect, or use local files).
    """
    from datasets import load_dataset

    if source in LOCAL_FORMATS and data_files is None:
        raise ValueError(f"load_text_dataset({source!r}) reads local files: pass data_files='path/to/file'")
    if max_documents is not None:
        check_int("max_documents (None = all)", max_documents, minimum=1)
    if data_files is not None:
        files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
        missing = [str(f) for f in files if not Path(f).exists()]
        if missing:
            raise FileNotFoundError(f"data file(s) not found: {', '.join(missing)}")
        data_files = [str(f) for f in files]
    if max_documents is not None:
        split = f"{split}[:{max_documents}]"
    try:
        dataset = load_dataset(source, data_files=data_files, split=split, cache_dir=cache_dir, **load_kwargs)
    except (ConnectionError, OSError) as err:
        if source in LOCAL_FORMATS:
            raise
        raise RuntimeError(
            f"cannot download {source!r} from the Hugging Face hub (offline?): connect to the internet and "
            f"unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE, or pass local files, e.g. "
            f"load_text_dataset('text', data_files='train.txt') [{type(err).__name__}]"
        ) from None
    if text_column not in dataset.column_names:
        raise ValueError(
            f"column {text_column!r} not in the dataset (columns: {dataset.column_names}): "
            "pass text_column=<one of them>"
        )
    return list(dataset[text_column])
