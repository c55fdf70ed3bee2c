"""Hugging Face `tokenizers`' byte-level BPE, trained the way this course trains BPE.

The one trainer of a Hugging Face BPE in the project: `compare_tokenizers.py` measures our Python
BPE against it, and the Sparse MoE's `bpe` tokenizer is trained by it. The setup is GPT-2's:

    pre-tokenizer  ByteLevel (GPT-2's split regex, bytes shown as printable characters, no prefix space)
    alphabet       all 256 bytes from the start, so no text is ever unknown
    special tokens given first (ids 0, 1, ...), "<|endoftext|>" by default
    decoder        ByteLevel, so decode(encode(text)) == text for any Unicode text
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from phase1_foundation.src.validation import check_int

EOT = "<|endoftext|>"
N_BYTE_TOKENS = 256
MAX_BPE_VOCAB = 1 << 20  # far above any vocabulary here; a larger request aborts the Rust trainer


def train_hf_byte_level_bpe(
    texts: str | Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = (EOT,),
    strip_special: bool = True,
    *,
    min_frequency: int = 0,
) -> Tokenizer:
    """Train a byte-level BPE on `texts` (one str, or an iterable of documents).

    The vocabulary starts with the special tokens and the 256 byte symbols and grows by merges of
    pairs seen at least `min_frequency` times until `vocab_size` ids exist (or fewer when the text
    has no more such pairs: read `get_vocab_size()` for the real size).

    HF's trainer counts pairs inside special-token strings that occur in the training text (the
    "nd" of "<|endoftext|>", ...); our BPETokenizer removes them first. strip_special=True cuts
    every text at the special tokens before giving it to HF, so both learn from the same pairs.
    """
    _check_vocab_size(vocab_size, special_tokens, texts)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: nothing is unknown
        show_progress=False,
    )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    docs = [texts] if isinstance(texts, str) else texts  # a str is one text, not a list of characters
    if strip_special and special_tokens:
        docs = _cut_at_special_tokens(docs, special_tokens)
    seen = [0]
    tokenizer.train_from_iterator(_counted(docs, seen), trainer=trainer)
    if seen[0] == 0:
        raise ValueError("cannot train a bpe tokenizer on no text: give it at least one non-empty document")
    return tokenizer


def _check_vocab_size(vocab_size: int, special_tokens: Sequence[str], texts) -> None:
    """A vocabulary the trainer can build: the base symbols, at most MAX_BPE_VOCAB, and no more ids
    than the text has merges to give (when the texts are a list whose size is known)."""
    base = N_BYTE_TOKENS + len(special_tokens)
    what = " + ".join([f"{N_BYTE_TOKENS} byte tokens", *special_tokens])
    check_int(f"bpe vocab_size ({what}; e.g. --vocab-size 4096)", vocab_size, minimum=base)
    if vocab_size > MAX_BPE_VOCAB:
        raise ValueError(
            f"bpe vocab_size {vocab_size} is more than this trainer supports ({MAX_BPE_VOCAB:,}); "
            "GPT-2 has 50,257 ids: pass e.g. --vocab-size 4096"
        )
    texts = [texts] if isinstance(texts, str) else texts
    if isinstance(texts, Sequence) and texts:
        # every merge joins two adjacent symbols of the text, so a corpus of n bytes gives < n merges
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        if vocab_size > base + n_bytes:
            raise ValueError(
                f"bpe vocab_size {vocab_size:,} exceeds what {n_bytes:,} bytes of training text can give "
                f"(at most {base + n_bytes:,} ids): lower --vocab-size or give more text"
            )


def _cut_at_special_tokens(docs: Iterable[str], special_tokens: Sequence[str]) -> Iterator[str]:
    """The non-empty pieces of every document between its special tokens (longest token matched first)."""
    pattern = "|".join(re.escape(t) for t in sorted(special_tokens, key=len, reverse=True))
    for doc in docs:
        yield from (piece for piece in re.split(pattern, doc) if piece)


def _counted(docs: Iterable[str], seen: list[int]) -> Iterator[str]:
    """`docs` unchanged, counting them in seen[0] (an empty corpus is an error after training)."""
    for doc in docs:
        seen[0] += 1
        yield doc
