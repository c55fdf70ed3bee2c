"""A character-level tokenizer: one token per Unicode character.

The simplest tokenizer there is, and the one karpathy's nanoGPT uses for Shakespeare:
the vocabulary is the sorted set of characters in a training text, and a token id is the
character's position in that list.

    text  "hello"  ->  ids [3, 2, 4, 4, 5]  ->  text "hello"

Trade-off (see the tokenization notebook): the vocabulary is tiny (tens to hundreds of ids), so
the embedding table is cheap, but sequences are long — one token per character — so a model with
a fixed context window sees little text, and attention cost grows with the square of that length.

A character that was not in the training text has no id. `encode` raises a ValueError naming it
instead of silently mapping it to something else; build the tokenizer from all the text you will
encode (`CharTokenizer.from_text(train_text + val_text)`).

Run `python phase3_components/src/char_tokenizer.py` for a small demonstration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from phase2_architecture.src.atomic_files import atomic_write


class CharTokenizer:
    """Maps each character of a fixed alphabet to an integer id and back."""

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        for ch in chars:
            if not isinstance(ch, str) or len(ch) != 1:
                raise ValueError(
                    f"CharTokenizer needs single characters, got {ch!r}: pass a string or 1-char strings"
                )
        if len(set(chars)) != len(chars):
            raise ValueError(
                "CharTokenizer got duplicate characters: pass each character once (e.g. sorted(set(text)))"
            )
        if not chars:
            raise ValueError("CharTokenizer needs at least one character: build it from a non-empty text")
        self.itos: list[str] = chars  # id -> character
        self.stoi: dict[str, int] = {ch: i for i, ch in enumerate(chars)}  # character -> id

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Build the vocabulary from every distinct character of `text`, sorted by code point."""
        if not isinstance(text, str):
            raise TypeError(f"from_text expects a str, got {type(text).__name__}")
        if not text:
            raise ValueError("from_text got an empty string: give it the text the tokenizer must cover")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Text -> list of ids, one per character. Unknown characters raise a ValueError."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        unknown = sorted({ch for ch in text if ch not in self.stoi})
        if unknown:
            shown = ", ".join(repr(ch) for ch in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise ValueError(
                f"characters not in the vocabulary: {shown}{more}; build the tokenizer from text that "
                "contains them, e.g. CharTokenizer.from_text(all_text)"
            )
        return [self.stoi[ch] for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        """List of ids -> text. Ids outside [0, vocab_size) raise a ValueError."""
        chars = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"token id {i} is outside the vocabulary [0, {self.vocab_size}): "
                    "was it made by this tokenizer?"
                )
            chars.append(self.itos[i])
        return "".join(chars)

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON, atomically (phase 2's atomic_write)."""
        path = Path(path)
        payload = json.dumps({"type": "CharTokenizer", "chars": self.itos}, ensure_ascii=False)
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write(payload)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("type") != "CharTokenizer":
            raise ValueError(
                f"{path} is not a CharTokenizer file (type={data.get('type')!r}): write it with .save"
            )
        return cls(data["chars"])


if __name__ == "__main__":
    sample = "To be, or not to be, that is the question."
    tok = CharTokenizer.from_text(sample)
    ids = tok.encode("to be")
    print(f"vocabulary ({tok.vocab_size} characters): {''.join(tok.itos)!r}")
    print(f"encode('to be') = {ids}")
    print(f"decode(...)     = {tok.decode(ids)!r}")
    try:
        tok.encode("xyz")
    except ValueError as err:
        print(f"encode('xyz') -> ValueError: {err}")
