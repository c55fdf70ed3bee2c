"""The token cache: tokenize a data source once, pack it, and keep it as memory-mapped token files.

Packing (no padding anywhere)
    Each split is tokenized once, in batches (`encode_batch`, multi-threaded in Rust), and packed
    into one stream  doc_1 EOT doc_2 EOT ... doc_n EOT  (phase 3's `pack_documents`), from which
    `batches.py` cuts windows of block_size + 1 tokens: every position is a real token and every
    label the real next token; across a document boundary the label is EOT, then the next document.

Cache
    The streams are stored as memory-mapped token files (uint16 when the vocabulary has at most
    65,536 ids, else uint32) under `cache_dir/tokens-<key>/`, where <key> hashes the source (file
    paths, sizes and modification times; generator settings and code; hub name), the splitting
    rule and the complete tokenizer. A second run with the same key opens the files in
    milliseconds. A trained `bpe` tokenizer is cached the same way (`cache_dir/bpe-<key>/`).
    Folders are written under a temporary name and renamed when complete, so an interrupted
    run never leaves a half-written cache.

Script
    `python sparse_moe_transformer/src/token_cache.py [data flags] [--seed N]` fills the cache for a
    dataset on its own and prints what the training run will see (documents, tokens, a decoded sample).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phase3_components.src.text_data import open_token_file, pack_documents, token_dtype, write_token_file
from sparse_moe_transformer.src.data_sources import (
    DataSource,
    add_data_arguments,
    data_source_from_flags,
    load_documents,
)
from sparse_moe_transformer.src.text_tokenizers import TextTokenizer, build_tokenizer, load_tokenizer_file

PIPELINE_VERSION = 1  # bump when the cached bytes would change for the same inputs
ENCODE_BATCH_DOCS = 2048  # documents per encode_batch call


def default_cache_dir() -> Path:
    """$LLM_FOUNDATION_CACHE/data, or ~/.cache/llm-foundation/data."""
    root = os.environ.get("LLM_FOUNDATION_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llm-foundation"
    )
    return Path(root) / "data"


@dataclass
class PreparedData:
    """What the training loop needs: the tokenizer and the two packed token streams (memmaps)."""

    tokenizer: TextTokenizer
    train_tokens: np.ndarray  # [N_train] uint16/uint32 memmap: doc EOT doc EOT ...
    valid_tokens: np.ndarray  # [N_valid]
    cache_path: Path  # the tokens-<key> folder
    reused: bool  # True when the token files came from the cache
    info: dict = field(default_factory=dict)  # documents, tokens, source description (meta.json)


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
    # loaded at most once, and only when something must be built: a full cache hit never reads the text
    documents = functools.cache(lambda: load_documents(source, hf_cache_dir))
    tokenizer = _cached_tokenizer(
        tokenizer, vocab_size, cache_dir / _bpe_dir_name(source_id, vocab_size), documents
    )

    dtype = token_dtype(tokenizer.vocab_size)
    key = _sha([PIPELINE_VERSION, source_id, _sha(tokenizer.to_state()), dtype.str])[:20]
    token_dir = cache_dir / f"tokens-{key}"
    reused = (token_dir / "meta.json").is_file()
    if not reused:
        with _staging_dir(token_dir) as tmp:
            _write_token_files(tmp, documents(), source, source_id, tokenizer, dtype, progress)
    return PreparedData(
        tokenizer=tokenizer,
        train_tokens=open_token_file(token_dir / "train.bin"),
        valid_tokens=open_token_file(token_dir / "valid.bin"),
        cache_path=token_dir,
        reused=reused,
        info=json.loads((token_dir / "meta.json").read_text()),
    )


def _bpe_dir_name(source_id: dict, vocab_size: int) -> str:
    """The folder of the bpe tokenizer trained on this source with this vocabulary size."""
    return f"bpe-{_sha([PIPELINE_VERSION, source_id, vocab_size])[:20]}"


def _cached_tokenizer(
    tokenizer: str | TextTokenizer, vocab_size: int, bpe_dir: Path, documents
) -> TextTokenizer:
    """A ready tokenizer as given; "bpe" from `bpe_dir`, trained (on `documents()["train"]`) and saved
    there the first time; any other name built by `build_tokenizer`."""
    if isinstance(tokenizer, TextTokenizer):
        return tokenizer
    if not isinstance(tokenizer, str):
        raise TypeError(f"tokenizer must be a name or a TextTokenizer, got {type(tokenizer).__name__}")
    if tokenizer != "bpe":
        return build_tokenizer(tokenizer, vocab_size=vocab_size)
    if (bpe_dir / "tokenizer.json").is_file():
        return load_tokenizer_file(bpe_dir / "tokenizer.json")
    tokenizer = build_tokenizer("bpe", documents()["train"], vocab_size=vocab_size)
    with _staging_dir(bpe_dir) as tmp:
        tokenizer.save(tmp / "tokenizer.json")
    return tokenizer


def _write_token_files(
    folder: Path,
    docs: dict,
    source: DataSource,
    source_id: dict,
    tokenizer: TextTokenizer,
    dtype: np.dtype,
    progress: bool,
) -> None:
    """Write train.bin, valid.bin and meta.json (what was tokenized, and how much) into `folder`."""
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
        n_tokens = tokenize_to_file(docs[split], tokenizer, folder / f"{split}.bin", dtype, progress, split)
        info[f"{split}_documents"] = len(docs[split])
        info[f"{split}_tokens"] = n_tokens
    (folder / "meta.json").write_text(json.dumps(info, indent=2, ensure_ascii=False))


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
        source = data_source_from_flags(args, seed=args.seed)
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
