"""Byte-level Byte-Pair Encoding (BPE) from scratch, in the GPT-2 style.

Why bytes: every string is a sequence of UTF-8 bytes, so a vocabulary that starts with the 256
byte values can encode *any* text — emoji, Chinese, code — with no unknown token.

Why BPE: single bytes make sequences long. BPE (Sennrich et al., 2016; GPT-2, Radford et al.,
2019) learns merges greedily: repeatedly find the most frequent adjacent pair of tokens in the
training text and give it a new id. Frequent words end up as one token, rare words as a few
pieces, and nothing is ever out of vocabulary.

Training   (`BPETokenizer.train`)
    1. Pre-tokenise: split the text with the GPT-2 regex into "words" (a leading space sticks to
       the word: " cat"; digits, letters and punctuation are separate; contractions like "'s"
       stand alone). Merges never cross a word boundary, so " dog." can not become one token
       and "dog" / "dog." / "dog!" share their tokens.
    2. Count each distinct word once, with its frequency: {" the": 5120, " cat": 33, ...}.
    3. Count adjacent token pairs over the words, weighted by frequency.
    4. Repeat (vocab_size - 256 - n_special) times: take the most frequent pair (ties: the pair
       with the smallest ids), give it the next id, replace it in every word that contains it
       and update only the pair counts of those words (an index pair -> words makes this fast;
       a heap with lazy deletion finds the maximum).
Encoding   (`encode`)
    Special tokens (`<|endoftext|>`) are cut out first and map straight to their ids. Each other
    word starts as its bytes; then the adjacent pair with the *lowest merge rank* (learned
    earliest) is merged, again and again, until no learned pair is left — this replays training.
Decoding   (`decode`)
    Concatenate the bytes of every token and decode UTF-8. Ids from `encode` always decode back
    to the exact text; an arbitrary id sequence may cut a character in half, and such invalid
    bytes are shown as U+FFFD (errors="replace", as GPT-2 does).

Ids: 0..255 are the bytes, 256.. the merges in the order they were learned, then the special
tokens. `save`/`load` write the merges as JSON.

The regex needs the `regex` package (Unicode classes \\p{L}, \\p{N}, which stdlib `re` lacks).
"""

from __future__ import annotations

import heapq
import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import regex

from phase2_architecture.src.atomic_files import atomic_write

