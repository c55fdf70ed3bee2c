"""Small character-level GPTs trained in seconds, for the Phase 5 notebooks, benchmarks and server demo.

Everything in this phase (KV cache, quantization, speculative decoding, serving) is about running
a *trained* model, and a randomly initialised GPT predicts an almost uniform distribution, which
would hide every effect worth seeing (a draft that agrees with its target, a perplexity that a
quantization error could hurt). So this module trains the Phase 2 `GPT` with Phase 2's
`train_model` on Phase 3's offline children's-story corpus:

    corpus = story_corpus()                       train / held-out text and a CharTokenizer for both
    model = train_char_gpt(corpus, d_model=64, n_layer=2, steps=150)

A few hundred steps on a CPU give a model that writes story-like words; enough for the lessons.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase2_architecture.src.training_utils import train_model
from phase3_components.src.bpe_tokenizer import BPETokenizer
from phase3_components.src.char_tokenizer import CharTokenizer
from phase3_components.src.synthetic_stories import generate_stories
from phase3_components.src.text_data import get_random_batch


@dataclass
class StoryCorpus:
    """Training and held-out text (different stories) with one CharTokenizer covering both."""

    train_text: str
    val_text: str
    tokenizer: CharTokenizer | BPETokenizer

    @property
    def train_ids(self) -> np.ndarray:
        return np.array(self.tokenizer.encode(self.train_text), dtype=np.int64)

    @property
    def val_ids(self) -> np.ndarray:
        return np.array(self.tokenizer.encode(self.val_text), dtype=np.int64)


def story_corpus(
    n_train: int = 400, n_val: int = 40, seed: int = 0, bpe_vocab_size: int | None = None
) -> StoryCorpus:
    """The first n_train generated stories for training, the next n_val held out.

    The tokenizer is a CharTokenizer, or with `bpe_vocab_size` Phase 3's byte-level BPE trained on the
    training text (about 3 characters per token on the stories: a model sees 3x more text per position).
    `train_char_gpt` trains on whichever the corpus holds.
    """
    if n_train < 1 or n_val < 1:
        raise ValueError(f"n_train and n_val must be positive, got {n_train} and {n_val}.")
    stories = generate_stories(n_train + n_val, seed=seed)
    train_text = "\n\n".join(stories[:n_train])
    val_text = "\n\n".join(stories[n_train:])
    if bpe_vocab_size is not None:
        return StoryCorpus(train_text, val_text, BPETokenizer.train(train_text, bpe_vocab_size))
    return StoryCorpus(train_text, val_text, CharTokenizer.from_text(train_text + val_text))


def train_char_gpt(
    corpus: StoryCorpus,
    *,
    d_model: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    block_size: int = 128,
    steps: int = 150,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> GPT:
    """A GPT trained for `steps` AdamW steps on corpus.train_ids, returned in eval mode."""
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=corpus.tokenizer.vocab_size,
        block_size=block_size,
        n_layer=n_layer,
        n_head=n_head,
        d_model=d_model,
    )
    model = GPT(config)
    train_ids, val_ids = corpus.train_ids, corpus.val_ids
    generator = torch.Generator().manual_seed(seed)

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = train_ids if split == "train" else val_ids
        return get_random_batch(ids, batch_size, block_size, generator=generator)

    train_model(
        model, get_batch, steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=steps // 10, progress=False
    )
    return model.eval()
