"""Classification fine-tuning: last-token head, what each mode trains, the plot task, held-out accuracy."""

from collections import Counter

import pytest
import torch

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase3_components.src.char_tokenizer import CharTokenizer
from phase3_components.src.synthetic_stories import PLOT_NAMES, generate_labelled_stories, generate_stories
from phase4_training.src.classification_finetune import (
    FINETUNING_MODES,
    ClassificationData,
    GPTClassifier,
    classification_accuracy,
    majority_class_accuracy,
    plot_classification_data,
    prepare_for_finetuning,
    train_classifier,
)
from phase4_training.src.lora import LoRALinear, lora_parameter_count
from phase4_training.src.reward_model import gpt_hidden_states


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer.from_text("".join(generate_stories(300, seed=0)))


def tiny_gpt(vocab_size, seed=0, n_layer=2):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=48, n_layer=n_layer, n_head=2, d_model=32))


def test_logits_are_the_head_applied_to_the_last_real_tokens_hidden_state(tokenizer):
    model = GPTClassifier(tiny_gpt(tokenizer.vocab_size), n_classes=5).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (3, 20))
    lengths = torch.tensor([20, 7, 12])
    logits = model(ids, lengths)  # [3, 5]
    hidden = gpt_hidden_states(model.gpt, ids)  # [3, 20, C], computed independently of GPT.forward
    expected = torch.stack([model.head(hidden[b, lengths[b] - 1]) for b in range(3)])
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
    # causality: what follows the last real token (padding) changes nothing; a token before it does
    padded = ids.clone()
    padded[1, 7:] = 0
    torch.testing.assert_close(model(padded, lengths), logits)
    changed = ids.clone()
    changed[1, 3] = (changed[1, 3] + 1) % tokenizer.vocab_size
    assert not torch.allclose(model(changed, lengths)[1], logits[1])


@pytest.mark.parametrize("mode", FINETUNING_MODES)
def test_each_mode_trains_exactly_its_parameters(tokenizer, mode):
    model = GPTClassifier(tiny_gpt(tokenizer.vocab_size), n_classes=len(PLOT_NAMES))
    n_trainable = prepare_for_finetuning(model, mode, lora_rank=4)
    C, K = 32, len(PLOT_NAMES)
    head = C * K + K
    last_block = sum(p.numel() for p in model.gpt.blocks[-1].parameters())  # used in mode "last_block"
    expected = {
        "head": head,
        "last_block": head + last_block + 2 * C,  # + ln_f weight and bias
        # each block linear gets A [r, in], B [out, r]: q, k, v, out (C -> C), up (C -> 4C), down (4C -> C)
        "lora": head + 2 * (4 * lora_parameter_count(C, C, 4) + 2 * lora_parameter_count(C, 4 * C, 4)),
        "all": sum(p.numel() for p in model.parameters()),
    }[mode]
    assert n_trainable == expected
    if mode == "lora":
        assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 6
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = plot_classification_data(tokenizer, 16, seed=1, max_tokens=40)
    train_classifier(model, data, steps=2, batch_size=8, lr=1e-2)
    for name, p in model.named_parameters():
        moved = not torch.equal(before[name], p)
        assert moved == p.requires_grad, f"{name}: requires_grad={p.requires_grad} but moved={moved}"
    if mode == "last_block":  # the first block stays frozen
        assert all(not p.requires_grad for p in model.gpt.blocks[0].parameters())


def test_plot_data_labels_the_middle_paragraph_with_its_plot(tokenizer):
    data = plot_classification_data(tokenizer, 60, seed=4, max_tokens=30)
    stories = generate_labelled_stories(60, seed=4)
    assert data.ids.shape == (60, 30) and data.class_names == PLOT_NAMES
    for i, story in enumerate(stories):
        assert PLOT_NAMES[data.labels[i]] == story.plot
        n = int(data.lengths[i])
        assert tokenizer.decode(data.ids[i, :n].tolist()) == story.paragraphs[1][:30]
        assert (data.ids[i, n:] == 0).all()
    counts = Counter(data.labels.tolist())
    assert len(counts) == 10 and max(counts.values()) < 0.3 * 60  # ten classes, none dominant


def test_majority_class_baseline_by_hand():
    make = lambda labels: ClassificationData(
        torch.zeros(len(labels), 1, dtype=torch.long),
        torch.ones(len(labels), dtype=torch.long),
        torch.tensor(labels),
        ("a", "b", "c"),
    )
    assert majority_class_accuracy(make([2, 2, 1, 0]), make([2, 0, 0, 2, 1])) == pytest.approx(2 / 5)


def test_finetuning_reaches_held_out_accuracy_far_above_the_majority_class(tokenizer):
    train_data = plot_classification_data(tokenizer, 300, seed=10, max_tokens=48)
    test_data = plot_classification_data(tokenizer, 150, seed=11, max_tokens=48)  # other stories
    model = GPTClassifier(tiny_gpt(tokenizer.vocab_size, n_layer=1), n_classes=len(PLOT_NAMES))
    prepare_for_finetuning(model, "all")
    before = classification_accuracy(model, test_data)
    losses = train_classifier(model, train_data, steps=60, batch_size=32, lr=3e-3)
    after = classification_accuracy(model, test_data)
    baseline = majority_class_accuracy(train_data, test_data)
    assert baseline < 0.2 and before < 0.3
    assert after > 0.6, (before, after, baseline)
    assert sum(losses[-10:]) < sum(losses[:10])


def test_bad_settings_are_clear_errors(tokenizer):
    model = GPTClassifier(tiny_gpt(tokenizer.vocab_size), n_classes=3)
    with pytest.raises(ValueError, match="mode must be one of"):
        prepare_for_finetuning(model, "bias_only")
    with pytest.raises(ValueError, match="at least 2 classes"):
        GPTClassifier(tiny_gpt(tokenizer.vocab_size), n_classes=1)
    with pytest.raises(ValueError, match="lengths"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.tensor([5]))
    for p in model.parameters():
        p.requires_grad = False
    with pytest.raises(ValueError, match="prepare_for_finetuning"):
        train_classifier(model, plot_classification_data(tokenizer, 4, seed=0, max_tokens=8), steps=1)
