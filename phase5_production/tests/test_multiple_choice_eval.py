"""Multiple-choice scoring: hand-computed log-likelihoods, normalisation, padding, two model interfaces."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase3_components.src.char_tokenizer import CharTokenizer
from phase5_production.src.multiple_choice_eval import (
    MultipleChoiceExample,
    evaluate_multiple_choice,
    first_sentence,
    load_hellaswag_jsonl,
    model_logits,
    score_endings,
    story_multiple_choice,
)


class ListTokenizer:
    """Text of space-separated integers <-> those integers ("3 1 4" -> [3, 1, 4])."""

    def encode(self, text):
        return [int(t) for t in text.split()]


class BigramTable(nn.Module):
    """Next-token logits = table[current token]: every log-probability is known in closed form."""

    def __init__(self, table, block_size=16):
        super().__init__()
        self.table = nn.Parameter(table)
        self.config = GPTConfig(
            vocab_size=table.shape[0], block_size=block_size, n_layer=1, n_head=1, d_model=4
        )

    def forward(self, idx, targets=None):
        return self.table[idx], None  # [B, T, V], the Phase 2 GPT's (logits, loss) shape


def hand_log_prob(table, tokens):
    """sum over consecutive pairs (a, b) of log softmax(table[a])[b], in Python floats."""
    total = 0.0
    for a, b in zip(tokens[:-1], tokens[1:]):
        row = [float(v) for v in table[a]]
        total += row[b] - math.log(sum(math.exp(v) for v in row))
    return total


def test_scores_equal_hand_computed_log_likelihood_of_the_ending_only():
    torch.manual_seed(0)
    table = torch.randn(6, 6) * 2
    model = BigramTable(table)
    scores = score_endings(model, ListTokenizer(), "1 2 3", ["4", "5 0 2", "3 3"])
    # context tokens 1 2 3 are not scored; each ending is scored after the last context token 3
    expected = [
        hand_log_prob(table, [3, 4]),
        hand_log_prob(table, [3, 5, 0, 2]),
        hand_log_prob(table, [3, 3, 3]),
    ]
    torch.testing.assert_close(scores.log_prob, torch.tensor(expected), atol=1e-5, rtol=0)
    assert scores.n_tokens.tolist() == [1, 3, 2]


def test_length_normalisation_changes_the_choice_when_it_should():
    # Token 1 -> 2 is certain-ish (log p ~ -0.1 each step), 1 -> 3 is a coin flip (log p ~ -0.7).
    # Ending A = "3" (one token, -0.7); ending B = "2 2 2 2" (four tokens, 4 * -0.35 = -1.4 in total).
    # Sum prefers the short A; per-token normalisation prefers B, whose every token is likelier.
    table = torch.full((4, 4), -20.0)
    table[1, 2] = table[1, 3] = 0.0  # after 1: 2 or 3, each with p = 1/2
    table[2, 2] = 0.0
    table[2, 0] = math.log(math.exp(0.35) - 1)  # after 2: p(2) = exp(-0.35)
    model = BigramTable(table)
    example = MultipleChoiceExample("0 1", ("3", "2 2 2 2"), label=1)
    scores = score_endings(model, ListTokenizer(), example.context, example.endings)
    assert scores.normalized("none").argmax() == 0
    assert scores.normalized("token").argmax() == 1
    result = evaluate_multiple_choice(model, ListTokenizer(), [example])
    assert result["acc_none"] == 0.0 and result["acc_token"] == 1.0 and result["chance"] == 0.5


def test_padding_does_not_change_scores_and_scores_equal_the_models_own_loss():
    torch.manual_seed(0)
    tokenizer = CharTokenizer.from_text("abcdefgh ")
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, d_model=32))
    endings = ["a", "bcdefg", "hh"]
    batched = score_endings(model, tokenizer, "abc deg", endings)  # three rows, padded to the longest
    for i, ending in enumerate(endings):
        alone = score_endings(model, tokenizer, "abc deg", [ending, ending])  # no padding at all
        torch.testing.assert_close(batched.log_prob[i], alone.log_prob[0], atol=1e-5, rtol=0)
        # independently: the GPT's own cross-entropy with the context's targets ignored (-100)
        ids = torch.tensor([tokenizer.encode("abc deg" + " " + ending)])
        targets = torch.full_like(ids, -100)
        n = len(ending) + 1
        targets[0, -n - 1 : -1] = ids[0, -n:]  # position t predicts token t + 1
        _, loss = model(ids, targets)
        torch.testing.assert_close(batched.log_prob[i], -loss * n, atol=1e-5, rtol=0)


def test_a_model_that_learned_the_sentence_picks_its_ending():
    tokenizer = CharTokenizer.from_text("the cat sat on a mat.hog")
    text = "the cat sat on the mat."
    ids = torch.tensor([tokenizer.encode(text)])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, d_model=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    example = MultipleChoiceExample("the cat sat on", ("the hog.", "the mat.", "a cat.", "the cat."), label=1)
    result = evaluate_multiple_choice(model, tokenizer, [example])
    assert result["acc_none"] == result["acc_token"] == result["acc_char"] == 1.0


def test_long_contexts_are_cropped_from_the_left_and_endings_kept_whole():
    torch.manual_seed(0)
    model = BigramTable(torch.randn(6, 6), block_size=5)
    long = score_endings(model, ListTokenizer(), "0 1 2 3 4 5 0 1 2 3", ["4 5"])
    # a bigram model only sees the last context token, so cropping must keep it
    torch.testing.assert_close(long.log_prob, torch.tensor([hand_log_prob(model.table.detach(), [3, 4, 5])]))
    with pytest.raises(ValueError, match="window is 5"):
        score_endings(model, ListTokenizer(), "0", ["1 2 3 4 5"])


def test_the_harness_scores_a_converted_gpt2_as_the_hugging_face_original():
    from transformers import GPT2Config, GPT2LMHeadModel

    from phase4_training.src.gpt2_weights import gpt2_to_gpt

    tokenizer = ListTokenizer()
    example = MultipleChoiceExample("5 17 42 8", ("3 9", "60 2 2", "11", "96 96 1 4"), label=0)

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()
    converted = gpt2_to_gpt(hf)
    hf_scores = score_endings(hf, tokenizer, example.context, example.endings)  # HF output: .logits
    ours = score_endings(converted, tokenizer, example.context, example.endings)  # ours: (logits, loss)
    torch.testing.assert_close(ours.log_prob, hf_scores.log_prob, atol=1e-4, rtol=0)
    assert (
        model_logits(hf, torch.tensor([[1, 2]])).shape
        == model_logits(converted, torch.tensor([[1, 2]])).shape
    )


def test_story_task_has_one_right_ending_from_the_story_and_three_from_other_plots():
    from phase3_components.src.synthetic_stories import generate_labelled_stories

    examples = story_multiple_choice(40, seed=1)
    stories = generate_labelled_stories(40, seed=1)
    labels = [e.label for e in examples]
    assert len(set(labels)) == 4  # the right answer is not always in the same place
    for example, story in zip(examples, stories):
        assert len(example.endings) == 4 and len(set(example.endings)) == 4
        assert story.text.startswith(example.context + example.separator + example.endings[example.label])
        assert all(
            not story.paragraphs[2].startswith(e) for i, e in enumerate(example.endings) if i != example.label
        )
    assert first_sentence('"Don\'t worry. I will help you look," said Ben. They looked.') == (
        '"Don\'t worry. I will help you look," said Ben.'
    )
    assert first_sentence('Ben said, "Let\'s go!" Then they ran.') == 'Ben said, "Let\'s go!"'


def test_hellaswag_jsonl_loader_reads_the_standard_layout_and_names_bad_lines(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    item = {
        "ind": 24,
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he",
        "split": "val",
        "split_type": "indomain",
        "label": 3,
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        "source_id": "activitynet~v_-JhWjGDPHMY",
    }
    path.write_text(json.dumps(item) + "\n" + json.dumps({**item, "label": 0}) + "\n")
    examples = load_hellaswag_jsonl(path)
    assert len(examples) == 2
    assert examples[0].context == item["ctx"] and examples[0].endings == tuple(item["endings"])
    assert examples[0].label == 3 and examples[1].label == 0 and examples[0].separator == " "

    bad = tmp_path / "hellaswag_test.jsonl"
    bad.write_text(json.dumps(item) + "\n" + json.dumps({**item, "label": ""}) + "\n")
    with pytest.raises(ValueError, match=r"hellaswag_test.jsonl:2: missing \['label'\].*validation split"):
        load_hellaswag_jsonl(bad)
    with pytest.raises(FileNotFoundError, match="rowanz/hellaswag"):
        load_hellaswag_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="label 7"):
        MultipleChoiceExample("x", ("a", "b"), label=7)


def test_unknown_normalization_is_an_error():
    model = BigramTable(torch.zeros(3, 3))
    scores = score_endings(model, ListTokenizer(), "0", ["1", "2"])
    with pytest.raises(ValueError, match="normalization"):
        scores.normalized("bytes")
    assert torch.allclose(scores.log_prob, torch.full((2,), -math.log(3)))
    assert F.log_softmax(torch.zeros(3), -1)[0].item() == pytest.approx(-math.log(3))


def test_command_line_demo_runs_on_tiny_settings(capsys):
    from phase5_production.src.multiple_choice_eval import main

    result = main(["--limit", "4", "--steps", "2"])
    out = capsys.readouterr().out
    assert "untrained" in out and "trained 2 steps" in out and result["n"] == 4
