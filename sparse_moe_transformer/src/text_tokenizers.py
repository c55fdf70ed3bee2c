"""Tokenizers for the Sparse MoE training CLI: one small interface, two implementations.

    gpt2  GPT-2's byte-level BPE through `tiktoken` (50,257 tokens, `<|endoftext|>` = 50256), the
          vocabulary of the `t1000` preset. tiktoken downloads its two BPE files once (then caches
          them in TIKTOKEN_CACHE_DIR, or a temp folder); offline and uncached it fails with a
          one-line error naming the fix.
    bpe   a byte-level BPE trained on the training text with Hugging Face `tokenizers` by phase 3's
          `train_hf_byte_level_bpe` (ByteLevel pre-tokenizer and decoder, `<|endoftext|>` as a
          special token, vocabulary size configurable). Works offline.

Every tokenizer has the same interface, which is all the data pipeline and the training loop use:

    tok.name                 "gpt2" or "bpe"
    tok.vocab_size           number of token ids (the model's embedding rows)
    tok.eot_id               id of `<|endoftext|>`, the document separator
    tok.encode(text)         -> list[int]       (a literal "<|endoftext|>" in the text becomes eot_id)
    tok.encode_batch(texts)  -> list[list[int]] (multi-threaded in Rust for both implementations)
    tok.decode(ids)          -> str             (ids outside [0, vocab_size) raise ValueError)
    tok.to_state()           -> dict of str/int, JSON-serialisable: the *whole* tokenizer, stored inside
                                every checkpoint so `generate` needs only the checkpoint
    tok.save(path)           writes a JSON file (for bpe: a standard HF `tokenizer.json`)

and three functions build them:

    build_tokenizer(name, train_texts=None, vocab_size=4096)   # the CLI's --tokenizer
    tokenizer_from_state(state)                                # from a checkpoint
    load_tokenizer_file(path)                                  # from a file written by save()

Both tokenizers are byte-level, so encode -> decode returns any Unicode text exactly.
"""

from __future__ import annotations

import base64
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

from phase2_architecture.src.atomic_files import atomic_write
from phase3_components.src.hf_byte_level_bpe import EOT, train_hf_byte_level_bpe

TOKENIZER_CHOICES = ("gpt2", "bpe")
STATE_FORMAT = "llm-foundation-tokenizer"
STATE_VERSION = 1

GPT2_VOCAB_SIZE = 50257
GPT2_EOT_ID = 50256
GPT2_OFFLINE_ERROR = (
    "cannot download the GPT-2 tokenizer files: connect to the internet once (tiktoken caches them), "
    "set TIKTOKEN_CACHE_DIR to a folder holding them, or use --tokenizer bpe"
)


