"""Data pipeline: packing, blocks, random batches, splits, padding + loss masking, memory-mapped
token files, and corpus loading through HF `datasets` (local files only, no network)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from phase2_architecture.src.toy_corpus import NURSERY_RHYMES, make_char_batches
from phase3_components.src.text_data import (
    IGNORE_INDEX,
    get_random_batch,
    load_text_dataset,
    make_blocks,
    masked_cross_entropy,
    open_token_file,
    pack_documents,
    pad_documents,
    split_documents,
    token_dtype,
    train_val_split,
    unmasked_cross_entropy,
    write_token_file,
)

# ---------------------------------------------------------------------------------------------
# packing, blocks, batches, splits
# ---------------------------------------------------------------------------------------------


def test_pack_documents_puts_eos_after_every_document():
    stream = pack_documents([[5, 6], [7], [], [8, 9, 10]], eos_id=0)
    assert stream.tolist() == [5, 6, 0, 7, 0, 0, 8, 9, 10, 0]
    assert stream.dtype == np.int64


def test_pack_documents_on_random_documents():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 500, size=rng.integers(0, 30)).tolist() for _ in range(50)]
    stream = pack_documents(docs, eos_id=0)
    assert len(stream) == sum(map(len, docs)) + len(docs)
    # splitting the stream at EOS gives the documents back
    pieces = np.split(stream, np.flatnonzero(stream == 0) + 1)[:-1]
    assert [p[:-1].tolist() for p in pieces] == docs


def test_pack_documents_errors():
    with pytest.raises(ValueError, match="eos_id"):
        pack_documents([[1]], eos_id=-1)
    with pytest.raises(ValueError, match="negative"):
        pack_documents([[1, -2]], eos_id=0)
    with pytest.raises(ValueError, match="no documents"):
        pack_documents([], eos_id=0)
    with pytest.raises(TypeError, match="tokenize"):
        pack_documents("some text", eos_id=0)
    with pytest.raises(TypeError, match="not token ids"):
        pack_documents([[1, 2], [0.5]], eos_id=0)


def test_make_blocks_are_shifted_consecutive_windows():
    tokens = np.arange(100, 123)  # 23 tokens
    x, y = make_blocks(tokens, block_size=5)  # (23 - 1) // 5 = 4 blocks, 2 leftover
    assert x.shape == y.shape == (4, 5) and x.dtype == torch.long
    assert x.flatten().tolist() == list(range(100, 120))
    assert y.flatten().tolist() == list(range(101, 121))


def test_get_random_batch_shapes_shift_and_range():
    tokens = np.arange(1000, 1020)  # 20 tokens, T = 4 -> valid starts 0..15
    g = torch.Generator().manual_seed(0)
    starts = []
    for _ in range(300):
        x, y = get_random_batch(tokens, batch_size=8, block_size=4, generator=g)
        assert x.shape == y.shape == (8, 4) and x.dtype == y.dtype == torch.long
        assert torch.equal(y, x + 1)  # targets are the next tokens
        assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # windows are consecutive
        starts += (x[:, 0] - 1000).tolist()
    assert min(starts) == 0 and max(starts) == 15  # every window, edges included, can be drawn


def test_get_random_batch_is_reproducible_with_a_generator():
    tokens = np.random.default_rng(0).integers(0, 50, size=500)
    a = get_random_batch(tokens, 4, 8, generator=torch.Generator().manual_seed(7))
    b = get_random_batch(tokens, 4, 8, generator=torch.Generator().manual_seed(7))
    c = get_random_batch(tokens, 4, 8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_get_random_batch_and_train_val_split_equal_the_phase2_toy_corpus_batches():
    """Phase 2's make_char_batches samples inline; the same seed gives the same batches here."""
    vocab, phase2_get_batch = make_char_batches(block_size=16, batch_size=5, val_fraction=0.1, seed=3)
    ids = np.array(vocab.encode(NURSERY_RHYMES), dtype=np.int64)
    train, val = train_val_split(ids, 0.1)
    g = torch.Generator().manual_seed(3)
    for split, part in [("train", train), ("val", val), ("train", train)]:
        x, y = get_random_batch(part, 5, 16, generator=g)
        x2, y2 = phase2_get_batch(split)
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_batch_errors():
    with pytest.raises(ValueError, match="block_size"):
        get_random_batch(np.arange(5), 2, 5)
    with pytest.raises(ValueError, match="block_size"):
        make_blocks(np.arange(10), 0)
    with pytest.raises(ValueError, match="1-D"):
        get_random_batch(np.zeros((4, 4), dtype=np.int64), 1, 2)


def test_train_val_split_is_a_contiguous_cut():
    tokens = np.arange(1000)
    train, val = train_val_split(tokens, val_fraction=0.1)
    assert len(train) == 900 and len(val) == 100
    assert np.array_equal(np.concatenate([train, val]), tokens)
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(tokens, val_fraction=1.0)
    with pytest.raises(ValueError, match="empty split"):
        train_val_split(np.arange(3), val_fraction=0.01)


