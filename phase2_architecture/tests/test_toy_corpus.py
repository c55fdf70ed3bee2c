"""The toy corpus round-trips through the char tokenizer; batches are next-token pairs of the right split."""

import pytest

from phase2_architecture.src.toy_corpus import NURSERY_RHYMES, make_char_batches


def test_batches_are_shifted_windows_of_the_right_split():
    tok, get_batch = make_char_batches(block_size=24, batch_size=5, val_fraction=0.1)
    assert tok.decode(tok.encode(NURSERY_RHYMES)) == NURSERY_RHYMES
    cut = len(NURSERY_RHYMES) - round(0.1 * len(NURSERY_RHYMES))
    for split, part in (("train", NURSERY_RHYMES[:cut]), ("val", NURSERY_RHYMES[cut:])):
        x, y = get_batch(split)
        assert x.shape == y.shape == (5, 24)
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            assert row_x[1:] == row_y[:-1]  # y is x shifted by one token
            assert tok.decode(row_x + row_y[-1:]) in part  # a real window of that split


def test_batches_are_reproducible_and_unknown_split_rejected():
    _, a = make_char_batches(block_size=8, batch_size=3, seed=5)
    _, b = make_char_batches(block_size=8, batch_size=3, seed=5)
    assert all((a("train")[0] == b("train")[0]).all() for _ in range(3))
    with pytest.raises(ValueError, match="unknown split"):
        a("test")
