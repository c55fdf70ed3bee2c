"""Instruction fine-tuning (rasbt's LLMs-from-scratch, chapter 7): teach a story model to follow a request.

A pretrained model continues text; it does not *answer*. Instruction fine-tuning trains it on
(instruction, response) pairs written in one fixed prompt format, here Alpaca's:

    ### Instruction:
    Write a short story about a girl named Mia who feels sad.

    ### Response:
    Once upon a time, there was a shy girl named Mia. Mia felt very sad.<newline>

Loss on the response only. The model reads the whole text, but only the response's tokens (and the
newline that ends it, so the model learns to stop) are scored. With inputs x = ids[:-1] and
targets y = ids[1:] (position t predicts token t + 1), a target is set to -100, which the GPT's
cross-entropy ignores, wherever it is a token of the prompt or padding:

    y[t] = -100   for t < len(prompt) - 1        (predicting the instruction: not the task)
    y[t] = -100   for t >= len(text) - 1          (right padding)

so the loss is the mean of -log p(response token | everything before it) over response tokens only.

The data comes from the synthetic stories, which know their hero: `instruction_examples` turns each
story whose hero "felt <mood>" into a request naming the hero's kind, name and mood, and a response
made of two sentences of that story: the opening one, which introduces the hero ("... a shy girl
named Mia"), and the one where the hero feels the mood. `adherence` checks an answer automatically:
does it name the kind of hero, the name, and use the mood word?
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from phase3_components.src.synthetic_stories import (
    BAD_FEELINGS,
    GOOD_FEELINGS,
    LabelledStory,
    generate_labelled_stories,
    with_article,
)

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
END_OF_RESPONSE = "\n"  # responses are one line: the newline after it says "done"
MOODS = GOOD_FEELINGS + BAD_FEELINGS


@dataclass(frozen=True)
class InstructionExample:
    instruction: str
    response: str
    kind: str  # what the answer must name: "girl", "fox", ...
    name: str
    mood: str


def format_prompt(instruction: str) -> str:
    return PROMPT_TEMPLATE.format(instruction=instruction)


# ----------------------------------------------------------------------------------------------
# Data from the stories
# ----------------------------------------------------------------------------------------------

_SENTENCE = re.compile(r"[^.!?]*[.!?]")


def _sentences(paragraph: str) -> list[str]:
    """Sentences ending in . ! or ? (a closing quote left at the start of the next one is dropped)."""
    return [s.strip().removeprefix('"').strip() for s in _SENTENCE.findall(paragraph)]


def instruction_example(story: LabelledStory) -> InstructionExample | None:
    """The request and two-sentence answer for one story, or None if its hero never "felt <mood>"."""
    feeling = re.compile(rf"\b{story.hero_name} felt (?:very )?({'|'.join(MOODS)})\b")
    opening = _sentences(story.paragraphs[0])[0]
    for sentence in _sentences(story.text.replace("\n\n", " ")):
        match = feeling.search(sentence)
        if match and '"' not in sentence:
            mood = match.group(1)
            instruction = (
                f"Write a short story about {with_article(story.hero_kind)} named {story.hero_name} "
                f"who feels {mood}."
            )
            return InstructionExample(
                instruction, f"{opening} {sentence}", story.hero_kind, story.hero_name, mood
            )
    return None


def instruction_examples(n_stories: int, seed: int, max_chars: int = 190) -> list[InstructionExample]:
    """Examples from the stories of `generate_labelled_stories(n_stories, seed)` whose hero felt a mood.

    Keeps those whose prompt + response + END has at most `max_chars` characters (a small model's window).
    """
    examples = [instruction_example(story) for story in generate_labelled_stories(n_stories, seed=seed)]
    return [
        e
        for e in examples
        if e is not None and len(format_prompt(e.instruction) + e.response + END_OF_RESPONSE) <= max_chars
    ]


# ----------------------------------------------------------------------------------------------
# Batches with the response-only loss
# ----------------------------------------------------------------------------------------------


def encode_example(example: InstructionExample, tokenizer) -> tuple[list[int], int]:
    """(token ids of prompt + response + END, number of prompt tokens)."""
    prompt = tokenizer.encode(format_prompt(example.instruction))
    response = tokenizer.encode(example.response + END_OF_RESPONSE)
    return prompt + response, len(prompt)


def instruction_batch(
    examples: list[InstructionExample], tokenizer, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x [B, T] and targets y [B, T] with -100 on the prompt's and the padding's targets."""
    encoded = [encode_example(e, tokenizer) for e in examples]
    longest = max(len(ids) for ids, _ in encoded)
    if longest - 1 > block_size:
        raise ValueError(
            f"an example has {longest} tokens, more than block_size + 1 = {block_size + 1}; "
            "use a model with a longer context or shorter examples"
        )
    T = longest - 1
    x = torch.zeros(len(examples), T, dtype=torch.long)  # right padding with id 0 (never scored)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, (ids, prompt_length) in enumerate(encoded):
        ids = torch.tensor(ids)
        x[b, : len(ids) - 1] = ids[:-1]
        y[b, : len(ids) - 1] = ids[1:]  # position t predicts token t + 1
        y[b, : prompt_length - 1] = -100  # the instruction is context, not something to learn to write
    return x, y


def train_instructions(
    model: nn.Module,
    examples: list[InstructionExample],
    tokenizer,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Full fine-tuning with AdamW on random batches; the GPT's loss ignores the -100 targets."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        index = torch.randint(0, len(examples), (batch_size,), generator=generator).tolist()
        x, y = instruction_batch([examples[i] for i in index], tokenizer, model.config.block_size)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------
# Answering and scoring
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_responses(
    model: nn.Module, tokenizer, instructions: list[str], max_new_tokens: int = 100
) -> list[str]:
    """Greedy answers to every instruction, in one right-padded batch.

    An answer ends at the first END_OF_RESPONSE after some text (newlines before any text are skipped,
    so a model that has never seen the format still gets to say something).

    Row b has its own length n_b: each step runs the batch and reads the logits at position n_b - 1
    (causal attention: the padding after it cannot change them), then writes the new token at n_b.
    """
    prompts = [tokenizer.encode(format_prompt(i)) for i in instructions]
    block_size = model.config.block_size
    if max(len(p) for p in prompts) + max_new_tokens > block_size:
        raise ValueError(f"prompt + max_new_tokens exceeds block_size {block_size}; lower max_new_tokens")
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])  # [B]
    ids = torch.zeros(B, int(lengths.max()) + max_new_tokens, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    end_id = tokenizer.encode(END_OF_RESPONSE)[0]
    done = torch.zeros(B, dtype=torch.bool)
    started = torch.zeros(B, dtype=torch.bool)  # has the row written anything but END yet?
    rows = torch.arange(B)
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        logits, _ = model(ids[:, : int(lengths.max())])  # [B, T, V]
        next_ids = logits[rows, lengths - 1].argmax(-1)  # [B]
        next_ids = torch.where(done, torch.zeros_like(next_ids), next_ids)
        ids[rows, lengths] = next_ids
        lengths = lengths + (~done).long()
        done |= (next_ids == end_id) & started
        started |= next_ids != end_id
        if bool(done.all()):
            break
    model.train(was_training)
    answers = []
    for b, p in enumerate(prompts):
        text = tokenizer.decode(ids[b, len(p) : int(lengths[b])].tolist())
        answers.append(text.lstrip(END_OF_RESPONSE).split(END_OF_RESPONSE)[0])
    return answers


def adherence(answer: str, example: InstructionExample) -> dict[str, bool]:
    """Does the answer name the kind of hero, the name, and use the mood (as whole words)?"""
    has = lambda word: re.search(rf"\b{re.escape(word)}\b", answer) is not None
    return {"kind": has(example.kind), "name": has(example.name), "mood": has(example.mood)}


def adherence_score(answers: list[str], examples: list[InstructionExample]) -> dict[str, float]:
    """Fraction of answers meeting each check, their mean ("score") and all three at once ("all")."""
    if len(answers) != len(examples) or not answers:
        raise ValueError(f"need one answer per example, got {len(answers)} answers for {len(examples)}")
    checks = [adherence(a, e) for a, e in zip(answers, examples)]
    result = {key: sum(c[key] for c in checks) / len(checks) for key in ("kind", "name", "mood")}
    result["score"] = (result["kind"] + result["name"] + result["mood"]) / 3
    result["all"] = sum(all(c.values()) for c in checks) / len(checks)
    return result
