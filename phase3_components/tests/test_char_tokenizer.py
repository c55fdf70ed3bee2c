"""CharTokenizer: round trips, sorted vocabulary, clear errors, save/load."""

import random

import pytest

from phase2_architecture.src.toy_corpus import NURSERY_RHYMES, CharVocabulary
from phase3_components.src.char_tokenizer import CharTokenizer


def test_round_trip_and_vocabulary_on_random_unicode():
    rng = random.Random(0)
    alphabet = "abcXYZ 019\n\t.,!?éß日本語🙂\u0301"
    text = "".join(rng.choice(alphabet) for _ in range(2000))
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == len(set(text))
    assert tok.itos == sorted(set(text))  # ids follow code-point order
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_ids_are_positions_in_sorted_alphabet():
    tok = CharTokenizer.from_text("hello")
    assert tok.itos == ["e", "h", "l", "o"]
    assert tok.encode("hello") == [1, 0, 2, 2, 3]


def test_unknown_characters_raise_naming_them():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"'z'.*from_text"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.from_text("")
    with pytest.raises(TypeError):
        tok.encode([1, 2])


def test_save_load(tmp_path):
    tok = CharTokenizer.from_text("to be or not to be 🙂")
    tok.save(tmp_path / "chars.json")
    loaded = CharTokenizer.load(tmp_path / "chars.json")
    assert loaded.itos == tok.itos
    assert loaded.encode("be 🙂") == tok.encode("be 🙂")
    assert [p.name for p in tmp_path.iterdir()] == ["chars.json"]  # no temp file left behind


def test_equals_the_phase2_toy_corpus_vocabulary():
    """Phase 2's rhymes use a dozen-line CharVocabulary; this tokenizer gives the same ids and text."""
    ours, phase2 = CharTokenizer.from_text(NURSERY_RHYMES), CharVocabulary(NURSERY_RHYMES)
    assert ours.itos == phase2.itos
    assert ours.encode(NURSERY_RHYMES) == phase2.encode(NURSERY_RHYMES)
    ids = list(range(ours.vocab_size)) * 3
    assert ours.decode(ids) == phase2.decode(ids)