def test_split_documents_is_disjoint_and_seeded():
    docs = [f"doc {i}" for i in range(100)]
    train, val = split_documents(docs, val_fraction=0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert sorted(train + val) == sorted(docs)
    assert split_documents(docs, 0.2, seed=3) == (train, val)
    assert split_documents(docs, 0.2, seed=4)[1] != val


# ---------------------------------------------------------------------------------------------
# padding and the loss mask
# ---------------------------------------------------------------------------------------------


class CumulativeMeanLM(nn.Module):
    """A tiny causal language model: position t sees the mean embedding of tokens 0..t."""

    def __init__(self, vocab_size: int, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, idx):  # idx [B, T]
        h = self.emb(idx)  # [B, T, C]
        counts = torch.arange(1, idx.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)  # [1, T, 1]
        h = h.cumsum(dim=1) / counts  # [B, T, C] causal running mean
        return self.head(torch.tanh(h))  # [B, T, V]


def test_the_tiny_model_is_causal():
    torch.manual_seed(0)
    model = CumulativeMeanLM(20).double()
    x = torch.randint(0, 20, (2, 10))
    x2 = x.clone()
    x2[:, 6:] = torch.randint(0, 20, (2, 4))  # change the future
    assert torch.allclose(model(x)[:, :6], model(x2)[:, :6])
    assert not torch.allclose(model(x)[:, 6:], model(x2)[:, 6:])


def test_pad_documents_layout():
    batch = pad_documents([[1, 2, 3, 4], [5, 6]], pad_id=0)
    assert batch.inputs.tolist() == [[1, 2, 3], [5, 0, 0]]
    assert batch.targets.tolist() == [[2, 3, 4], [6, 0, 0]]
    assert batch.loss_mask.tolist() == [[True, True, True], [True, False, False]]
    assert (batch.n_real, batch.n_padding) == (4, 2)
    assert batch.masked_targets().tolist() == [[2, 3, 4], [6, IGNORE_INDEX, IGNORE_INDEX]]
    with pytest.raises(ValueError, match=r"more than block_size \+ 1 = 3"):
        pad_documents([[1, 2, 3, 4]], pad_id=0, block_size=2)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        pad_documents([[1]], pad_id=0)


def test_masked_padded_loss_equals_unpadded_loss_and_unmasked_differs():
    torch.manual_seed(0)
    V, pad_id = 30, 0
    model = CumulativeMeanLM(V).double()
    gen = torch.Generator().manual_seed(1)
    docs = [
        torch.randint(1, V, (int(n),), generator=gen).tolist()
        for n in torch.randint(2, 25, (6,), generator=gen)
    ]
    # reference: each document on its own, no padding anywhere; mean over all predicted tokens
    logits_each = [model(torch.tensor(doc[:-1]).unsqueeze(0))[0] for doc in docs]  # [n_i - 1, V]
    targets_each = [torch.tensor(doc[1:]) for doc in docs]
    reference = F.cross_entropy(torch.cat(logits_each), torch.cat(targets_each))

    batch = pad_documents(docs, pad_id=pad_id)
    assert batch.n_padding > 0
    logits = model(batch.inputs)  # [B, T, V]
    masked = masked_cross_entropy(logits, batch.targets, batch.loss_mask)
    torch.testing.assert_close(masked, reference, rtol=1e-10, atol=1e-10)
    # the same through cross_entropy's ignore_index
    ignored = F.cross_entropy(logits.reshape(-1, V), batch.masked_targets().reshape(-1))
    torch.testing.assert_close(ignored, reference, rtol=1e-10, atol=1e-10)
    # unmasked: padding positions count as "predict PAD" targets and change the loss
    unmasked = unmasked_cross_entropy(logits, batch.targets)
    assert abs(unmasked.item() - reference.item()) > 1e-3
    # and the gradients differ: unmasked, the model is trained towards predicting PAD
    g_masked = torch.autograd.grad(masked, model.head.bias)[0]
    g_unmasked = torch.autograd.grad(
        unmasked_cross_entropy(model(batch.inputs), batch.targets), model.head.bias
    )[0]
    # d loss / d bias[PAD] < 0 without the mask: gradient descent raises the PAD logit
    assert g_masked[pad_id] > 0 > g_unmasked[pad_id]


def test_masked_loss_needs_a_real_token():
    with pytest.raises(ValueError, match="no True"):
        masked_cross_entropy(
            torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=bool)
        )


# ---------------------------------------------------------------------------------------------
# memory-mapped token files
# ---------------------------------------------------------------------------------------------


