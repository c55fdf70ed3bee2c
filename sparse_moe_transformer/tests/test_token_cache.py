"""The token cache: documents packed with EOT and no padding, the cache reused (and rebuilt when the
source changes), the bpe tokenizer trained once, out-of-range ids refused, and a cache folder that is
a file or holds abandoned half-built folders."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from phase3_components.src.synthetic_stories import generate_stories
from phase3_components.src.text_data import token_dtype
from sparse_moe_transformer.src import cli, token_cache
from sparse_moe_transformer.src.data_sources import make_data_source
from sparse_moe_transformer.src.text_tokenizers import TextTokenizer, train_bpe_tokenizer
from sparse_moe_transformer.src.token_cache import prepare_data

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
        m.setattr(token_cache, "load_documents", must_not_run)
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

    monkeypatch.setattr(token_cache, "build_tokenizer", no_training)
    monkeypatch.setattr(token_cache, "load_documents", no_training)
    second = prepare_data(source, "bpe", vocab_size=300, cache_dir=tmp_path, progress=False)
    assert second.reused and second.tokenizer.to_state() == first.tokenizer.to_state()


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


# ------------------------------------------------------------------ the cache folder, through the CLI

TINY = ["--mode", "train", "--preset", "tiny", "--dataset", "synthetic", "--synthetic-stories", "200"]
TINY += ["--tokenizer", "bpe", "--vocab-size", "300", "--batch-size", "4", "--warmup-steps", "1"]
TINY += ["--sample-tokens", "0", "--eval-batches", "2", "--log-interval", "1"]


def train_argv(out_dir, cache_dir, *extra, steps=6):
    paths = ["--cache-dir", cache_dir, "--out-dir", out_dir]
    return [str(a) for a in [*TINY, "--max-steps", steps, *paths, *extra]]


def test_a_cache_dir_that_is_a_file_and_abandoned_staging_folders(tmp_path, capsys):
    a_file = tmp_path / "cache_file"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as info:
        cli.main(train_argv(tmp_path / "run", a_file))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "--cache-dir" in err and "is a file" in err

    # a tokenization killed with -9 leaves NAME.tmp-PID-xxxx; the next run removes it when PID is gone
    cache_dir = tmp_path / "cache"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    abandoned = cache_dir / f"tokens-0123.tmp-{int(dead.stdout)}-abc"
    alive = cache_dir / f"tokens-4567.tmp-{os.getpid()}-abc"  # this process is alive: kept
    for folder in (abandoned, alive):
        folder.mkdir(parents=True)
        (folder / "train.bin").write_bytes(b"\0" * 64)
    cli.main(train_argv(tmp_path / "run2", cache_dir, "--eval-interval", 0, steps=1))
    assert not abandoned.exists() and alive.exists()


def test_the_preparation_script_fills_the_cache_the_training_run_reads(tmp_path, capsys):
    flags = ["--synthetic-stories", "40", "--vocab-size", "300", "--cache-dir", str(tmp_path), "--seed", "2"]
    token_cache.main(flags)
    first = capsys.readouterr().out
    source = make_data_source("synthetic", seed=2, synthetic_train_stories=40, synthetic_valid_stories=100)
    data = prepare_data(source, "bpe", vocab_size=300, cache_dir=tmp_path, progress=False)
    assert data.reused and f"cache       {data.cache_path} (written, uint16)" in first
    assert "synthetic stories (40 train / 100 valid, seed 2)" in first
    assert f"train       40 documents, {len(data.train_tokens):,} tokens" in first
    token_cache.main(flags)
    assert "(reused, uint16)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        token_cache.main(["--vocab-size", "100", "--cache-dir", str(tmp_path)])
    assert info.value.code == 2 and "must be an integer >= 257" in capsys.readouterr().err
