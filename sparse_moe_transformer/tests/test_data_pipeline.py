"""Tests for the MoE CLI's data layer: sources, packing without padding, the cache, the sampler."""

import json
import os

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from phase3_components.src.synthetic_stories import generate_stories
from sparse_moe_transformer.src import data_pipeline
from sparse_moe_transformer.src.data_pipeline import (
    HUB_OFFLINE_ERROR,
    BlockBatchSampler,
    blocks_to_batch,
    iter_eval_batches,
    load_documents,
    make_data_source,
    prepare_data,
    split_plain_text,
    token_dtype,
)
from sparse_moe_transformer.src.text_tokenizers import EOT, TextTokenizer, train_bpe_tokenizer

DOCS = [
    "Lily found a red ball in the park.",
    "Tom was sad.\nHe lost his kite.",  # a line break inside a document
    "The café was full of Ünïcode 🤖 and 日本語.",
    "A short one.",
    "The end of the little story came at last, and everyone was happy.",
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(generate_stories(300, seed=0) + DOCS, vocab_size=400)


@pytest.fixture
def hf_calls(monkeypatch):
    """Record every datasets.load_dataset call (and still run the real one)."""
    calls = []
    real = datasets.load_dataset

    def spy(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    return calls


def files_source(tmp_path, *files, **kwargs):
    return make_data_source(data_files=",".join(str(f) for f in files), **kwargs)


def write_jsonl(path, texts, key="text"):
    path.write_text(
        "".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8"
    )
    return path


def stream_documents(tokens, tok):
    """Decode a packed stream back into its documents (cut at every EOT)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    assert tokens[-1] == tok.eot_id  # every document, the last one too, is followed by EOT
    cuts = np.flatnonzero(tokens == tok.eot_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(tokens[s:e].tolist()) for s, e in zip(starts, cuts)]


# ------------------------------------------------------------------------------- plain-text rules


def test_plain_text_split_rules():
    assert split_plain_text(f"a b{EOT}\nc\n\nd{EOT}\n") == ["a b", "c\n\nd", ""]  # auto -> eot
    assert split_plain_text("a\nb\n\n\nc d\n  \ne\n") == ["a\nb", "c d", "e"]  # auto -> blank lines
    assert split_plain_text("one\ntwo\n three \n") == ["one", "two", "three", ""]  # auto -> lines
    assert split_plain_text("a\n\nb", "line") == ["a", "", "b"]
    # a TinyStories dump: one story per line, paragraphs inside separated by a blank line
    tiny = "Story one.\n\nStill one.\nStory two.\n\nStill two.\n\nAnd two.\nStory three.\n"
    assert split_plain_text(tiny, "line-paragraphs") == [
        "Story one.\n\nStill one.",
        "Story two.\n\nStill two.\n\nAnd two.",
        "Story three.",
        "",
    ]
    assert split_plain_text(" a\n\nb\nc\n", "file") == ["a\n\nb\nc"]
    with pytest.raises(ValueError, match="unknown text split rule 'words': choose one of auto, eot"):
        split_plain_text("x", "words")


# --------------------------------------------------------------------------------- local formats


ONE_LINE_DOCS = [d.replace("\n", " ") for d in DOCS]
PARAGRAPH_DOCS = [d.replace("\n", "\n\n") for d in DOCS]


@pytest.mark.parametrize(
    "content, rule, expected",
    [
        ("\n".join(ONE_LINE_DOCS) + "\n", "auto", ONE_LINE_DOCS),  # one document per line
        ("\n\n".join(DOCS) + "\n", "auto", DOCS),  # blank-line separated
        (EOT.join(DOCS) + EOT + "\n", "auto", DOCS),  # <|endoftext|> separated
        ("\n".join(PARAGRAPH_DOCS), "line-paragraphs", PARAGRAPH_DOCS),
        ("\n\n".join(DOCS), "file", ["\n\n".join(DOCS)]),
    ],
    ids=["lines", "blank-lines", "eot", "line-paragraphs", "file"],
)
def test_text_files_load_through_datasets(tmp_path, hf_calls, content, rule, expected):
    train = tmp_path / "train.txt"
    train.write_text(content, encoding="utf-8")
    valid = tmp_path / "valid.txt"
    valid.write_text(content, encoding="utf-8")
    docs = load_documents(
        files_source(tmp_path, train, valid, text_split=rule), hf_cache_dir=str(tmp_path / "hf")
    )
    assert docs["train"] == expected and docs["valid"] == expected
    assert hf_calls == ["text", "text"]  # the HF datasets code path, as for the hub


def test_jsonl_and_parquet_load_through_datasets(tmp_path, hf_calls):
    train = write_jsonl(tmp_path / "train.jsonl", DOCS + ["   ", ""])  # two empty documents
    valid = tmp_path / "valid.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": DOCS[:2]}), valid)
    docs = load_documents(files_source(tmp_path, train, valid), hf_cache_dir=str(tmp_path / "hf"))
    assert docs["train"] == DOCS and docs["valid"] == DOCS[:2]
    assert docs["empty_skipped"] == 2
    assert hf_calls == ["json", "parquet"]
    # another column name
    other = write_jsonl(tmp_path / "story.jsonl", DOCS, key="story")
    docs = load_documents(
        files_source(tmp_path, other, text_column="story", valid_fraction=0.2),
        hf_cache_dir=str(tmp_path / "hf"),
    )
    assert sorted(docs["train"] + docs["valid"]) == sorted(DOCS)


def test_holdout_without_validation_file_is_deterministic(tmp_path):
    lines = [f"Document number {i} is here." for i in range(200)]
    train = tmp_path / "corpus.txt"
    train.write_text("\n".join(lines), encoding="utf-8")
    hf = str(tmp_path / "hf")
    a = load_documents(files_source(tmp_path, train, seed=3), hf_cache_dir=hf)
    b = load_documents(files_source(tmp_path, train, seed=3), hf_cache_dir=hf)
    assert a == b
    assert len(a["valid"]) == 10 and len(a["train"]) == 190  # the documented 5%
    assert sorted(a["train"] + a["valid"]) == sorted(lines) and not set(a["train"]) & set(a["valid"])
    c = load_documents(files_source(tmp_path, train, seed=4), hf_cache_dir=hf)
    assert c["valid"] != a["valid"]


def test_synthetic_source_uses_two_seeds():
    docs = load_documents(
        make_data_source("synthetic", synthetic_train_stories=30, synthetic_valid_stories=5)
    )
    assert docs["train"] == generate_stories(30, seed=0)
    assert docs["valid"] == generate_stories(5, seed=1)


# ----------------------------------------------------------------------------- packing and cache


def test_packing_puts_eot_between_documents(tmp_path, tok):
    train = tmp_path / "train.txt"
    train.write_text("\n\n".join(DOCS), encoding="utf-8")
    valid = write_jsonl(tmp_path / "valid.jsonl", DOCS[::-1])
    data = prepare_data(
        files_source(tmp_path, train, valid),
        tok,
        cache_dir=tmp_path / "cache",
        hf_cache_dir=str(tmp_path / "hf"),
        progress=False,
    )
    assert data.tokenizer is tok
    # reference, computed document by document: enc(d1) EOT enc(d2) EOT ...
    reference = []
    for d in DOCS:
        reference += tok.encode(d) + [tok.eot_id]
    assert data.train_tokens.dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(data.train_tokens), reference)
    assert stream_documents(data.train_tokens, tok) == DOCS
    assert stream_documents(data.valid_tokens, tok) == DOCS[::-1]
    assert int((np.asarray(data.train_tokens) == tok.eot_id).sum()) == len(DOCS)
    assert data.info["train_documents"] == 5 and data.info["train_tokens"] == len(reference)


def test_no_padding_every_label_is_the_real_next_token(tok, tmp_path):
    data = prepare_data(
        make_data_source("synthetic", synthetic_train_stories=40, synthetic_valid_stories=5),
        tok,
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    tokens = np.asarray(data.train_tokens, dtype=np.int64)
    T, B = 32, 4
    sampler = BlockBatchSampler(len(tokens), T, B, seed=0)
    label_positions = []
    for _ in range(len(sampler)):  # one epoch
        starts = next(sampler)
        x, y = blocks_to_batch(data.train_tokens, starts, T)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
        for b, s in enumerate(starts):
            # x is the stream, y is the stream one step later: real tokens, real next tokens
            np.testing.assert_array_equal(x[b].numpy(), tokens[s : s + T])
            np.testing.assert_array_equal(y[b].numpy(), tokens[s + 1 : s + T + 1])
            label_positions.extend(range(s + 1, s + T + 1))
    # no label position repeats, and the epoch covers all but the leftover windows
    assert len(label_positions) == len(set(label_positions)) == len(sampler) * B * T
    assert len(sampler) * B * T > 0.9 * (len(tokens) - 1)
    # the stream has no filler: it is exactly the documents and one EOT per document
    assert stream_documents(tokens, tok) == generate_stories(40, seed=0)


def test_token_cache_is_reused_and_invalidated(tmp_path, tok, monkeypatch):
    train = tmp_path / "train.txt"
    train.write_text("\n".join(d.replace("\n", " ") for d in DOCS * 4), encoding="utf-8")
    source = files_source(tmp_path, train)
    cache = tmp_path / "cache"
    first = prepare_data(source, tok, cache_dir=cache, progress=False, hf_cache_dir=str(tmp_path / "hf"))
    assert not first.reused
    token_file = first.cache_path / "train.bin"
    mtime = token_file.stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    with monkeypatch.context() as m:
        m.setattr(data_pipeline, "load_documents", must_not_run)
        m.setattr(type(tok), "encode_batch", must_not_run)
        second = prepare_data(source, tok, cache_dir=cache, progress=False, hf_cache_dir=str(tmp_path / "hf"))
    assert second.reused and second.cache_path == first.cache_path
    assert token_file.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second.train_tokens, first.train_tokens)
    assert isinstance(second.train_tokens, np.memmap)
    # a changed file -> a new key -> tokenized again
    with open(train, "a", encoding="utf-8") as f:
        f.write("\nA new line at the end.")
    third = prepare_data(source, tok, cache_dir=cache, progress=False, hf_cache_dir=str(tmp_path / "hf"))
    assert not third.reused and third.cache_path != first.cache_path
    # no temporary folders or scratch files are left behind
    assert all(".tmp" not in p.name and p.suffix != ".scratch" for p in cache.rglob("*"))


def test_bpe_tokenizer_is_trained_once_and_cached(tmp_path, monkeypatch):
    source = make_data_source("synthetic", synthetic_train_stories=60, synthetic_valid_stories=5)
    first = prepare_data(source, "bpe", vocab_size=300, cache_dir=tmp_path, progress=False)
    assert first.tokenizer.name == "bpe" and first.tokenizer.vocab_size == 300
    assert first.train_tokens.dtype == token_dtype(300) == np.uint16

    def no_training(*args, **kwargs):
        raise AssertionError("the cached bpe tokenizer should have been reused")

    monkeypatch.setattr(data_pipeline, "build_tokenizer", no_training)
    monkeypatch.setattr(data_pipeline, "load_documents", no_training)
    second = prepare_data(source, "bpe", vocab_size=300, cache_dir=tmp_path, progress=False)
    assert second.reused and second.tokenizer.to_state() == first.tokenizer.to_state()


def test_token_dtype():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


# ---------------------------------------------------------------------------------------- sampler


def test_sampler_is_deterministic_and_permutes_each_epoch():
    a = BlockBatchSampler(10_001, 100, 4, seed=1)
    b = BlockBatchSampler(10_001, 100, 4, seed=1)
    c = BlockBatchSampler(10_001, 100, 4, seed=2)
    assert len(a) == a.batches_in_epoch(0) == 25  # 100 windows / 4
    epoch_a = [next(a) for _ in range(25)]
    epoch_b = [next(b) for _ in range(25)]
    epoch_c = [next(c) for _ in range(25)]
    assert all((x == y).all() for x, y in zip(epoch_a, epoch_b))
    assert not all((x == y).all() for x, y in zip(epoch_a, epoch_c))
    starts = np.concatenate(epoch_a)
    assert sorted(starts.tolist()) == list(range(0, 10_000, 100))  # every window once per epoch
    # later epochs shift the whole window grid by an offset o_e in [0, block_size) drawn from
    # (seed, epoch): the same tokens, in new windows, in a new order
    offsets = set()
    for epoch in range(1, 6):
        n_batches = a.batches_in_epoch(epoch)
        batches = [next(a) for _ in range(n_batches)]
        assert a.epoch == epoch
        grid = np.sort(np.concatenate(batches))
        offset = int(grid[0]) % 100
        offsets.add(offset)
        assert 0 <= offset < 100 and ((grid - offset) % 100 == 0).all()  # one shifted grid
        assert (np.diff(grid) > 0).all()  # no window twice
        assert grid[-1] + 100 + 1 <= 10_001  # the last window fits in the stream
        assert grid.size >= 96  # at most one window lost to the shift (and 3 to the batch size)
    assert len(offsets) > 1  # the grid really moves between epochs


def test_sampler_resumes_with_exactly_the_next_batch(tmp_path):
    uninterrupted = BlockBatchSampler(5_000, 16, 8, seed=7)
    expected = [next(uninterrupted) for _ in range(100)]  # crosses two epoch boundaries (39 per epoch)
    first = BlockBatchSampler(5_000, 16, 8, seed=7)
    for _ in range(57):
        next(first)
    torch.save({"sampler": first.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)["sampler"]
    resumed = BlockBatchSampler(5_000, 16, 8, seed=7)
    resumed.load_state_dict(state)
    for k in range(57, 100):
        np.testing.assert_array_equal(next(resumed), expected[k])


def test_rank_shards_equal_one_rank_with_the_global_batch():
    single = BlockBatchSampler(20_000, 32, 8, seed=3)
    ranks = [BlockBatchSampler(20_000, 32, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1])
    for _ in range(2 * len(single) + 5):  # over epoch boundaries
        both = np.concatenate([next(ranks[0]), next(ranks[1])])
        np.testing.assert_array_equal(both, next(single))
    # a 2-rank state resumes a 1-rank run with the same global batch
    resumed = BlockBatchSampler(20_000, 32, 8, seed=3)
    resumed.load_state_dict(ranks[0].state_dict())
    np.testing.assert_array_equal(next(resumed), np.concatenate([next(ranks[0]), next(ranks[1])]))


def test_eval_batches_fixed_order_and_sharded():
    tokens = np.arange(1_000, dtype=np.uint16)
    batches = list(iter_eval_batches(tokens, 10, 8))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (99, 10) and [len(b[0]) for b in batches][-1] == 3  # 99 = 12 * 8 + 3
    np.testing.assert_array_equal(x[:, 0].numpy(), np.arange(0, 990, 10))
    assert torch.equal(y, x + 1)
    assert len(list(iter_eval_batches(tokens, 10, 8, max_batches=2))) == 2
    # two ranks: global batch i = rank 0's 4 windows then rank 1's; the 3 windows of the last
    # global batch all go to rank 0, so rank 1 has one batch less
    shards = [list(iter_eval_batches(tokens, 10, 4, rank=r, world_size=2)) for r in range(2)]
    assert (len(shards[0]), len(shards[1])) == (13, 12)
    merged = torch.cat([torch.cat([a[0], b[0]]) for a, b in zip(shards[0], shards[1])] + [shards[0][-1][0]])
    assert torch.equal(merged, x)


# ------------------------------------------------------------------------------------ bad inputs


def test_hub_offline_gives_one_line_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'roneneldan/TinyStories' on the Hub (LocalEntryNotFoundError)")

    source = make_data_source("tinystories")
    with monkeypatch.context() as m:
        m.setattr(datasets, "load_dataset", offline)
        with pytest.raises(RuntimeError) as info:
            load_documents(source)
    assert str(info.value) == HUB_OFFLINE_ERROR
    # the real call, with the hub marked offline (as conftest does), fails fast with the same line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as info:
        load_documents(source)
    assert str(info.value) == HUB_OFFLINE_ERROR


def test_bad_sources_give_clear_errors(tmp_path, monkeypatch):
    good = tmp_path / "good.txt"
    good.write_text("one document\nanother one\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="data file not found: .*missing.txt"):
        make_data_source(data_files=str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="data file is empty"):
        make_data_source(data_files=f"{good},{empty}")
    with pytest.raises(ValueError, match="not a regular file"):
        make_data_source(data_files=str(tmp_path))
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unsupported data file type '.csv'.*\.jsonl"):
        make_data_source(data_files=str(csv))
    with pytest.raises(ValueError, match="TRAIN or TRAIN,VALID"):
        make_data_source(data_files=f"{good},{good},{good}")
    with pytest.raises(ValueError, match="unknown dataset 'wikitext': choose one of synthetic, tinystories"):
        make_data_source("wikitext")
    with pytest.raises(ValueError, match="not both"):
        make_data_source("synthetic", data_files=str(good))
    with pytest.raises(ValueError, match="unknown text split rule"):
        make_data_source(data_files=str(good), text_split="sentences")
    with pytest.raises(ValueError, match="valid_fraction must be between 0 and 1"):
        make_data_source(data_files=str(good), valid_fraction=1.5)
    with monkeypatch.context() as m:
        m.setattr(data_pipeline.os, "access", lambda path, mode: False)
        with pytest.raises(PermissionError, match="cannot read data file .*permission denied"):
            make_data_source(data_files=str(good))


def test_bad_file_contents_give_clear_errors(tmp_path):
    hf = str(tmp_path / "hf")
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="cannot read .*latin1.txt as text.*UTF-8"):
        load_documents(make_data_source(data_files=f"{binary},{binary}"), hf_cache_dir=hf)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": unquoted}\n')
    with pytest.raises(ValueError, match="cannot read .*broken.jsonl as json"):
        load_documents(make_data_source(data_files=f"{broken},{broken}"), hf_cache_dir=hf)
    no_text = write_jsonl(tmp_path / "story.jsonl", DOCS, key="story")
    with pytest.raises(ValueError, match="has no 'text' column .*rename the column"):
        load_documents(make_data_source(data_files=f"{no_text},{no_text}"), hf_cache_dir=hf)
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"body": DOCS}), parquet)
    with pytest.raises(ValueError, match="has no 'text' column"):
        load_documents(make_data_source(data_files=f"{parquet},{parquet}"), hf_cache_dir=hf)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(ValueError, match="has no documents"):
        load_documents(make_data_source(data_files=str(blank)), hf_cache_dir=hf)
    few = tmp_path / "few.txt"
    few.write_text("one\ntwo\nthree\n")
    with pytest.raises(ValueError, match="cannot hold out a validation split.*--data-files TRAIN,VALID"):
        load_documents(make_data_source(data_files=str(few)), hf_cache_dir=hf)


def test_short_corpus_and_bad_sampler_arguments():
    with pytest.raises(ValueError, match="shorter than one block of block_size \\+ 1 = 257 tokens"):
        BlockBatchSampler(200, 256, 1)
    with pytest.raises(ValueError, match="fewer than one global batch .*smaller"):
        BlockBatchSampler(1_000, 100, 8, world_size=2)
    with pytest.raises(ValueError, match="rank must be an integer >= 0 and <= 1"):
        BlockBatchSampler(10_000, 10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        BlockBatchSampler(10_000, 10, 0)
    with pytest.raises(ValueError, match="validation split .* shorter than one block"):
        next(iter_eval_batches(np.zeros(50, dtype=np.uint16), 64, 2))
    sampler = BlockBatchSampler(10_000, 10, 2, seed=0)
    other = BlockBatchSampler(10_000, 20, 2, seed=0)
    with pytest.raises(ValueError, match="block_size was 20 in the checkpoint and is 10 now"):
        sampler.load_state_dict(other.state_dict())


class LyingTokenizer(TextTokenizer):
    """Claims 10 ids but produces id 70000: the pipeline must refuse, not wrap around."""

    name = "liar"
    vocab_size = 10
    eot_id = 0

    def encode(self, text):
        return [70_000]

    def encode_batch(self, texts):
        return [[70_000] for _ in texts]

    def _decode(self, ids):
        return ""

    def to_state(self):
        return {"name": "liar"}


def test_token_id_out_of_range_is_an_error(tmp_path):
    source = make_data_source("synthetic", synthetic_train_stories=3, synthetic_valid_stories=1)
    with pytest.raises(ValueError, match="token id 70000 is out of range for vocab_size 10 / uint16"):
        prepare_data(source, LyingTokenizer(), cache_dir=tmp_path, progress=False)
    assert not os.listdir(tmp_path)  # the failed attempt left nothing behind
    with pytest.raises(ValueError, match="unknown tokenizer 'sentencepiece'"):
        prepare_data(source, "sentencepiece", cache_dir=tmp_path)
