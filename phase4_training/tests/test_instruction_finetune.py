"""Instruction fine-tuning: the response-only loss, the story instructions, batched answers, adherence."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase3_components.src.char_tokenizer import CharTokenizer
from phase3_components.src.synthetic_stories import generate_labelled_stories, generate_stories
from phase4_training.src.instruction_finetune import (
    END_OF_RESPONSE,
    MOODS,
    PROMPT_TEMPLATE,
    InstructionExample,
    adherence,
    adherence_score,
    encode_example,
    format_prompt,
    generate_responses,
    instruction_batch,
    instruction_example,
    instruction_examples,
)


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer.from_text("".join(generate_stories(300, seed=0)) + PROMPT_TEMPLATE)


@pytest.fixture(scope="module")
def examples():
    return instruction_examples(200, seed=5)


def test_targets_are_masked_on_the_instruction_and_padding_only(tokenizer, examples):
    batch = examples[:4]
    x, y = instruction_batch(batch, tokenizer, block_size=256)
    for b, example in enumerate(batch):
        ids, prompt_length = encode_example(example, tokenizer)
        n = len(ids)
        assert x[b, : n - 1].tolist() == ids[:-1]  # inputs: every token but the last
        assert (y[b, : prompt_length - 1] == -100).all()  # predicting the prompt: not scored
        assert (y[b, n - 1 :] == -100).all()  # padding: not scored
        scored = y[b, prompt_length - 1 : n - 1].tolist()
        assert -100 not in scored
        assert tokenizer.decode(scored) == example.response + END_OF_RESPONSE  # exactly the response


def test_response_only_loss_gets_no_gradient_from_instruction_positions(tokenizer, examples):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=256, n_layer=1, n_head=2, d_model=32))
    x, y = instruction_batch(examples[:3], tokenizer, block_size=256)
    # which targets are response tokens, from the prompt and text lengths alone (not from y)
    scored = torch.zeros_like(y, dtype=torch.bool)
    for b, example in enumerate(examples[:3]):
        ids, prompt_length = encode_example(example, tokenizer)
        scored[b, prompt_length - 1 : len(ids) - 1] = True
    captured = {}

    def keep_logits(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output

    handle = model.lm_head.register_forward_hook(keep_logits)
    _, loss = model(x, y)
    handle.remove()
    loss.backward()
    logits, grad = captured["logits"], captured["logits"].grad  # [B, T, V]
    assert (grad[~scored] == 0).all()  # instruction and padding positions: exactly no gradient
    assert (grad[scored].abs().sum(-1) > 0).all()  # every response position contributes
    # the loss is the mean of -log p(response token) over response tokens, computed by hand
    log_probs = F.log_softmax(logits.detach(), dim=-1)
    terms = [-log_probs[b, t, y[b, t]].item() for b, t in zip(*torch.nonzero(scored, as_tuple=True))]
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert math.isfinite(loss.item())


def test_instructions_name_the_hero_and_the_story_sentences_answer_them(examples):
    assert len(examples) > 40
    for example in examples:
        assert example.instruction == (
            f"Write a short story about {'an' if example.kind[0] in 'aeiou' else 'a'} {example.kind} "
            f"named {example.name} who feels {example.mood}."
        )
        assert adherence(example.response, example) == {"kind": True, "name": True, "mood": True}
        assert END_OF_RESPONSE not in example.response
        assert len(format_prompt(example.instruction) + example.response + END_OF_RESPONSE) <= 190
    # the response is made of the story's own sentences: its opening, then the hero feeling the mood
    for story in generate_labelled_stories(20, seed=5):
        example = instruction_example(story)
        if example is None:  # this hero never "felt <mood>" in so many words
            assert not re.search(rf"{story.hero_name} felt (very )?({'|'.join(MOODS)})\b", story.text)
            continue
        opening, feeling = example.response.split(". ", 1)
        assert story.text.startswith(opening + ".") and feeling in story.text
        assert example.name == story.hero_name and example.kind == story.hero_kind
    assert len({e.mood for e in examples}) >= 4 and len({e.kind for e in examples}) >= 5


def test_adherence_checks_whole_words_by_hand():
    example = InstructionExample("...", "...", kind="cat", name="Mia", mood="happy")
    assert adherence("A cat named Mia felt happy.", example) == {"kind": True, "name": True, "mood": True}
    assert adherence("A catfish named Miami felt unhappy.", example) == {
        "kind": False,
        "name": False,
        "mood": False,
    }
    scores = adherence_score(["A cat named Mia felt happy.", "Mia was sad."], [example, example])
    assert scores == {"kind": 0.5, "name": 1.0, "mood": 0.5, "score": pytest.approx(2 / 3), "all": 0.5}
    with pytest.raises(ValueError, match="one answer per example"):
        adherence_score(["x"], [example, example])


def test_batched_answers_equal_one_by_one_greedy_generation(tokenizer, examples):
    torch.manual_seed(1)
    model = GPT(
        GPTConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=1, n_head=2, d_model=32)
    ).eval()
    instructions = [e.instruction for e in examples[:5]]  # different lengths: the batch is right-padded
    assert len({len(i) for i in instructions}) > 1
    answers = generate_responses(model, tokenizer, instructions, max_new_tokens=20)
    for instruction, answer in zip(instructions, answers):
        prompt = torch.tensor([tokenizer.encode(format_prompt(instruction))])
        text = tokenizer.decode(model.generate(prompt, 20, temperature=0)[0, prompt.shape[1] :].tolist())
        assert answer == text.lstrip(END_OF_RESPONSE).split(END_OF_RESPONSE)[0]
    with pytest.raises(ValueError, match="block_size"):
        generate_responses(model, tokenizer, instructions, max_new_tokens=100)


def test_too_long_examples_are_a_clear_error(tokenizer, examples):
    with pytest.raises(ValueError, match="block_size"):
        instruction_batch(examples[:2], tokenizer, block_size=50)
