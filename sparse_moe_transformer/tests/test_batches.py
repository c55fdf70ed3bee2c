"""Batches: every label is the real next token (no padding), the sampler's per-epoch order is seeded
and resumes with exactly the next batch, DDP ranks split the global batch, validation batches come in
a fixed order, and bad sampler arguments are refused."""

import numpy as np
import pytest
import torch

from phase3_components.src.synthetic_stories import generate_stories
from sparse_moe_transformer.src.batches import BlockBatchSampler, blocks_to_batch, iter_eval_batches
from sparse_moe_transformer.src.data_sources import make_data_source
from sparse_moe_transformer.src.text_tokenizers import train_bpe_tokenizer
from sparse_moe_transformer.src.token_cache import prepare_data


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(generate_stories(300, seed=0), vocab_size=400)


def stream_documents(tokens, tok):
    """Decode a packed stream back into its documents (cut at every EOT)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    assert tokens[-1] == tok.eot_id  # every document, the last one too, is followed by EOT
    cuts = np.flatnonzero(tokens == tok.eot_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(tokens[s:e].tolist()) for s, e in zip(starts, cuts)]


def test_no_padding_every_label_is_the_real_next_token(tok, tmp_path):
    data = prepare_data(
        make_data_source("synthetic", synthetic_train_stories=40, synthetic_valid_stories=5),
        tok,
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    tokens = np.asarray(data.train_tokens, dtype=np.int64)
    T, B = 32, 4
    sampler = BlockBatchSampler(len(tokens), T, B, seed=0)
    label_positions = []
    for _ in range(len(sampler)):  # one epoch
        starts = next(sampler)
        x, y = blocks_to_batch(data.train_tokens, starts, T)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
        for b, s in enumerate(starts):
            # x is the stream, y is the stream one step later: real tokens, real next tokens
            np.testing.assert_array_equal(x[b].numpy(), tokens[s : s + T])
            np.testing.assert_array_equal(y[b].numpy(), tokens[s + 1 : s + T + 1])
            label_positions.extend(range(s + 1, s + T + 1))
    # no label position repeats, and the epoch covers all but the leftover windows
    assert len(label_positions) == len(set(label_positions)) == len(sampler) * B * T
    assert len(sampler) * B * T > 0.9 * (len(tokens) - 1)
    # the stream has no filler: it is exactly the documents and one EOT per document
    assert stream_documents(tokens, tok) == generate_stories(40, seed=0)


# ---------------------------------------------------------------------------------------- sampler


def test_sampler_is_deterministic_and_permutes_each_epoch():
    a = BlockBatchSampler(10_001, 100, 4, seed=1)
    b = BlockBatchSampler(10_001, 100, 4, seed=1)
    c = BlockBatchSampler(10_001, 100, 4, seed=2)
    assert len(a) == a.batches_in_epoch(0) == 25  # 100 windows / 4
    epoch_a = [next(a) for _ in range(25)]
    epoch_b = [next(b) for _ in range(25)]
    epoch_c = [next(c) for _ in range(25)]
    assert all((x == y).all() for x, y in zip(epoch_a, epoch_b))
    assert not all((x == y).all() for x, y in zip(epoch_a, epoch_c))
    starts = np.concatenate(epoch_a)
    assert sorted(starts.tolist()) == list(range(0, 10_000, 100))  # every window once per epoch
    # later epochs shift the whole window grid by an offset o_e in [0, block_size) drawn from
    # (seed, epoch): the same tokens, in new windows, in a new order
    offsets = set()
    for epoch in range(1, 6):
        n_batches = a.batches_in_epoch(epoch)
        batches = [next(a) for _ in range(n_batches)]
        assert a.epoch == epoch
        grid = np.sort(np.concatenate(batches))
        offset = int(grid[0]) % 100
        offsets.add(offset)
        assert 0 <= offset < 100 and ((grid - offset) % 100 == 0).all()  # one shifted grid
        assert (np.diff(grid) > 0).all()  # no window twice
        assert grid[-1] + 100 + 1 <= 10_001  # the last window fits in the stream
        assert grid.size >= 96  # at most one window lost to the shift (and 3 to the batch size)
    assert len(offsets) > 1  # the grid really moves between epochs


def test_sampler_resumes_with_exactly_the_next_batch(tmp_path):
    uninterrupted = BlockBatchSampler(5_000, 16, 8, seed=7)
    expected = [next(uninterrupted) for _ in range(100)]  # crosses two epoch boundaries (39 per epoch)
    first = BlockBatchSampler(5_000, 16, 8, seed=7)
    for _ in range(57):
        next(first)
    torch.save({"sampler": first.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)["sampler"]
    resumed = BlockBatchSampler(5_000, 16, 8, seed=7)
    resumed.load_state_dict(state)
    for k in range(57, 100):
        np.testing.assert_array_equal(next(resumed), expected[k])


def test_rank_shards_equal_one_rank_with_the_global_batch():
    single = BlockBatchSampler(20_000, 32, 8, seed=3)
    ranks = [BlockBatchSampler(20_000, 32, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1])
    for _ in range(2 * len(single) + 5):  # over epoch boundaries
        both = np.concatenate([next(ranks[0]), next(ranks[1])])
        np.testing.assert_array_equal(both, next(single))
    # a 2-rank state resumes a 1-rank run with the same global batch
    resumed = BlockBatchSampler(20_000, 32, 8, seed=3)
    resumed.load_state_dict(ranks[0].state_dict())
    np.testing.assert_array_equal(next(resumed), np.concatenate([next(ranks[0]), next(ranks[1])]))


def test_eval_batches_fixed_order_and_sharded():
    tokens = np.arange(1_000, dtype=np.uint16)
    batches = list(iter_eval_batches(tokens, 10, 8))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (99, 10) and [len(b[0]) for b in batches][-1] == 3  # 99 = 12 * 8 + 3
    np.testing.assert_array_equal(x[:, 0].numpy(), np.arange(0, 990, 10))
    assert torch.equal(y, x + 1)
    assert len(list(iter_eval_batches(tokens, 10, 8, max_batches=2))) == 2
    # two ranks: global batch i = rank 0's 4 windows then rank 1's; the 3 windows of the last
    # global batch all go to rank 0, so rank 1 has one batch less
    shards = [list(iter_eval_batches(tokens, 10, 4, rank=r, world_size=2)) for r in range(2)]
    assert (len(shards[0]), len(shards[1])) == (13, 12)
    merged = torch.cat([torch.cat([a[0], b[0]]) for a, b in zip(shards[0], shards[1])] + [shards[0][-1][0]])
    assert torch.equal(merged, x)


def test_short_corpus_and_bad_sampler_arguments():
    with pytest.raises(ValueError, match="shorter than one block of block_size \\+ 1 = 257 tokens"):
        BlockBatchSampler(200, 256, 1)
    with pytest.raises(ValueError, match="fewer than one global batch .*smaller"):
        BlockBatchSampler(1_000, 100, 8, world_size=2)
    with pytest.raises(ValueError, match="rank must be an integer >= 0 and <= 1"):
        BlockBatchSampler(10_000, 10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        BlockBatchSampler(10_000, 10, 0)
    with pytest.raises(ValueError, match="validation split .* shorter than one block"):
        next(iter_eval_batches(np.zeros(50, dtype=np.uint16), 64, 2))
    sampler = BlockBatchSampler(10_000, 10, 2, seed=0)
    other = BlockBatchSampler(10_000, 20, 2, seed=0)
    with pytest.raises(ValueError, match="block_size was 20 in the checkpoint and is 10 now"):
        sampler.load_state_dict(other.state_dict())
