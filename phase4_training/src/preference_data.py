"""The toy preference task shared by the reward model, DPO and PPO: "make the stories cheerful".

Human preference data is expensive; here the preference is written down, so we can measure how well
each method learns it. Every place in the Phase 3 synthetic stories where a feeling word appears
("... Noah felt sad.") becomes one example:

    prompt      the `prompt_chars` characters before the feeling word    "y began to cry. He was very "
    completion  the feeling word and the character after it              "worried."

A preference pair keeps the prompt and offers two completions that differ only in the feeling:
one positive (happy, glad, proud, excited, thankful) and one negative (sad, upset, worried, unhappy).
The positive one is always `chosen`. Half the time the original story had the negative word, so a
model cannot win by preferring "what the story really said": it has to learn the sentiment of the
word itself (including that "unhappy" is not "happy").

The same preference, as a number, is `sentiment_reward(completion)`: +1 if the completion starts
with a positive feeling word, -1 for a negative one, 0 for anything else. PPO optimises it (or a
reward model trained on the pairs); it is also how we score what a policy generates.

All prompts have exactly `prompt_chars` characters, so a batch of prompts needs no padding;
completions have different lengths, so pairs are right-padded (`pad_batch`) and carry their lengths.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from phase3_components.src.char_tokenizer import CharTokenizer
from phase3_components.src.synthetic_stories import BAD_FEELINGS, GOOD_FEELINGS, generate_stories

FEELING_PATTERN = re.compile(r"\b(" + "|".join(GOOD_FEELINGS + BAD_FEELINGS) + r")\b")
WORD_PATTERN = re.compile(r"\s*([A-Za-z]+)")


@dataclass(frozen=True)
class FeelingExample:
    prompt: str  # exactly prompt_chars characters, ending just before the feeling word
    completion: str  # the feeling word as the story wrote it, plus the next character
    word: str  # the feeling word
    tail: str  # the character after it ("." "," " " ...)
    continuation: str  # the story's next `continuation_chars` characters, from the feeling word on


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str  # completion with a positive feeling word
    rejected: str  # the same completion with a negative feeling word


def story_tokenizer(n_stories: int = 500, seed: int = 0) -> CharTokenizer:
    """A character tokenizer covering the synthetic stories (every story uses the same ~55 characters)."""
    return CharTokenizer.from_text("".join(generate_stories(n_stories, seed=seed)))


def feeling_examples(
    n_stories: int, seed: int = 0, prompt_chars: int = 24, continuation_chars: int = 12
) -> list[FeelingExample]:
    """Every feeling word in `generate_stories(n_stories, seed)` with the text just before and after it."""
    if prompt_chars < 1 or continuation_chars < 10:
        raise ValueError(
            f"need prompt_chars >= 1 and continuation_chars >= 10 (the longest feeling word and one more "
            f"character), got {prompt_chars} and {continuation_chars}"
        )
    examples = []
    for story in generate_stories(n_stories, seed=seed):
        for match in FEELING_PATTERN.finditer(story):
            start, end = match.span()
            if start < prompt_chars or start + continuation_chars > len(story):  # too close to an end
                continue
            prompt, tail = story[start - prompt_chars : start], story[end]
            continuation = story[start : start + continuation_chars]
            examples.append(FeelingExample(prompt, match.group(1) + tail, match.group(1), tail, continuation))
    return examples


def make_preference_pairs(examples: list[FeelingExample], seed: int = 0) -> list[PreferencePair]:
    """One pair per example: the story's own word against a random word of the opposite sentiment."""
    rng = random.Random(seed)
    pairs = []
    for ex in examples:
        if ex.word in GOOD_FEELINGS:
            good, bad = ex.word, rng.choice(BAD_FEELINGS)
        else:
            good, bad = rng.choice(GOOD_FEELINGS), ex.word
        pairs.append(PreferencePair(ex.prompt, good + ex.tail, bad + ex.tail))
    return pairs


def sentiment_reward(completion: str) -> float:
    """+1 if the completion starts with a positive feeling word, -1 if negative, 0 otherwise."""
    match = WORD_PATTERN.match(completion)
    word = match.group(1).lower() if match else ""
    if word in GOOD_FEELINGS:
        return 1.0
    if word in BAD_FEELINGS:
        return -1.0
    return 0.0


def pad_batch(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ids [B, T] (T = longest) and return their lengths [B]."""
    if not sequences:
        raise ValueError("pad_batch got no sequences")
    lengths = torch.tensor([len(s) for s in sequences])  # [B]
    if int(lengths.min()) == 0:
        raise ValueError("pad_batch got an empty sequence; every sequence needs at least one token")
    ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)  # [B, T]
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids, lengths


@dataclass
class EncodedPairs:
    """A batch of preference pairs as tensors. prompt_length is the same for every row."""

    chosen_ids: torch.Tensor  # [B, Tc] prompt + chosen completion, right-padded
    chosen_lengths: torch.Tensor  # [B]
    rejected_ids: torch.Tensor  # [B, Tr]
    rejected_lengths: torch.Tensor  # [B]
    prompt_length: int

    def __len__(self) -> int:
        return self.chosen_ids.shape[0]

    def subset(self, index: torch.Tensor) -> EncodedPairs:
        return EncodedPairs(
            self.chosen_ids[index],
            self.chosen_lengths[index],
            self.rejected_ids[index],
            self.rejected_lengths[index],
            self.prompt_length,
        )


def encode_pairs(pairs: list[PreferencePair], tokenizer: CharTokenizer) -> EncodedPairs:
    prompt_lengths = {len(p.prompt) for p in pairs}
    if len(prompt_lengths) != 1:
        raise ValueError(f"all prompts must have the same length, got lengths {sorted(prompt_lengths)}")
    chosen_ids, chosen_lengths = pad_batch([tokenizer.encode(p.prompt + p.chosen) for p in pairs])
    rejected_ids, rejected_lengths = pad_batch([tokenizer.encode(p.prompt + p.rejected) for p in pairs])
    return EncodedPairs(chosen_ids, chosen_lengths, rejected_ids, rejected_lengths, prompt_lengths.pop())


def language_model_windows(examples: list[FeelingExample], tokenizer: CharTokenizer) -> torch.Tensor:
    """prompt + the story's own continuation, ids [N, prompt_chars + continuation_chars].

    Training a small GPT on these windows gives the "pretrained" (supervised) policy that DPO and PPO
    start from: after a prompt it writes a feeling word, positive or negative as often as the stories do.
    """
    return torch.tensor([tokenizer.encode(ex.prompt + ex.continuation) for ex in examples])
