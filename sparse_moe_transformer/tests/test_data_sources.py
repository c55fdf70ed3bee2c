"""Data sources: local files through the HF `datasets` code path, plain-text splitting rules, the seeded
hold-out, the synthetic source's two seeds, the flags -> DataSource adapter, and clear errors for bad
sources and files."""

import argparse
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phase3_components.src.synthetic_stories import generate_stories
from sparse_moe_transformer.src import data_sources
from sparse_moe_transformer.src.data_sources import (
    HUB_OFFLINE_ERROR,
    add_data_arguments,
    data_source_from_flags,
    load_documents,
    make_data_source,
    split_plain_text,
)
from sparse_moe_transformer.src.text_tokenizers import EOT

DOCS = [
    "Lily found a red ball in the park.",
    "Tom was sad.\nHe lost his kite.",  # a line break inside a document
    "The café was full of Ünïcode 🤖 and 日本語.",
    "A short one.",
    "The end of the little story came at last, and everyone was happy.",
]


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
        m.setattr(data_sources.os, "access", lambda path, mode: False)
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


# ------------------------------------------------------------------------------- flags -> source


def parse_data_flags(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    return parser.parse_args(list(flags))


def test_flags_become_a_source_with_the_seed_passed_explicitly(tmp_path):
    args = parse_data_flags("--synthetic-stories", "200")
    source = data_source_from_flags(args, seed=7)
    assert source.kind == "synthetic" and source.seed == 7
    assert (source.synthetic_train_stories, source.synthetic_valid_stories) == (200, 100)  # valid >= 100
    assert not hasattr(args, "seed")  # the adapter reads declared data flags only, never a run's seed
    args.seed = 3  # a seed left on the namespace by someone else is ignored: the argument decides
    assert data_source_from_flags(args, seed=7) == source
    with pytest.raises(TypeError, match="seed"):
        data_source_from_flags(args)  # no default: the caller always says which seed
    with pytest.raises(ValueError, match="seed must be an integer, got None"):
        data_source_from_flags(args, seed=None)
    train = tmp_path / "train.txt"
    train.write_text("one document\n\nanother one\n", encoding="utf-8")
    flags = ("--data-files", str(train), "--text-split", "line", "--valid-fraction", "0.5")
    files = data_source_from_flags(parse_data_flags(*flags, "--max-file-gb", "1.5"), seed=4)
    assert (files.kind, files.train_file, files.valid_file) == ("files", str(train), None)
    assert (files.text_split, files.valid_fraction, files.max_file_gb, files.seed) == ("line", 0.5, 1.5, 4)
    assert data_source_from_flags(parse_data_flags(*flags), seed=4).max_file_gb == 2.0  # the default limit