def test_token_file_round_trip_uint16(tmp_path):
    ids = np.random.default_rng(0).integers(0, 50_257, size=10_000)
    path = write_token_file(tmp_path / "train.bin", ids)
    tokens = open_token_file(path)
    assert isinstance(tokens, np.memmap)
    assert tokens.dtype == np.uint16
    assert np.array_equal(tokens, ids)
    assert path.stat().st_size == 16 + 2 * len(ids)  # header + 2 bytes per token
    assert [p.name for p in tmp_path.iterdir()] == ["train.bin"]  # atomic: no temp file left
    x, y = get_random_batch(tokens, 4, 16, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.long and torch.equal(x[:, 1:], y[:, :-1])


def test_token_file_picks_uint32_for_large_vocabularies(tmp_path):
    ids = [0, 65_535, 65_536, 100_000]
    tokens = open_token_file(write_token_file(tmp_path / "big.bin", ids))
    assert tokens.dtype == np.uint32 and tokens.tolist() == ids
    # 65,535 still fits in uint16
    assert open_token_file(write_token_file(tmp_path / "edge.bin", [65_535])).dtype == np.uint16


def test_token_dtype_holds_every_id_of_the_vocabulary():
    # ids run 0 .. vocab_size - 1: 65,536 ids still fit uint16 (max 65,535), one more does not
    assert token_dtype(50_257) == np.uint16 and token_dtype(2**16) == np.uint16
    assert token_dtype(2**16 + 1) == np.uint32
    for vocab_size in (1, 2**16, 2**16 + 1, 2**20):
        assert np.iinfo(token_dtype(vocab_size)).max >= vocab_size - 1


def test_token_file_accepts_a_memmap_and_explicit_dtype(tmp_path):
    raw = tmp_path / "scratch.raw"
    np.arange(3000, dtype=np.uint16).tofile(raw)
    source = np.memmap(raw, dtype=np.uint16, mode="r")
    tokens = open_token_file(write_token_file(tmp_path / "t.bin", source, dtype=np.dtype(np.uint32)))
    assert tokens.dtype == np.uint32 and np.array_equal(tokens, np.arange(3000))


def test_token_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not fit in uint16"):
        write_token_file(tmp_path / "x.bin", [1, 70_000], dtype=np.uint16)
    with pytest.raises(ValueError, match=">= 0"):
        write_token_file(tmp_path / "x.bin", [1, -1])
    with pytest.raises(ValueError, match="uint16 or uint32"):
        write_token_file(tmp_path / "x.bin", [1], dtype=np.int64)
    with pytest.raises(TypeError, match="integers"):
        write_token_file(tmp_path / "x.bin", [1.5])
    assert not (tmp_path / "x.bin").exists()
    raw = tmp_path / "raw.bin"
    np.arange(10, dtype=np.uint16).tofile(raw)
    with pytest.raises(ValueError, match="not a token file"):
        open_token_file(raw)
    good = write_token_file(tmp_path / "good.bin", [1, 2, 3])
    with open(good, "ab") as f:
        f.write(b"\x00")  # half a token
    with pytest.raises(ValueError, match="truncated"):
        open_token_file(good)
    with pytest.raises(FileNotFoundError, match="write_token_file"):
        open_token_file(tmp_path / "missing.bin")
    assert len(open_token_file(write_token_file(tmp_path / "empty.bin", np.zeros(0, dtype=np.int64)))) == 0


# ---------------------------------------------------------------------------------------------
# HF datasets: local files of each format, and the offline error for the hub
# ---------------------------------------------------------------------------------------------

DOCS = ["Once upon a time there was a cat.", "The dog ran fast!", "Lily liked red ball 🙂."]


def test_load_text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    assert load_text_dataset("text", data_files=path, cache_dir=tmp_path / "cache") == DOCS
    assert (
        load_text_dataset("text", data_files=str(path), max_documents=2, cache_dir=tmp_path / "cache")
        == DOCS[:2]
    )


def test_load_paragraphs_json_and_parquet(tmp_path):
    paragraphs = tmp_path / "stories.txt"
    paragraphs.write_text("one line\nsecond line\n\nnext story\n", encoding="utf-8")
    loaded = load_text_dataset("text", data_files=paragraphs, sample_by="paragraph", cache_dir=tmp_path / "c")
    assert [d.strip() for d in loaded] == ["one line\nsecond line", "next story"]

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"story": d, "id": i}) for i, d in enumerate(DOCS)), encoding="utf-8"
    )
    assert load_text_dataset("json", data_files=jsonl, text_column="story", cache_dir=tmp_path / "c") == DOCS
    with pytest.raises(ValueError, match="text_column"):
        load_text_dataset("json", data_files=jsonl, cache_dir=tmp_path / "c")

    parquet = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"text": DOCS}), parquet)
    assert load_text_dataset("parquet", data_files=[parquet], cache_dir=tmp_path / "c") == DOCS


def test_load_errors_and_offline_hub(tmp_path):
    with pytest.raises(ValueError, match="data_files"):
        load_text_dataset("text")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text_dataset("text", data_files=tmp_path / "missing.txt")
    # conftest sets HF_HUB_OFFLINE=1: the hub path must fail fast with one line naming the fix
    with pytest.raises(RuntimeError, match="connect to the internet.*local files"):
        load_text_dataset("roneneldan/TinyStories", cache_dir=tmp_path / "hub-cache")