# The pre-tokenisation pattern of GPT-2 (openai/gpt-2, encoder.py), also used by HF ByteLevel:
#   's 't 're 've 'm 'll 'd     English contractions
#   " ?\p{L}+"                  a run of letters, with at most one leading space
#   " ?\p{N}+"                  a run of digits, ditto
#   " ?[^\s\p{L}\p{N}]+"        a run of punctuation/symbols, ditto
#   "\s+(?!\S)"                 whitespace, but leave the last space to the next word
#   "\s+"                       remaining whitespace
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
N_BYTES = 256


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair` in `ids` (left to right) with `new_id`.

    merge_pair([1, 2, 2, 2, 3], (2, 2), 9) -> [1, 9, 2, 3]
    """
    out = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def count_pairs(ids: Sequence[int]) -> Counter:
    """How often each adjacent pair occurs: [1, 2, 1, 2] -> {(1, 2): 2, (2, 1): 1}."""
    return Counter(zip(ids, ids[1:]))


# ----------------------------------------------------------------------------------------------
# The steps of BPETokenizer.train, in the order it runs them
# ----------------------------------------------------------------------------------------------


def _count_words(text: str, special_tokens: list[str], pattern: str) -> tuple[list[list[int]], list[int]]:
    """Steps 1-2: pre-tokenise the text outside special tokens and count each distinct word once.

    Returns (words, freqs): words[w] is the w-th distinct word as byte ids, freqs[w] how often it occurs.
    """
    compiled = regex.compile(pattern)
    pieces = [text]
    if special_tokens:
        special_re = regex.compile(
            "|".join(regex.escape(s) for s in sorted(special_tokens, key=len, reverse=True))
        )
        pieces = special_re.split(text)
    word_freq: Counter = Counter()
    for piece in pieces:
        word_freq.update(compiled.findall(piece))
    words: list[list[int]] = [list(w.encode("utf-8")) for w in word_freq]  # each word as ids
    freqs: list[int] = list(word_freq.values())
    return words, freqs


def _index_pairs(
    words: list[list[int]], freqs: list[int]
) -> tuple[dict[tuple[int, int], int], dict[tuple[int, int], set[int]]]:
    """Step 3: pair counts weighted by word frequency, and which words contain each pair."""
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += freqs[w]
            where[pair].add(w)
    return pair_counts, where


def _pop_most_frequent(
    heap: list[tuple[int, tuple[int, int]]], pair_counts: dict[tuple[int, int], int]
) -> tuple[tuple[int, int], int] | None:
    """Pop (pair, count) of the most frequent pair, skipping stale heap entries; None if no pair is left."""
    while heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) == -neg_count and -neg_count > 0:
            return pair, -neg_count
    return None


def _merge_in_words(
    pair: tuple[int, int],
    new_id: int,
    words: list[list[int]],
    freqs: list[int],
    pair_counts: dict[tuple[int, int], int],
    where: dict[tuple[int, int], set[int]],
    heap: list[tuple[int, tuple[int, int]]],
) -> None:
    """Step 4: replace `pair` by `new_id` in every word containing it, in place.

    Only the pair counts of those words change; each changed count is pushed to the heap again.
    """
    changed: set[tuple[int, int]] = set()
    for w in where.pop(pair, ()):
        old = words[w]
        new = merge_pair(old, pair, new_id)
        if len(new) == len(old):
            continue  # stale index entry: this word no longer contains the pair
        for p in zip(old, old[1:]):
            pair_counts[p] -= freqs[w]
            changed.add(p)
        for p in zip(new, new[1:]):
            pair_counts[p] += freqs[w]
            where[p].add(w)
            changed.add(p)
        words[w] = new
    pair_counts.pop(pair, None)
    changed.discard(pair)
    for p in changed:
        if pair_counts[p] > 0:
            heapq.heappush(heap, (-pair_counts[p], p))
        else:
            pair_counts.pop(p)


class BPETokenizer:
    """A trained byte-level BPE tokenizer: merges (in rank order) plus special tokens."""

    def __init__(
        self,
        merges: Sequence[tuple[int, int]],
        special_tokens: Iterable[str] = ("<|endoftext|>",),
        pattern: str = GPT2_SPLIT_PATTERN,
        merge_counts: Sequence[int] | None = None,
    ):
        self.merges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in merges]
        # rank of each pair = the order it was learned in; its new id is 256 + rank
        self.merge_ranks: dict[tuple[int, int], int] = {}
        self.vocab: list[bytes] = [bytes([b]) for b in range(N_BYTES)]  # id -> bytes
        for rank, (a, b) in enumerate(self.merges):
            new_id = N_BYTES + rank
            if not (0 <= a < new_id and 0 <= b < new_id):
                raise ValueError(
                    f"merge {rank} = ({a}, {b}) uses an id that does not exist yet: corrupt merges"
                )
            if (a, b) in self.merge_ranks:
                raise ValueError(
                    f"merge {rank} = ({a}, {b}) repeats merge {self.merge_ranks[(a, b)]}: corrupt merges"
                )
            self.merge_ranks[(a, b)] = rank
            self.vocab.append(self.vocab[a] + self.vocab[b])
        special_tokens = list(special_tokens)
        if len(set(special_tokens)) != len(special_tokens) or any(not s for s in special_tokens):
            raise ValueError(f"special tokens must be distinct non-empty strings, got {special_tokens}")
        self.special_tokens: dict[str, int] = {s: len(self.vocab) + k for k, s in enumerate(special_tokens)}
        self.special_ids: dict[int, str] = {i: s for s, i in self.special_tokens.items()}
        self.pattern = pattern
        self._compiled = regex.compile(pattern)
        # split text at special tokens; longest first so "<|a|><|ab|>"-style overlaps pick the longest
        ordered = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = (
            regex.compile("(" + "|".join(regex.escape(s) for s in ordered) + ")") if ordered else None
        )
        self.merge_counts = list(merge_counts) if merge_counts is not None else None
        self._cache: dict[str, list[int]] = {}  # word -> ids, encoding is deterministic

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        special_tokens: Iterable[str] = ("<|endoftext|>",),
        pattern: str = GPT2_SPLIT_PATTERN,
    ) -> BPETokenizer:
        """Learn vocab_size - 256 - len(special_tokens) merges from `text`.

        Special tokens occurring in `text` are removed before counting (they are never merged).
        Raises ValueError if the text has too few distinct pairs to learn that many merges.
        """
        if not isinstance(text, str):
            raise TypeError(f"train expects a str, got {type(text).__name__}")
        special_tokens = list(special_tokens)
        n_merges = vocab_size - N_BYTES - len(special_tokens)
        if n_merges < 0:
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than 256 bytes + {len(special_tokens)} special tokens: "
                f"use vocab_size >= {N_BYTES + len(special_tokens)}"
            )
        words, freqs = _count_words(text, special_tokens, pattern)  # 1-2
        pair_counts, where = _index_pairs(words, freqs)  # 3
        # max-heap via negated counts; ties -> smallest pair ids first. Entries go stale when a
        # count changes; a popped entry is used only if it still matches the current count.
        heap = [(-c, pair) for pair, c in pair_counts.items()]
        heapq.heapify(heap)

        merges: list[tuple[int, int]] = []
        merge_counts: list[int] = []
        while len(merges) < n_merges:  # 4
            best = _pop_most_frequent(heap, pair_counts)
            if best is None:
                raise ValueError(
                    f"the training text has no pair left to merge after {len(merges)} merges (asked for "
                    f"{n_merges}): use more text or vocab_size <= "
                    f"{N_BYTES + len(merges) + len(special_tokens)}"
                )
            pair, count = best
            new_id = N_BYTES + len(merges)
            merges.append(pair)
            merge_counts.append(count)
            _merge_in_words(pair, new_id, words, freqs, pair_counts, where, heap)
        return cls(merges, special_tokens=special_tokens, pattern=pattern, merge_counts=merge_counts)

    # ------------------------------------------------------------------------------------------
    # Encoding and decoding
    # ------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + len(self.special_tokens)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> ids. Special-token strings map to their ids (allow_special=False: encode them as text)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if not allow_special or self._special_re is None:
            return self._encode_ordinary(text)
        ids: list[int] = []
        for k, piece in enumerate(self._special_re.split(text)):  # odd pieces are the special tokens
            if k % 2 == 1:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self._encode_ordinary(piece))
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in self._compiled.findall(text):
            cached = self._cache.get(word)
            if cached is None:
                cached = self._encode_word(word)
                if len(self._cache) < 200_000:
                    self._cache[word] = cached
            ids.extend(cached)
        return ids

    def _encode_word(self, word: str) -> list[int]:
        """Bytes of one word, then merge the earliest-learned adjacent pair until none is left."""
        ids = list(word.encode("utf-8"))
        while len(ids) >= 2:
            ranked = [(self.merge_ranks.get(pair, float("inf")), pair) for pair in zip(ids, ids[1:])]
            rank, pair = min(ranked)
            if rank == float("inf"):
                break  # no adjacent pair was ever merged in training
            ids = merge_pair(ids, pair, N_BYTES + rank)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out = []
        for i in ids:
            i = int(i)
            if 0 <= i < len(self.vocab):
                out.append(self.vocab[i])
            elif i in self.special_ids:
                out.append(self.special_ids[i].encode("utf-8"))
            else:
                raise ValueError(
                    f"token id {i} is outside the vocabulary [0, {self.vocab_size}): wrong tokenizer?"
                )
        return b"".join(out)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Invalid UTF-8 (an id sequence that splits a character) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_str(self, token_id: int) -> str:
        """A printable form of one token, e.g. ' the' (partial UTF-8 shown as U+FFFD)."""
        return self.decode([token_id])

    # ------------------------------------------------------------------------------------------
    # Persistence
    # ------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write merges, special tokens and pattern as JSON, atomically (phase 2's atomic_write)."""
        path = Path(path)
        payload = {
            "type": "ByteLevelBPE",
            "version": 1,
            "pattern": self.pattern,
            "special_tokens": list(self.special_tokens),
            "merges": [list(m) for m in self.merges],
            "merge_counts": self.merge_counts,
        }
        with atomic_write(path, "w", encoding="utf-8") as f:
            json.dump(payload, f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("type") != "ByteLevelBPE":
            raise ValueError(
                f"{path} is not a BPETokenizer file (type={data.get('type')!r}): write it with .save"
            )
        return cls(
            [tuple(m) for m in data["merges"]],
            special_tokens=data["special_tokens"],
            pattern=data["pattern"],
            merge_counts=data.get("merge_counts"),
        )


if __name__ == "__main__":
    from phase3_components.src.synthetic_stories import generate_stories

    corpus = "<|endoftext|>".join(generate_stories(200, seed=0))
    tok = BPETokenizer.train(corpus, vocab_size=512)
    sample = "Once upon a time, Lily found a shiny red ball.<|endoftext|>"
    ids = tok.encode(sample)
    print(f"trained {len(tok.merges)} merges on {len(corpus):,} characters; vocab_size={tok.vocab_size}")
    print("first 10 merges:", [tok.token_str(N_BYTES + k) for k in range(10)])
    print(f"{sample!r}\n -> {len(ids)} tokens: {[tok.token_str(i) for i in ids]}")
    assert tok.decode(ids) == sample
