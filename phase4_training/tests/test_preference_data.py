"""The toy preference task: examples come from the stories, pairs differ only in sentiment."""

import pytest
import torch

from phase3_components.src.synthetic_stories import BAD_FEELINGS, GOOD_FEELINGS, generate_stories
from phase4_training.src.preference_data import (
    encode_pairs,
    feeling_examples,
    language_model_windows,
    make_preference_pairs,
    pad_batch,
    sentiment_reward,
    story_tokenizer,
)


def test_examples_are_real_story_text():
    examples = feeling_examples(40, seed=3, prompt_chars=20, continuation_chars=12)
    text = "\n".join(generate_stories(40, seed=3))
    assert len(examples) > 40
    for ex in examples:
        assert len(ex.prompt) == 20 and len(ex.continuation) == 12
        assert ex.prompt + ex.continuation in text
        assert ex.completion == ex.word + ex.tail and ex.continuation.startswith(ex.completion)
        assert ex.word in GOOD_FEELINGS + BAD_FEELINGS


def test_pairs_prefer_the_positive_word_whatever_the_story_said():
    examples = feeling_examples(100, seed=0)
    pairs = make_preference_pairs(examples, seed=0)
    originally_bad = 0
    for ex, pair in zip(examples, pairs):
        assert pair.prompt == ex.prompt
        assert sentiment_reward(pair.chosen) == 1.0 and sentiment_reward(pair.rejected) == -1.0
        assert pair.chosen.endswith(ex.tail) and pair.rejected.endswith(ex.tail)
        originally_bad += ex.word in BAD_FEELINGS
        assert ex.completion in (pair.chosen, pair.rejected)
    assert 0.3 < originally_bad / len(pairs) < 0.7  # "the story's own word" does not predict "chosen"


@pytest.mark.parametrize(
    "completion, reward",
    [
        ("happy.", 1.0),
        (" glad to", 1.0),
        ("unhappy,", -1.0),
        ("sad. He", -1.0),
        ("worried", -1.0),
        ("happyish", 0.0),
        ("the dog", 0.0),
        ("", 0.0),
        ("...happy", 0.0),
    ],
)
def test_sentiment_reward_on_hand_made_strings(completion, reward):
    assert sentiment_reward(completion) == reward


def test_padding_and_encoding():
    ids, lengths = pad_batch([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and lengths.tolist() == [3, 1]
    with pytest.raises(ValueError, match="empty sequence"):
        pad_batch([[1], []])
    tokenizer = story_tokenizer(100)
    examples = feeling_examples(30, seed=1)
    pairs = make_preference_pairs(examples)
    enc = encode_pairs(pairs, tokenizer)
    assert enc.prompt_length == 24 and len(enc) == len(pairs)
    row = 5
    assert (
        tokenizer.decode(enc.chosen_ids[row, : enc.chosen_lengths[row]].tolist())
        == pairs[row].prompt + pairs[row].chosen
    )
    assert (
        tokenizer.decode(enc.rejected_ids[row, : enc.rejected_lengths[row]].tolist())
        == pairs[row].prompt + pairs[row].rejected
    )
    windows = language_model_windows(examples, tokenizer)
    assert windows.shape == (len(examples), 24 + 12) and windows.dtype == torch.long