class TextTokenizer(ABC):
    """The interface shared by every tokenizer of the MoE CLI (see the module docstring)."""

    name: str

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eot_id(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def to_state(self) -> dict: ...

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids (a list, or a 1-D tensor/array) -> text. Out-of-range ids are an error."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if i < 0 or i >= self.vocab_size)
            raise ValueError(
                f"token id {bad} is outside the {self.name} vocabulary [0, {self.vocab_size}): "
                "decode ids produced with this tokenizer (is the checkpoint's tokenizer the one you loaded?)"
            )
        return self._decode(ids)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer as JSON (atomically); reload it with `load_tokenizer_file`."""
        path = Path(path)
        with atomic_write(path, "w", encoding="utf-8") as f:
            json.dump(self.to_state(), f, ensure_ascii=False)
        return path

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"
        )


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"encode expects a str, got {type(text).__name__}")
    return text


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("encode_batch expects a list of str, got a single str: use encode(text)")
    texts = list(texts)
    for t in texts:
        _check_text(t)
    return texts


# ----------------------------------------------------------------------------------------------
# gpt2: tiktoken
# ----------------------------------------------------------------------------------------------


class TiktokenTokenizer(TextTokenizer):
    """A tiktoken `Encoding` (GPT-2's by default) behind the common interface.

    `<|endoftext|>` written in the text is encoded as the EOT token (tiktoken's default would
    raise), the same rule as the `bpe` tokenizer.
    """

    def __init__(self, encoding, name: str = "gpt2"):
        if EOT not in encoding.special_tokens_set:
            raise ValueError(f"the tiktoken encoding {encoding.name!r} has no {EOT} token")
        self.encoding = encoding
        self.name = name
        self._eot_id = encoding.encode_single_token(EOT)
        self._allowed = frozenset({EOT})
        self._state = None  # to_state() is built once: checkpoints call it at every save

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def eot_id(self) -> int:
        return self._eot_id

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(_check_text(text), allowed_special=self._allowed)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = _check_texts(texts)
        return self.encoding.encode_batch(
            texts, allowed_special=self._allowed, num_threads=os.cpu_count() or 1
        )

    def _decode(self, ids: list[int]) -> str:
        # errors="strict" would fail on a sequence cut inside a multi-byte character; "replace"
        # shows it as U+FFFD, like every GPT-2 sampler does. Complete sequences decode exactly.
        return self.encoding.decode(ids, errors="replace")

    def to_state(self) -> dict:
        """The complete vocabulary (about 0.7 MB of text), so a checkpoint never needs a download.

        Mergeable tokens are stored in rank order (line i = the bytes of token i, base64).
        """
        if self._state is None:
            self._state = self._build_state()
        return dict(self._state)

    def _build_state(self) -> dict:
        specials = {
            tok: self.encoding.encode_single_token(tok) for tok in sorted(self.encoding.special_tokens_set)
        }
        n_ranks = min(specials.values())  # mergeable tokens are ids 0..n_ranks-1, special tokens follow
        ranks = [self.encoding.decode_single_token_bytes(i) for i in range(n_ranks)]
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "kind": "tiktoken",
            "name": self.name,
            "pattern": self.encoding._pat_str,  # the pre-tokenizer regex (no public accessor in tiktoken)
            "ranks_base64": "\n".join(base64.b64encode(tok).decode("ascii") for tok in ranks),
            "special_tokens": specials,
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_state(cls, state: dict) -> TiktokenTokenizer:
        import tiktoken

        lines = state["ranks_base64"].split("\n") if state["ranks_base64"] else []
        ranks = {base64.b64decode(line): rank for rank, line in enumerate(lines)}
        encoding = tiktoken.Encoding(
            name=state["name"],
            pat_str=state["pattern"],
            mergeable_ranks=ranks,
            special_tokens={k: int(v) for k, v in state["special_tokens"].items()},
            explicit_n_vocab=int(state["vocab_size"]),
        )
        return cls(encoding, name=state["name"])


def load_gpt2_tokenizer() -> TiktokenTokenizer:
    """GPT-2's tokenizer from tiktoken; a one-line RuntimeError naming the fix when offline."""
    import tiktoken

    try:
        encoding = tiktoken.get_encoding("gpt2")
    except (OSError, ValueError) as err:  # requests' ConnectionError is an OSError; a bad cache -> ValueError
        raise RuntimeError(f"{GPT2_OFFLINE_ERROR} ({type(err).__name__})") from err
    except Exception as err:  # e.g. urllib3/requests errors outside the OSError hierarchy
        if "connect" in type(err).__name__.lower() or "resolve" in str(err).lower():
            raise RuntimeError(f"{GPT2_OFFLINE_ERROR} ({type(err).__name__})") from err
        raise
    return TiktokenTokenizer(encoding, name="gpt2")


# ----------------------------------------------------------------------------------------------
# bpe: Hugging Face tokenizers
# ----------------------------------------------------------------------------------------------


class HFByteLevelBPETokenizer(TextTokenizer):
    """A Hugging Face `tokenizers.Tokenizer` (byte-level BPE) behind the common interface."""

    name = "bpe"

    def __init__(self, tokenizer):
        eot_id = tokenizer.token_to_id(EOT)
        if eot_id is None:
            raise ValueError(f"the tokenizer has no {EOT} token: train it with build_tokenizer('bpe', ...)")
        self.tokenizer = tokenizer
        self._eot_id = eot_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        return self._eot_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(_check_text(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = _check_texts(texts)
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we never use
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        # keep <|endoftext|> in the output: decode must invert encode
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def to_state(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "kind": "hf_tokenizers",
            "name": self.name,
            "tokenizer_json": self.tokenizer.to_str(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write a standard HF `tokenizer.json` (loadable by `tokenizers.Tokenizer.from_file` too)."""
        path = Path(path)
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write(self.tokenizer.to_str())
        return path

    @classmethod
    def from_state(cls, state: dict) -> HFByteLevelBPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(state["tokenizer_json"]))


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2
) -> HFByteLevelBPETokenizer:
    """Train a byte-level BPE on `texts` (an iterable of documents) with phase 3's HF trainer.

    The vocabulary starts with `<|endoftext|>` (id 0) and the 256 byte symbols and grows by merges
    until `vocab_size` ids exist, or fewer when the text has no more pairs seen `min_frequency`
    times: read `.vocab_size` for the real size. Documents are given to the trainer as they are.
    """
    if isinstance(texts, str):  # one string here is almost always a corpus whose documents were never cut
        raise TypeError(
            "train_bpe_tokenizer expects an iterable of documents, got a single str: wrap it in a list"
        )
    tokenizer = train_hf_byte_level_bpe(
        texts, vocab_size, special_tokens=(EOT,), strip_special=False, min_frequency=min_frequency
    )
    return HFByteLevelBPETokenizer(tokenizer)


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def build_tokenizer(
    name: str, train_texts: Iterable[str] | None = None, vocab_size: int = 4096
) -> TextTokenizer:
    """The CLI's `--tokenizer NAME`: "gpt2" (tiktoken) or "bpe" (trained on `train_texts`)."""
    if name == "gpt2":
        return load_gpt2_tokenizer()
    if name == "bpe":
        if train_texts is None:
            raise ValueError("the bpe tokenizer is trained on the training text: pass train_texts")
        return train_bpe_tokenizer(train_texts, vocab_size=vocab_size)
    raise ValueError(f"unknown tokenizer {name!r}: choose one of {', '.join(TOKENIZER_CHOICES)}")


def tokenizer_from_state(state: dict | str) -> TextTokenizer:
    """Rebuild a tokenizer from `to_state()` (a dict, or its JSON string), e.g. from a checkpoint."""
    if isinstance(state, str):
        try:
            state = json.loads(state)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"the tokenizer state is not valid JSON ({err}): re-save the checkpoint"
            ) from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(
            "not a tokenizer state written by this project (expected a dict with "
            f"format={STATE_FORMAT!r}): pass the 'tokenizer' entry of a checkpoint"
        )
    if state.get("version") != STATE_VERSION:
        raise ValueError(
            f"tokenizer state version {state.get('version')!r} is not supported (this code reads "
            f"version {STATE_VERSION}): use the matching version of llm-foundation"
        )
    kind = state.get("kind")
    try:
        if kind == "tiktoken":
            return TiktokenTokenizer.from_state(state)
        if kind == "hf_tokenizers":
            return HFByteLevelBPETokenizer.from_state(state)
    except KeyError as err:
        raise ValueError(
            f"the {kind} tokenizer state is missing the field {err}: the checkpoint is damaged"
        ) from err
    raise ValueError(f"unknown tokenizer kind {kind!r} in the state: expected 'tiktoken' or 'hf_tokenizers'")


def load_tokenizer_file(path: str | os.PathLike) -> TextTokenizer:
    """Load a file written by `tokenizer.save()`: our state JSON, or a HF `tokenizer.json`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path} (it is written next to the checkpoint)")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the tokenizer file {path}: {err}") from err
    if isinstance(data, dict) and data.get("format") == STATE_FORMAT:
        return tokenizer_from_state(data)
    from tokenizers import Tokenizer

    try:
        return HFByteLevelBPETokenizer(Tokenizer.from_str(text))
    except Exception as err:
        raise ValueError(
            f"{path} is neither a tokenizer state nor a Hugging Face tokenizer.json: {err}"
        ) from err
