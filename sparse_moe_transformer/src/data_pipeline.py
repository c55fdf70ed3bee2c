"""Data for the Sparse MoE training CLI: load text, tokenize once, cache, pack, and sample batches.

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

Packing (no padding anywhere)
    Each split is tokenized once, in batches (`encode_batch`, multi-threaded in Rust), and packed
    into one stream  doc_1 EOT doc_2 EOT ... doc_n EOT  (phase 3's `pack_documents`). A training
    example is a window of block_size + 1 consecutive tokens: x = window[:-1], y = window[1:].
    Every position is a real token and every label is the real next token, so the loss counts
    real tokens only; across a document boundary the label is EOT and then the next document.

Cache
    The streams are stored as memory-mapped token files (uint16 when the vocabulary has at most
    65,536 ids, else uint32) under `cache_dir/tokens-<key>/`, where <key> hashes the source (file
    paths, sizes and modification times; generator settings and code; hub name), the splitting
    rule and the complete tokenizer. A second run with the same key opens the files in
    milliseconds. A trained `bpe` tokenizer is cached the same way (`cache_dir/bpe-<key>/`).
    Folders are written under a temporary name and renamed when complete, so an interrupted
    run never leaves a half-written cache.

Sampling
    `BlockBatchSampler` draws non-overlapping windows (starts at multiples of block_size) in a
    per-epoch permutation fixed by (seed, epoch); each DDP rank takes its slice of every global
    batch, and `state_dict()` / `load_state_dict()` resume at exactly the next batch.
    `iter_eval_batches` walks the validation stream in order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from phase1_foundation.src.validation import check_int, check_number
from phase3_components.src.text_data import (
    load_text_dataset,
    open_token_file,
    pack_documents,
    split_documents,
    write_token_file,
)
from sparse_moe_transformer.src.text_tokenizers import (
    EOT,
    TextTokenizer,
    build_tokenizer,
    load_tokenizer_file,
)

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
PIPELINE_VERSION = 1  # bump when the cached bytes would change for the same inputs
ENCODE_BATCH_DOCS = 2048  # documents per encode_batch call


def default_cache_dir() -> Path:
    """$LLM_FOUNDATION_CACHE/data, or ~/.cache/llm-foundation/data."""
    root = os.environ.get("LLM_FOUNDATION_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llm-foundation"
    )
    return Path(root) / "data"


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


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
# Tokenize once, pack, cache
# ----------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    """What the training loop needs: the tokenizer and the two packed token streams (memmaps)."""

    tokenizer: TextTokenizer
    train_tokens: np.ndarray  # [N_train] uint16/uint32 memmap: doc EOT doc EOT ...
    valid_tokens: np.ndarray  # [N_valid]
    cache_path: Path  # the tokens-<key> folder
    reused: bool  # True when the token files came from the cache
    info: dict = field(default_factory=dict)  # documents, tokens, source description (meta.json)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65,536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def prepare_data(
    source: DataSource,
    tokenizer: str | TextTokenizer = "bpe",
    *,
    vocab_size: int = 4096,
    cache_dir: str | os.PathLike | None = None,
    hf_cache_dir: str | None = None,
    progress: bool = True,
) -> PreparedData:
    """Tokenize `source` once (cached), and return memory-mapped train/valid token streams.

    `tokenizer` is a name ("gpt2", "bpe": trained on the training documents with `vocab_size`
    ids, cached) or a ready tokenizer (e.g. the one stored in a checkpoint being resumed).
    Under DDP, let rank 0 call it first and the other ranks after a barrier: they then only open
    the cache (concurrent calls are safe, but each would do the same work).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if cache_dir.exists() and not cache_dir.is_dir():
        raise ValueError(f"--cache-dir {cache_dir} is a file: pass a folder for the token cache")
    if cache_dir.is_dir():
        remove_abandoned_staging_dirs(cache_dir)
    source_id = source.identity()
    docs = None  # loaded lazily: a full cache hit never reads the text

    if isinstance(tokenizer, str):
        if tokenizer == "bpe":
            bpe_dir = cache_dir / f"bpe-{_sha([PIPELINE_VERSION, source_id, vocab_size])[:20]}"
            if (bpe_dir / "tokenizer.json").is_file():
                tokenizer = load_tokenizer_file(bpe_dir / "tokenizer.json")
            else:
                docs = load_documents(source, hf_cache_dir)
                tokenizer = build_tokenizer("bpe", docs["train"], vocab_size=vocab_size)
                with _staging_dir(bpe_dir) as tmp:
                    tokenizer.save(tmp / "tokenizer.json")
        else:
            tokenizer = build_tokenizer(tokenizer, vocab_size=vocab_size)
    if not isinstance(tokenizer, TextTokenizer):
        raise TypeError(f"tokenizer must be a name or a TextTokenizer, got {type(tokenizer).__name__}")

    dtype = token_dtype(tokenizer.vocab_size)
    key = _sha([PIPELINE_VERSION, source_id, _sha(tokenizer.to_state()), dtype.str])[:20]
    token_dir = cache_dir / f"tokens-{key}"
    meta_path = token_dir / "meta.json"
    reused = meta_path.is_file()
    if not reused:
        if docs is None:
            docs = load_documents(source, hf_cache_dir)
        with _staging_dir(token_dir) as tmp:
            info = {
                "source": source.describe(),
                "source_identity": source_id,
                "tokenizer": tokenizer.name,
                "vocab_size": tokenizer.vocab_size,
                "eot_id": tokenizer.eot_id,
                "dtype": dtype.name,
                "empty_documents_skipped": docs["empty_skipped"],
            }
            for split in ("train", "valid"):
                n_tokens = tokenize_to_file(
                    docs[split], tokenizer, tmp / f"{split}.bin", dtype, progress, split
                )
                info[f"{split}_documents"] = len(docs[split])
                info[f"{split}_tokens"] = n_tokens
            (tmp / "meta.json").write_text(json.dumps(info, indent=2, ensure_ascii=False))
    info = json.loads(meta_path.read_text())
    return PreparedData(
        tokenizer=tokenizer,
        train_tokens=open_token_file(token_dir / "train.bin"),
        valid_tokens=open_token_file(token_dir / "valid.bin"),
        cache_path=token_dir,
        reused=reused,
        info=info,
    )


