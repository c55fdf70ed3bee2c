"""The shared Hugging Face BPE trainer: the GPT-2 byte-level setup it documents, built by hand with
the `tokenizers` API, trains the same tokenizer; special tokens are kept out of the merges when asked;
bad vocabulary sizes and empty text are refused in one line."""

import re

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from phase3_components.src.hf_byte_level_bpe import EOT, train_hf_byte_level_bpe
from phase3_components.src.synthetic_stories import generate_stories

SAMPLES = [
    "Once upon a time, there was a little girl named Lily.",
    f"two documents{EOT}joined by the end-of-text token{EOT}",
    "Ünïcödé: café, 日本語のテキスト, emoji 🤖👩‍👩‍👧, tabs\tand\r\nnew lines",
]


def reference_bpe(pieces: list[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    """GPT-2's byte-level BPE written out with the `tokenizers` API, trained on exactly `pieces`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(pieces, trainer=trainer)
    return tokenizer


def assert_same_tokenizer(a: Tokenizer, b: Tokenizer) -> None:
    assert a.get_vocab() == b.get_vocab() and a.to_str() == b.to_str()
    for text in SAMPLES:
        assert a.encode(text).ids == b.encode(text).ids
        assert a.decode(a.encode(text).ids, skip_special_tokens=False) == text


@pytest.fixture(scope="module")
def stories():
    return generate_stories(150, seed=0)


def test_documents_train_the_documented_byte_level_bpe(stories):
    """The MoE's use: documents as they are, pairs seen at least twice."""
    ours = train_hf_byte_level_bpe(stories, 500, strip_special=False, min_frequency=2)
    assert_same_tokenizer(ours, reference_bpe(stories, 500, min_frequency=2))
    assert ours.get_vocab_size() == 500 and ours.token_to_id(EOT) == 0


def test_one_text_is_cut_at_its_special_tokens(stories):
    """compare_tokenizers' use: one text, its special tokens removed before counting pairs, every pair
    counted (like our BPETokenizer): a vocabulary past the pairs seen twice is still filled."""
    few = stories[:40]
    text = EOT.join(few)
    ours = train_hf_byte_level_bpe(text, 2000)
    assert_same_tokenizer(ours, reference_bpe(few, 2000, min_frequency=0))
    assert ours.get_vocab_size() > reference_bpe(few, 2000, min_frequency=2).get_vocab_size()
    # without cutting, HF counts the pairs inside "<|endoftext|>" too: a different vocabulary
    raw = train_hf_byte_level_bpe(text, 2000, strip_special=False)
    assert raw.get_vocab() != ours.get_vocab()
    assert any(re.search(r"endoftext|\|>", token) for token in raw.get_vocab() if token != EOT)
    assert not any(re.search(r"endoftext|\|>", token) for token in ours.get_vocab() if token != EOT)


def test_bad_vocabulary_sizes_and_no_text_are_refused():
    with pytest.raises(ValueError, match=r"vocab_size \(256 byte tokens \+ <\|endoftext\|>.* >= 257"):
        train_hf_byte_level_bpe(["some text"], 256)
    with pytest.raises(ValueError, match="more than this trainer supports"):  # the Rust trainer would abort
        train_hf_byte_level_bpe(["some text"], 10**9)
    with pytest.raises(ValueError, match="exceeds what 9 bytes of training text can give"):
        train_hf_byte_level_bpe(["some text"], 400)
    with pytest.raises(ValueError, match="no text"):
        train_hf_byte_level_bpe([], 300)
    with pytest.raises(ValueError, match="no text"):
        train_hf_byte_level_bpe(iter([EOT, EOT]), 300)  # nothing left once the special tokens are cut
