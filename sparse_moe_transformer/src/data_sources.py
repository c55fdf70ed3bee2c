"""Where the MoE CLI's text comes from: the data sources, their documents, and the data flags.

Sources (the CLI's `--dataset` / `--data-files`)
    synthetic     the project's offline children's-story generator (phase 3): a training split
                  (`seed`) and a validation split (`seed + 1`), so the two never share a stream.
    tinystories   `roneneldan/TinyStories` from the Hugging Face hub (its train and validation
                  splits, column `text`). Offline: "cannot reach the Hugging Face hub: use
                  --data-files or --dataset synthetic".
    files         `--data-files TRAIN[,VALID]`, local files read through HF `datasets` (the same
                  code path as the hub):
                    *.txt / *.text   plain text, cut into documents by `text_split` (below)
                    *.jsonl / *.json JSON lines with a `text` field
                    *.parquet        a `text` column
                  Without VALID, 5% of the documents (round(0.05 * n), chosen by phase 3's
                  `split_documents` with the run's seed, so always the same ones) are held out for
                  validation; a file too small to give one validation document is an error.

Plain-text documents (`text_split`)
    auto            "<|endoftext|>" in the file -> eot; else a blank line in the file -> blank-line;
                    else line
    eot             documents are separated by "<|endoftext|>"
    blank-line      documents are separated by one or more blank lines
    line            every line is a document
    line-paragraphs a single newline ends a document, a blank line is a paragraph break inside one
                    (records with multi-paragraph text, such as TinyStories', written one per line)
    file            the whole file is one document: a raw stream with a single EOT at its end (what
                    nanoGPT's prepare scripts do; use it with a validation file, since one document
                    cannot be split)
    Every document is stripped of surrounding whitespace; empty documents are skipped (and
    counted in the cache's meta.json). Windows line ends are read as "\\n".

Flags
    `add_data_arguments(parser)` adds the data and tokenizer flags (the training CLI, the speedrun
    benchmark and `token_cache.py`'s preparation script share them); `data_source_from_flags(args,
    seed=...)` turns the parsed flags into a DataSource. The seed is not a data flag (the run resolves
    it from its preset, checkpoint or `--seed`), so the caller passes it.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from phase1_foundation.src.validation import check_int, check_number
from phase3_components.src.text_data import load_text_dataset, split_documents
from sparse_moe_transformer.src.text_tokenizers import EOT, TOKENIZER_CHOICES

DATASET_CHOICES = ("synthetic", "tinystories")
TEXT_SPLIT_CHOICES = ("auto", "eot", "blank-line", "line", "line-paragraphs", "file")
TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TINYSTORIES_HUB_NAME = "roneneldan/TinyStories"
HUB_OFFLINE_ERROR = "cannot reach the Hugging Face hub: use --data-files or --dataset synthetic"
DEFAULT_VALID_FRACTION = 0.05
# Every document of a local file is held in memory (as Python strings, then token ids) while it is
# tokenized, so a file is checked against a size limit before it is read (a stat, no bytes read);
# --max-file-gb raises it for a machine with the memory.
DEFAULT_MAX_FILE_GB = 2.0
# A plain-text file is read as one string (a single Arrow row, sample_by="document", so that documents
# can be cut by --text-split), and an Arrow string holds at most 2**31 - 1 bytes: a larger .txt fails
# only after minutes of reading, whatever the limit above.
TEXT_FILE_MAX_BYTES = 2**31 - 1


@dataclass(frozen=True)
class DataSource:
    """Where the text comes from. Build it with `make_data_source` (the CLI flags)."""

    kind: str  # "synthetic" | "tinystories" | "files"
    train_file: str | None = None
    valid_file: str | None = None
    synthetic_train_stories: int = 20_000
    synthetic_valid_stories: int = 1_000
    seed: int = 0
    valid_fraction: float = DEFAULT_VALID_FRACTION
    text_split: str = "auto"
    text_column: str = "text"
    max_file_gb: float = DEFAULT_MAX_FILE_GB  # not in identity(): it decides whether, not what, is read

    def identity(self) -> dict:
        """Everything that determines the documents (the cache key's source part)."""
        if self.kind == "synthetic":
            from phase3_components.src import synthetic_stories

            code = Path(synthetic_stories.__file__).read_bytes()  # a changed generator invalidates the cache
            return {
                "kind": "synthetic",
                "train_stories": self.synthetic_train_stories,
                "valid_stories": self.synthetic_valid_stories,
                "seed": self.seed,
                "generator_sha256": hashlib.sha256(code).hexdigest(),
            }
        if self.kind == "tinystories":
            return {"kind": "tinystories", "hub_name": TINYSTORIES_HUB_NAME}
        files = [_file_identity(p) for p in (self.train_file, self.valid_file) if p is not None]
        return {
            "kind": "files",
            "files": files,
            "text_split": self.text_split,
            "text_column": self.text_column,
            "valid_fraction": None if self.valid_file else self.valid_fraction,
            "seed": None if self.valid_file else self.seed,
        }

    def describe(self) -> str:
        if self.kind == "synthetic":
            n_train, n_valid = self.synthetic_train_stories, self.synthetic_valid_stories
            return f"synthetic stories ({n_train} train / {n_valid} valid, seed {self.seed})"
        if self.kind == "tinystories":
            return f"{TINYSTORIES_HUB_NAME} (Hugging Face hub)"
        valid = self.valid_file or f"{self.valid_fraction:.0%} of the training documents"
        return f"files: train {self.train_file}, valid {valid}"


def make_data_source(
    dataset: str | None = None,
    data_files: str | Sequence[str] | None = None,
    *,
    seed: int = 0,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    text_split: str = "auto",
    text_column: str = "text",
    synthetic_train_stories: int = 20_000,
    synthetic_valid_stories: int = 1_000,
    max_file_gb: float = DEFAULT_MAX_FILE_GB,
) -> DataSource:
    """The CLI's `--dataset NAME` or `--data-files TRAIN[,VALID]` -> a validated DataSource.

    With neither, the source is `synthetic`. Giving both is an error (one source per run).
    """
    if text_split not in TEXT_SPLIT_CHOICES:
        raise ValueError(
            f"unknown text split rule {text_split!r}: choose one of {', '.join(TEXT_SPLIT_CHOICES)}"
        )
    if not (isinstance(valid_fraction, float | int) and 0.0 < valid_fraction < 1.0):
        raise ValueError(
            f"valid_fraction must be between 0 and 1 (exclusive), got {valid_fraction!r}: e.g. 0.05"
        )
    for name, n in (
        ("synthetic_train_stories", synthetic_train_stories),
        ("synthetic_valid_stories", synthetic_valid_stories),
    ):
        check_int(name, n, minimum=1)
    check_number("--max-file-gb", max_file_gb, above=0)
    check_int("seed", seed)  # it decides the synthetic stories and the held-out documents: a value, not None
    common = dict(
        seed=seed, valid_fraction=float(valid_fraction), text_split=text_split, text_column=text_column,
        max_file_gb=float(max_file_gb),
    )  # fmt: skip
    if data_files is not None:
        if dataset is not None:
            raise ValueError(f"use either --dataset ({dataset}) or --data-files, not both")
        train_file, valid_file = parse_data_files(data_files, max_file_gb)
        return DataSource("files", train_file=train_file, valid_file=valid_file, **common)
    dataset = "synthetic" if dataset is None else dataset
    if dataset not in DATASET_CHOICES:
        raise ValueError(
            f"unknown dataset {dataset!r}: choose one of {', '.join(DATASET_CHOICES)}, "
            "or pass local files with --data-files TRAIN[,VALID]"
        )
    return DataSource(
        dataset,
        synthetic_train_stories=synthetic_train_stories,
        synthetic_valid_stories=synthetic_valid_stories,
        **common,
    )


def parse_data_files(
    data_files: str | Sequence[str], max_file_gb: float = DEFAULT_MAX_FILE_GB
) -> tuple[str, str | None]:
    """'train.txt,valid.txt' (or a list) -> (train, valid or None), after checking both files."""
    parts = data_files.split(",") if isinstance(data_files, str) else list(data_files)
    parts = [p.strip() for p in parts]
    if not 1 <= len(parts) <= 2 or not all(parts):
        raise ValueError(f"--data-files takes TRAIN or TRAIN,VALID (one or two paths), got {data_files!r}")
    for p in parts:
        check_data_file(p, max_file_gb)
    return parts[0], (parts[1] if len(parts) == 2 else None)


def check_data_file(path: str, max_file_gb: float = DEFAULT_MAX_FILE_GB) -> str:
    """The file exists, is a regular non-empty readable file with a supported suffix, of a size that can be
    read (check_data_file_size); returns its format."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {path} (check the path given to --data-files)")
    if not p.is_file():
        raise ValueError(f"data file is not a regular file: {path} (pass a file, not a folder)")
    suffix = p.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise ValueError(
            f"unsupported data file type {suffix or '(none)'!r} for {path}: use one of "
            f"{', '.join(sorted(TEXT_SUFFIXES))} (plain text, JSON lines or parquet with a 'text' column)"
        )
    if p.stat().st_size == 0:
        raise ValueError(f"data file is empty: {path} (it needs at least one document)")
    if not os.access(p, os.R_OK):
        raise PermissionError(f"cannot read data file {path}: permission denied (fix its permissions)")
    check_data_file_size(path, TEXT_SUFFIXES[suffix], max_file_gb)
    return TEXT_SUFFIXES[suffix]


def check_data_file_size(path: str, fmt: str, max_file_gb: float) -> None:
    """A clear error for a file too large to read, from its size alone (before any byte is read)."""
    size = Path(path).stat().st_size
    if fmt == "text" and size > TEXT_FILE_MAX_BYTES:
        raise ValueError(
            f"data file {path} is {size / 2**30:.2f} GiB: a plain-text file is read as one string, at most "
            f'2 GiB; convert it to .jsonl with one {{"text": ...}} object per line (one per document), which '
            "is read in pieces"
        )
    if size > max_file_gb * 2**30:
        raise ValueError(
            f"data file {path} is {size / 2**30:.2f} GiB, above the limit of {max_file_gb:g} GiB: all its "
            "documents are held in memory while they are tokenized; pass --max-file-gb "
            f"{math.ceil(size / 2**30)} if this machine has the memory, or use a smaller file"
        )


def _file_identity(path: str) -> dict:
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ----------------------------------------------------------------------------------------------
# Loading documents
# ----------------------------------------------------------------------------------------------


def split_plain_text(text: str, rule: str = "auto") -> list[str]:
    """Cut a plain-text file into documents by `rule` (see the module docstring)."""
    if rule == "auto":
        if EOT in text:
            rule = "eot"
        elif re.search(r"\n[ \t]*\n", text):
            rule = "blank-line"
        else:
            rule = "line"
    if rule == "eot":
        parts = text.split(EOT)
    elif rule == "blank-line":
        parts = re.split(r"\n[ \t]*\n", text)
    elif rule == "line":
        parts = text.split("\n")
    elif rule == "file":
        parts = [text]
    elif rule == "line-paragraphs":
        parts = re.split(r"(?<!\n)\n(?!\n)", text)  # a lone newline; "\n\n" stays inside the document
    else:
        raise ValueError(f"unknown text split rule {rule!r}: choose one of {', '.join(TEXT_SPLIT_CHOICES)}")
    return [p.strip() for p in parts]


def clean_documents(docs: Iterable, where: str) -> tuple[list[str], int]:
    """Strip documents and drop the empty ones; returns (documents, number dropped)."""
    out, empty = [], 0
    for i, d in enumerate(docs):
        if not isinstance(d, str):
            raise ValueError(
                f"document {i} of {where} is {type(d).__name__}, not text: every text value must be a string"
            )
        d = d.strip()
        if d:
            out.append(d)
        else:
            empty += 1
    return out, empty


def load_file_documents(
    path: str, source: DataSource, hf_cache_dir: str | None = None
) -> tuple[list[str], int]:
    """Read one local file through HF `datasets` (phase 3's `load_text_dataset`).

    Returns (documents, number of empty documents skipped).
    """
    fmt = check_data_file(path, source.max_file_gb)
    try:
        if fmt == "text":
            # one row holding the whole file (sample_by="document"), cut by the documented rule
            whole = load_text_dataset("text", data_files=path, sample_by="document", cache_dir=hf_cache_dir)
            texts = [d for text in whole for d in split_plain_text(text, source.text_split)]
        else:
            texts = load_text_dataset(
                fmt, data_files=path, text_column=source.text_column, cache_dir=hf_cache_dir
            )
    except ValueError as err:
        if "not in the dataset" in str(err):  # the text column is missing
            raise ValueError(
                f"{path} has no {source.text_column!r} column ({err}): rename the column holding the "
                f"documents to {source.text_column!r} or pass --text-column"
            ) from err
        raise ValueError(f"cannot read {path} as {fmt}: {_root_cause(err)}") from err
    except Exception as err:  # HF wraps parse errors (bad UTF-8, bad JSON) in DatasetGenerationError
        raise ValueError(
            f"cannot read {path} as {fmt}: {_root_cause(err)} "
            "(text files must be UTF-8; JSON lines need one object per line)"
        ) from err
    docs, empty = clean_documents(texts, path)
    if not docs:
        raise ValueError(f"data file has no documents: {path} holds only whitespace or empty texts")
    return docs, empty


def _root_cause(err: BaseException) -> str:
    """The innermost exception of a chain, as 'Type: message' (first 200 characters)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {str(err)[:200]}"


def holdout_split(docs: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out `fraction` of the documents for validation (phase 3's seeded `split_documents`)."""
    try:
        return split_documents(docs, val_fraction=fraction, seed=seed)
    except ValueError as err:
        raise ValueError(
            f"cannot hold out a validation split: {err}; or pass a validation file (--data-files TRAIN,VALID)"
        ) from err


def load_hub_tinystories(hf_cache_dir: str | None = None) -> tuple[list[str], list[str]]:
    """TinyStories' train and validation splits from the hub (column `text`)."""
    try:
        train = load_text_dataset(TINYSTORIES_HUB_NAME, split="train", cache_dir=hf_cache_dir)
        valid = load_text_dataset(TINYSTORIES_HUB_NAME, split="validation", cache_dir=hf_cache_dir)
    except Exception as err:
        if _is_offline_error(err):
            raise RuntimeError(HUB_OFFLINE_ERROR) from err
        raise
    return train, valid


def _is_offline_error(err: BaseException) -> bool:
    """True when `err` (or what caused it) means the hub could not be reached."""
    offline_names = (
        "OfflineModeIsEnabled",
        "LocalEntryNotFoundError",
        "ConnectTimeout",
        "NameResolutionError",
    )
    while err is not None:
        if isinstance(err, ConnectionError | TimeoutError) or type(err).__name__ in offline_names:
            return True
        if isinstance(err, RuntimeError) and "from the Hugging Face hub (offline?)" in str(err):
            return True  # phase 3's load_text_dataset message (raised `from None`)
        err = err.__cause__ or err.__context__
    return False


def load_documents(source: DataSource, hf_cache_dir: str | None = None) -> dict:
    """Load the train and validation documents of `source`.

    Returns {"train": [...], "valid": [...], "empty_skipped": int}.
    """
    if source.kind == "synthetic":
        from phase3_components.src.synthetic_stories import generate_stories

        train = generate_stories(source.synthetic_train_stories, seed=source.seed)
        valid = generate_stories(source.synthetic_valid_stories, seed=source.seed + 1)
        return {"train": train, "valid": valid, "empty_skipped": 0}
    if source.kind == "tinystories":
        train_raw, valid_raw = load_hub_tinystories(hf_cache_dir)
        train, e1 = clean_documents(train_raw, TINYSTORIES_HUB_NAME + " train")
        valid, e2 = clean_documents(valid_raw, TINYSTORIES_HUB_NAME + " validation")
        return {"train": train, "valid": valid, "empty_skipped": e1 + e2}
    if source.kind == "files":
        train, e1 = load_file_documents(source.train_file, source, hf_cache_dir)
        if source.valid_file is None:
            train, valid = holdout_split(train, source.valid_fraction, source.seed)
            e2 = 0
        else:
            valid, e2 = load_file_documents(source.valid_file, source, hf_cache_dir)
        return {"train": train, "valid": valid, "empty_skipped": e1 + e2}
    raise ValueError(f"unknown data source kind {source.kind!r}: build sources with make_data_source")


# ----------------------------------------------------------------------------------------------
# Command-line flags (the training CLI, the speedrun benchmark and token_cache.py share them)
# ----------------------------------------------------------------------------------------------


def add_data_arguments(parser) -> None:
    """Add the data and tokenizer flags to an argparse parser."""
    g = parser.add_argument_group("data")
    g.add_argument(
        "--dataset", default=None, help=f"one of {', '.join(DATASET_CHOICES)} (default: synthetic)"
    )
    g.add_argument(
        "--data-files",
        default=None,
        metavar="TRAIN[,VALID]",
        help="local .txt/.jsonl/.parquet files instead of --dataset; without VALID, 5%% is held out",
    )
    g.add_argument(
        "--text-split",
        default="auto",
        choices=TEXT_SPLIT_CHOICES,
        help="how plain-text files are cut into documents (default: auto)",
    )
    g.add_argument(
        "--text-column", default="text", help="the column holding the text in .jsonl/.parquet files"
    )
    g.add_argument(
        "--valid-fraction",
        type=float,
        default=DEFAULT_VALID_FRACTION,
        help="fraction of documents held out when no validation file is given",
    )
    g.add_argument(
        "--synthetic-stories",
        type=int,
        default=20_000,
        help="number of synthetic training stories (validation: 5%% of it, at least 100)",
    )
    g.add_argument(
        "--tokenizer", default=None, choices=TOKENIZER_CHOICES,
        help="gpt2 (tiktoken) or bpe (trained; the default; a resumed run keeps its checkpoint's)",
    )  # fmt: skip
    g.add_argument(
        "--vocab-size", type=int, default=None, help="ids of the trained bpe tokenizer (default 4096)"
    )
    g.add_argument(
        "--cache-dir", default=None,
        help="token cache folder (default: $LLM_FOUNDATION_CACHE/data, or ~/.cache/llm-foundation/data)",
    )  # fmt: skip
    g.add_argument(
        "--max-file-gb", type=float, default=None,
        help=f"largest local data file read, in GiB (default {DEFAULT_MAX_FILE_GB:g}): its documents are "
        "held in memory while tokenized",
    )  # fmt: skip


def data_source_from_flags(args, *, seed: int) -> DataSource:
    """The DataSource described by the flags `add_data_arguments` declares (and only those).

    `seed` is the run's seed (the synthetic-story seed and the hold-out seed): the run resolves it
    from its preset, checkpoint or `--seed`, so the caller passes the resolved value.
    """
    n_train = args.synthetic_stories
    n_valid = max(100, n_train // 20) if isinstance(n_train, int) and n_train > 0 else n_train
    return make_data_source(
        args.dataset,
        args.data_files,
        seed=seed,
        valid_fraction=args.valid_fraction,
        text_split=args.text_split,
        text_column=args.text_column,
        synthetic_train_stories=n_train,
        synthetic_valid_stories=n_valid,
        max_file_gb=args.max_file_gb or DEFAULT_MAX_FILE_GB,
    )