def tokenize_to_file(
    docs: Sequence[str],
    tokenizer: TextTokenizer,
    path: Path,
    dtype: np.dtype,
    progress: bool = False,
    desc: str = "",
) -> int:
    """Encode `docs` in batches, pack them (doc EOT doc EOT ...) and write one token file.

    Batches are appended to a raw scratch file, so memory stays at one batch whatever the corpus
    size; phase 3's `write_token_file` then writes the final memory-mappable file.
    """
    from tqdm.auto import tqdm

    if len(docs) == 0:
        raise ValueError(
            f"the {desc or 'data'} split has no documents: give it at least one non-empty document"
        )
    limit = np.iinfo(dtype).max
    scratch = path.with_suffix(".scratch")
    n_tokens = 0
    with open(scratch, "wb") as f:
        batches = range(0, len(docs), ENCODE_BATCH_DOCS)
        for start in tqdm(
            batches, desc=f"tokenizing {desc}", unit="batch", disable=not progress, leave=False
        ):
            ids = tokenizer.encode_batch(list(docs[start : start + ENCODE_BATCH_DOCS]))
            packed = np.asarray(pack_documents(ids, tokenizer.eot_id), dtype=np.int64)  # [n] doc EOT doc EOT
            top = int(packed.max())
            if top >= tokenizer.vocab_size or top > limit or int(packed.min()) < 0:
                raise ValueError(
                    f"token id {top} is out of range for vocab_size {tokenizer.vocab_size} / {dtype.name}: "
                    "the tokenizer's vocab_size is wrong; rebuild the tokenizer"
                )
            packed.astype(dtype).tofile(f)
            n_tokens += packed.size
    try:
        write_token_file(path, np.memmap(scratch, dtype=dtype, mode="r", shape=(n_tokens,)), dtype=dtype)
    finally:
        scratch.unlink()
    return n_tokens


def remove_abandoned_staging_dirs(cache_dir: Path) -> list[Path]:
    """Delete the half-built `NAME.tmp-PID-*` folders whose process no longer exists (killed with -9
    while tokenizing); a folder that another live process is still building is left alone."""
    removed = []
    for path in cache_dir.glob("*.tmp-*-*"):
        pid = path.name.split(".tmp-")[-1].split("-")[0]
        if path.is_dir() and pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class _staging_dir:
    """Build a cache folder under a temporary name; rename it into place only when complete."""

    def __init__(self, final: Path):
        self.final = final

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        prefix = f"{self.final.name}.tmp-{os.getpid()}-"  # the pid lets a later run see it was abandoned
        self.tmp = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=prefix))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                os.rename(self.tmp, self.final)
            except OSError:  # another process (e.g. a DDP rank) finished the same folder first
                if not self.final.is_dir():
                    raise
        shutil.rmtree(self.tmp, ignore_errors=True)
        return False


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Command-line flags (shared with train.py) and a preparation script
# ----------------------------------------------------------------------------------------------


def add_data_arguments(parser) -> None:
    """Add the data and tokenizer flags to an argparse parser (train.py uses the same ones)."""
    from sparse_moe_transformer.src.text_tokenizers import TOKENIZER_CHOICES

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
    g.add_argument("--cache-dir", default=None, help=f"token cache folder (default: {default_cache_dir()})")
    g.add_argument(
        "--max-file-gb", type=float, default=None,
        help=f"largest local data file read, in GiB (default {DEFAULT_MAX_FILE_GB:g}): its documents are "
        "held in memory while tokenized",
    )  # fmt: skip


def data_source_from_namespace(args, seed: int) -> DataSource:
    """The DataSource described by flags added with `add_data_arguments`; `seed` draws the synthetic
    stories and the held-out documents."""
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
        max_file_gb=getattr(args, "max_file_gb", None) or DEFAULT_MAX_FILE_GB,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Prepare (tokenize and cache) a dataset and print what the training run will see."""
    import argparse
    import time

    parser = argparse.ArgumentParser(
        description="Tokenize a dataset once into the MoE CLI's token cache and print its statistics.",
    )
    add_data_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="synthetic-story seed and hold-out seed")
    args = parser.parse_args(argv)
    try:
        source = data_source_from_namespace(args, seed=args.seed)
        start = time.perf_counter()
        data = prepare_data(
            source, args.tokenizer or "bpe", vocab_size=args.vocab_size or 4096, cache_dir=args.cache_dir
        )
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        parser.exit(2, f"error: {err}\n")
    seconds = time.perf_counter() - start
    info = data.info
    print(f"source      {info['source']}")
    print(
        f"tokenizer   {data.tokenizer.name}, {data.tokenizer.vocab_size} ids, EOT = {data.tokenizer.eot_id}"
    )
    for split in ("train", "valid"):
        print(f"{split:<11} {info[f'{split}_documents']:,} documents, {info[f'{split}_tokens']:,} tokens")
    print(f"cache       {data.cache_path} ({'reused' if data.reused else 'written'}, {info['dtype']})")
    print(f"time        {seconds:.2f} s")
    print(f"sample      {data.tokenizer.decode(data.train_tokens[:60])!r}")


if __name__ == "__main__":
    main()
