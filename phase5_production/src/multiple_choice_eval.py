"""Multiple-choice evaluation, scored the way HellaSwag is scored for language models.

A HellaSwag item is a context and four endings, one of them right. A language model never picks
an answer letter here: it *scores* each ending by how likely it finds it after the context,

    log p(ending | context) = sum over the ending's tokens e_j of  log p(e_j | context, e_<j)

and the prediction is the ending with the best score. Longer endings collect more negative terms,
so the raw sum favours short endings; benchmarks therefore also report a length-normalised score:

    "none"   sum                                    (lm-eval-harness "acc")
    "token"  sum / number of ending tokens          (llm.c's and nanoGPT-style "acc_norm")
    "char"   sum / number of ending characters      (lm-eval-harness "acc_norm"; tokenizer-independent)

All endings of one item are scored in one forward pass: rows [context + ending_i], right-padded to
the longest; causality means the padding after a row's last real token cannot change its scores.
A context longer than the model's window is cropped from the left (the ending is always kept whole).

    examples = story_multiple_choice(200, seed=1)            # built-in: from the synthetic stories
    examples = load_hellaswag_jsonl("hellaswag_val.jsonl")   # the real file, if you have it
    result = evaluate_multiple_choice(model, tokenizer, examples)   # {"acc_none", "acc_token", ...}

`model` may be the Phase 2 GPT (returns (logits, loss)), the production MoE or a Hugging Face model
(return an object with `.logits`): `model_logits` is the one adapter.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from phase2_architecture.src.gpt import GPT
from phase3_components.src.synthetic_stories import PLOT_NAMES, generate_labelled_stories
from phase4_training.src.log_probs import completion_mask, token_log_probs

NORMALIZATIONS = ("none", "token", "char")


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class MultipleChoiceExample:
    context: str
    endings: tuple[str, ...]
    label: int  # index of the right ending
    separator: str = " "  # written between context and ending: " " in HellaSwag, "\n\n" between paragraphs

    def __post_init__(self):
        if len(self.endings) < 2:
            raise ValueError(f"a multiple-choice example needs at least 2 endings, got {len(self.endings)}")
        if not 0 <= self.label < len(self.endings):
            raise ValueError(f"label {self.label} is not an index into {len(self.endings)} endings")


# ----------------------------------------------------------------------------------------------
# One adapter for every model
# ----------------------------------------------------------------------------------------------


def model_logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """idx [B, T] -> logits [B, T, V]: Phase 2 GPT ((logits, loss)), the MoE and HF models (.logits)."""
    out = model(idx)
    if isinstance(out, tuple):  # Phase 2 GPT: (logits, loss)
        out = out[0]
    if hasattr(out, "logits"):  # the MoE's MoEOutput, Hugging Face's CausalLMOutput
        out = out.logits
    return out


def context_window(model: nn.Module) -> int:
    """The longest sequence the model accepts (our GPT and MoE: block_size, HF GPT-2: n_positions)."""
    config = getattr(model, "config", None)
    for name in ("block_size", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(
        f"cannot find the context length of {type(model).__name__}: expected model.config.block_size "
        "or n_positions"
    )


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndingScores:
    log_prob: torch.Tensor  # [N] sum of log p over each ending's tokens
    n_tokens: torch.Tensor  # [N]
    n_chars: torch.Tensor  # [N]

    def normalized(self, normalization: str) -> torch.Tensor:
        if normalization == "none":
            return self.log_prob
        if normalization == "token":
            return self.log_prob / self.n_tokens
        if normalization == "char":
            return self.log_prob / self.n_chars
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


@torch.no_grad()
def score_endings(
    model: nn.Module,
    tokenizer: Tokenizer,
    context: str,
    endings: tuple[str, ...] | list[str],
    separator: str = " ",
) -> EndingScores:
    """log p(separator + ending | context) for every ending, in one padded forward pass.

    The ending is encoded separately, with its separator (" " as in llm.c's HellaSwag), so that a
    BPE tokenizer gives it the same tokens as a word in running text.
    """
    window = context_window(model)
    context_ids = tokenizer.encode(context)
    rows, prompt_lengths, n_chars = [], [], []
    for ending in endings:
        ending_ids = tokenizer.encode(separator + ending)
        if not ending_ids:
            raise ValueError(f"ending {ending!r} encodes to no tokens")
        if len(ending_ids) >= window:
            raise ValueError(
                f"ending {ending!r} has {len(ending_ids)} tokens, the model's window is {window}: "
                "it cannot be scored after any context; use a model with a longer context"
            )
        kept_context = context_ids[-(window - len(ending_ids)) :]  # crop the context from the left
        if not kept_context:
            raise ValueError(
                "the context encodes to no tokens: the first ending token needs something before it"
            )
        rows.append(kept_context + ending_ids)
        prompt_lengths.append(len(kept_context))
        n_chars.append(len(separator + ending))
    T = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)  # right padding with id 0: never scored
    for i, row in enumerate(rows):
        idx[i, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(r) for r in rows])  # [N]
    prompt_lengths = torch.tensor(prompt_lengths)  # [N]

    was_training = model.training
    model.eval()
    try:
        logits = model_logits(model, idx)  # [N, T, V]
    finally:
        model.train(was_training)
    per_token = token_log_probs(logits, idx)  # [N, T-1]: log p(idx[:, j+1] | idx[:, :j+1])
    mask = completion_mask(lengths, prompt_lengths, T)  # [N, T-1]: True on the ending's tokens
    return EndingScores(
        log_prob=(per_token * mask).sum(dim=-1),
        n_tokens=mask.sum(dim=-1),
        n_chars=torch.tensor(n_chars),
    )


def evaluate_multiple_choice(
    model: nn.Module, tokenizer: Tokenizer, examples: list[MultipleChoiceExample]
) -> dict[str, float]:
    """Accuracy under each normalization: {"acc_none", "acc_token", "acc_char", "n", "chance"}."""
    if not examples:
        raise ValueError("no examples to evaluate")
    correct = dict.fromkeys(NORMALIZATIONS, 0)
    for example in examples:
        scores = score_endings(model, tokenizer, example.context, example.endings, example.separator)
        for normalization in NORMALIZATIONS:
            correct[normalization] += int(scores.normalized(normalization).argmax()) == example.label
    n = len(examples)
    result = {f"acc_{k}": v / n for k, v in correct.items()}
    result.update(n=n, chance=sum(1 / len(e.endings) for e in examples) / n)
    return result


# ----------------------------------------------------------------------------------------------
# Tasks: the built-in story task and the HellaSwag file format
# ----------------------------------------------------------------------------------------------


def story_multiple_choice(n_examples: int, seed: int = 0, n_endings: int = 4) -> list[MultipleChoiceExample]:
    """A HellaSwag-like task from the synthetic stories.

    context: a story's beginning and problem paragraphs. Right ending: the first sentence of its own
    ending paragraph. Wrong endings: the first sentences of the ending paragraphs of stories with
    *other plots*, with their hero's name replaced by this hero's name, so each wrong ending is
    fluent, in the style of the corpus, about the right character, and does not follow from the
    problem ("They used some glue, ..." after a story about rain). Each wrong ending comes from a
    different plot, and no two endings are the same text.
    """
    if n_examples < 1 or not 2 <= n_endings <= len(PLOT_NAMES):
        raise ValueError(
            f"need n_examples >= 1 and 2 <= n_endings <= {len(PLOT_NAMES)} (one plot per ending), "
            f"got {n_examples} and {n_endings}"
        )
    stories = generate_labelled_stories(n_examples + 200, seed=seed)  # the first n, then a pool of others
    rng = random.Random(seed)
    examples = []
    pool = stories[n_examples:]
    for story in stories[:n_examples]:
        beginning, problem, ending = story.paragraphs
        endings, plots = [first_sentence(ending)], {story.plot}
        for other in rng.sample(pool, len(pool)):  # wrong endings: each from a different plot, all distinct
            wrong = first_sentence(other.paragraphs[2]).replace(other.hero_name, story.hero_name)
            if other.plot not in plots and wrong not in endings:
                endings.append(wrong)
                plots.add(other.plot)
            if len(endings) == n_endings:
                break
        order = rng.sample(range(n_endings), n_endings)  # shuffle; remember where the right one went
        examples.append(
            MultipleChoiceExample(
                context=beginning + "\n\n" + problem,
                endings=tuple(endings[i] for i in order),
                label=order.index(0),
                separator="\n\n",
            )
        )
    return examples


def first_sentence(paragraph: str) -> str:
    """The paragraph up to the first '.', '!' or '?' that ends a sentence outside quotation marks.

    '"Don't worry. I will help you look," said Ben. They looked ...' -> '"Don't worry. ... look," said Ben.'
    'Ben said, "Let's go!" Then ...' -> 'Ben said, "Let's go!"'
    """
    in_quote = False
    for i, ch in enumerate(paragraph):
        at_end = i + 1 == len(paragraph) or paragraph[i + 1] == " "
        if ch == '"':
            in_quote = not in_quote
            if not in_quote and at_end and paragraph[i - 1] in ".!?":  # a quote closing a sentence
                return paragraph[: i + 1]
        elif ch in ".!?" and not in_quote and at_end:
            return paragraph[: i + 1]
    return paragraph


def load_hellaswag_jsonl(path: str | Path) -> list[MultipleChoiceExample]:
    """Read a HellaSwag-layout JSONL file: one JSON object per line with "ctx", "endings" and "label".

    That is the layout of hellaswag_{train,val}.jsonl (github.com/rowanz/hellaswag/tree/master/data);
    the test split hides its labels, so score the validation split.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; download hellaswag_val.jsonl from github.com/rowanz/hellaswag (data/) "
            "and pass its path"
        )
    examples = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            missing = [
                key for key in ("ctx", "endings", "label") if key not in item or item[key] in ("", None)
            ]
            if missing:
                raise ValueError(
                    f"{path}:{line_number}: missing {missing}; each line needs ctx, endings and label "
                    "(the test split has no labels: use the validation split)"
                )
            examples.append(MultipleChoiceExample(item["ctx"], tuple(item["endings"]), int(item["label"])))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Score a model on the built-in story task, or GPT-2 on a HellaSwag-layout file."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hellaswag", default=None, help="a HellaSwag-layout .jsonl (scored with GPT-2)")
    parser.add_argument("--model", default="gpt2", help="GPT-2 hub name or local folder (with --hellaswag)")
    parser.add_argument("--limit", type=int, default=200, help="number of examples to score")
    parser.add_argument("--steps", type=int, default=400, help="training steps of the story demo model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.hellaswag:
        from phase4_training.src.gpt2_weights import load_pretrained_gpt2

        examples = load_hellaswag_jsonl(args.hellaswag)[: args.limit]
        model, tokenizer = load_pretrained_gpt2(args.model)
        result = evaluate_multiple_choice(model, tokenizer, examples)
        print(f"{args.model} on {args.hellaswag}: {result}")
        return result
    from phase5_production.src.demo_models import story_corpus, train_char_gpt

    corpus = story_corpus(n_train=1000, bpe_vocab_size=768)  # BPE: a 96-token window holds the problem
    examples = story_multiple_choice(args.limit, seed=1)
    trained = train_char_gpt(corpus, block_size=96, steps=args.steps)
    torch.manual_seed(0)
    untrained = GPT(trained.config).eval()
    for name, model in (("untrained", untrained), (f"trained {args.steps} steps", trained)):
        result = evaluate_multiple_choice(model, corpus.tokenizer, examples)
        print(f"{name:>20}: " + "  ".join(f"{k} {v:.3f}" for k, v in result.items() if k.startswith("acc")))
    return result


if __name__ == "__main__":
    main()
