"""The training loop: accumulation == big batch, exact resume, clipping bounds the norm, precision."""

import random

import numpy as np
import pytest
import torch

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase2_architecture.src.training_utils import make_adamw
from phase3_components.src.char_tokenizer import CharTokenizer
from phase3_components.src.gradient_clipping import global_grad_norm
from phase3_components.src.lr_schedules import warmup_cosine_lr
from phase3_components.src.synthetic_stories import generate_stories
from phase3_components.src.text_data import get_random_batch
from phase4_training.src.training_loop import (
    TrainingConfig,
    autocast_context,
    capture_rng_state,
    resolve_precision,
    restore_rng_state,
    train,
    train_step,
)

BLOCK = 16


@pytest.fixture(scope="module")
def story_tokens():
    text = "\n\n".join(generate_stories(60, seed=0))
    tokenizer = CharTokenizer.from_text(text)
    ids = np.array(tokenizer.encode(text), dtype=np.int64)
    split = int(0.9 * len(ids))
    return tokenizer.vocab_size, ids[:split], ids[split:]


def tiny_gpt(vocab_size: int, dropout: float = 0.0, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(
        GPTConfig(vocab_size=vocab_size, block_size=BLOCK, n_layer=2, n_head=2, d_model=32, dropout=dropout)
    )


def batches_from_global_rng(train_ids, val_ids, batch_size=4):
    """get_batch drawing from the global torch RNG, like nanoGPT's."""
    return lambda split: get_random_batch(train_ids if split == "train" else val_ids, batch_size, BLOCK)


def test_gradient_accumulation_equals_one_big_batch(story_tokens):
    vocab, train_ids, _ = story_tokens
    g = torch.Generator().manual_seed(0)
    micro = [get_random_batch(train_ids, 3, BLOCK, generator=g) for _ in range(4)]  # 4 x ([3, T], [3, T])
    big = (torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro]))  # [12, T]

    model_acc, model_big = tiny_gpt(vocab), tiny_gpt(vocab)
    opt_acc, opt_big = make_adamw(model_acc, 1e-3), make_adamw(model_big, 1e-3)
    feed = iter(micro)
    out_acc = train_step(model_acc, opt_acc, lambda split: next(feed), grad_accum_steps=4)
    out_big = train_step(model_big, opt_big, lambda split: big, grad_accum_steps=1)

    assert out_acc["loss"] == pytest.approx(out_big["loss"], rel=1e-5)
    assert out_acc["grad_norm"] == pytest.approx(out_big["grad_norm"], rel=1e-4)
    for (name, p_acc), p_big in zip(model_acc.named_parameters(), model_big.parameters()):
        torch.testing.assert_close(p_acc.grad, p_big.grad, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(p_acc, p_big, rtol=0, atol=1e-5, msg=name)
    # and the step did something: the parameters moved away from the initial ones
    assert not torch.equal(model_acc.lm_head.weight, tiny_gpt(vocab).lm_head.weight)


def test_gradient_accumulation_without_dividing_by_k_would_differ(story_tokens):
    """The same comparison catches a loop that forgets loss / k (the gradient would be k times larger)."""
    vocab, train_ids, _ = story_tokens
    x, y = get_random_batch(train_ids, 3, BLOCK, generator=torch.Generator().manual_seed(1))
    model_two, model_one = tiny_gpt(vocab), tiny_gpt(vocab)
    train_step(model_two, make_adamw(model_two, 1e-3), lambda split: (x, y), grad_accum_steps=2)
    train_step(model_one, make_adamw(model_one, 1e-3), lambda split: (x, y), grad_accum_steps=1)
    # two micro-batches of the same data == one: the gradient of the mean, not of the sum
    torch.testing.assert_close(
        model_two.lm_head.weight.grad, model_one.lm_head.weight.grad, rtol=1e-5, atol=1e-7
    )


class Interrupted(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run_exactly(story_tokens, tmp_path):
    vocab, train_ids, val_ids = story_tokens
    get_batch = batches_from_global_rng(train_ids, val_ids)

    def config(path):
        return TrainingConfig(
            max_steps=8,
            max_lr=3e-3,
            warmup_steps=2,
            grad_accum_steps=2,
            eval_interval=3,
            eval_batches=2,
            checkpoint_path=str(path),
            save_interval=4,
        )

    # 1. uninterrupted; dropout > 0 so the result depends on the random-number state as well
    model = tiny_gpt(vocab, dropout=0.1)
    torch.manual_seed(123)
    full = train(model, get_batch, config(tmp_path / "full.pt"))

    # 2. the same run, crashing during step 5 (after the checkpoint at step 4)
    calls = {"n": 0}

    def crashing_get_batch(split):
        if crashed_model.training:  # a training micro-batch (evaluation runs in eval mode)
            calls["n"] += 1
            if calls["n"] > 4 * 2:  # 4 steps x 2 micro-batches, then the machine "dies"
                raise Interrupted
        return get_batch(split)

    crashed_model = tiny_gpt(vocab, dropout=0.1)
    torch.manual_seed(123)
    with pytest.raises(Interrupted):
        train(crashed_model, crashing_get_batch, config(tmp_path / "run.pt"))

    # 3. a fresh process: different initial weights and RNG state, resumed from the checkpoint
    resumed_model = tiny_gpt(vocab, dropout=0.1, seed=99)
    torch.manual_seed(0)
    resumed = train(resumed_model, get_batch, config(tmp_path / "run.pt"), resume=True)

    assert [r["loss"] for r in resumed["train"]] == [r["loss"] for r in full["train"]]
    assert resumed["eval"] == full["eval"]
    assert [r["step"] for r in full["eval"]] == [0, 3, 6, 8]
    for p_full, p_resumed in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p_full, p_resumed)


def test_resume_without_checkpoint_is_a_clear_error(story_tokens, tmp_path):
    vocab, train_ids, val_ids = story_tokens
    cfg = TrainingConfig(max_steps=2, checkpoint_path=str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny_gpt(vocab), batches_from_global_rng(train_ids, val_ids), cfg, resume=True)


def test_checkpoint_loads_safely_with_everything_resume_needs(story_tokens, tmp_path):
    vocab, train_ids, val_ids = story_tokens
    path = tmp_path / "ckpt.pt"
    train(
        tiny_gpt(vocab),
        batches_from_global_rng(train_ids, val_ids),
        TrainingConfig(max_steps=3, checkpoint_path=str(path)),
    )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["step"] == 3
    assert {"model", "optimizer", "scaler", "rng", "history", "training_config"} <= set(checkpoint)
    assert len(checkpoint["optimizer"]["state"]) > 0  # Adam moments are saved
    assert not list(tmp_path.glob(".tmp-*"))  # the atomic write left no temporary file


def test_rng_state_round_trip():
    np.random.randn()  # leave a cached Gaussian in numpy's state, and in Python's
    random.gauss(0, 1)
    state = capture_rng_state()
    draw = lambda: (torch.rand(3), np.random.randn(3), random.gauss(0, 1), random.random())
    first = draw()
    restore_rng_state(state)
    second = draw()
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2:] == second[2:]


def test_clipping_bounds_the_gradient_norm(story_tokens):
    vocab, train_ids, _ = story_tokens
    batch = get_random_batch(train_ids, 4, BLOCK, generator=torch.Generator().manual_seed(2))
    # without clipping: the norm reported is the norm of the gradients left in .grad
    model = tiny_gpt(vocab)
    out = train_step(model, make_adamw(model, 1e-3), lambda split: batch, grad_clip=0.0)
    unclipped = out["grad_norm"]
    assert float(global_grad_norm(model.parameters())) == pytest.approx(unclipped, rel=1e-5)
    # with a max_norm well below it: the returned (pre-clip) norm is unchanged, the gradients are bounded
    max_norm = unclipped / 10
    model = tiny_gpt(vocab)
    out = train_step(model, make_adamw(model, 1e-3), lambda split: batch, grad_clip=max_norm)
    assert out["grad_norm"] == pytest.approx(unclipped, rel=1e-5)
    assert float(global_grad_norm(model.parameters())) <= max_norm * (1 + 1e-5)
    assert float(global_grad_norm(model.parameters())) == pytest.approx(
        max_norm, rel=1e-4
    )  # rescaled, not zeroed


def test_zero_means_off_as_on_the_moe_command_line(story_tokens):
    """grad_clip=0 clips nothing; eval_interval=0 evaluates once, at the end; an interval evaluates at 0,
    every interval and at the end."""
    vocab, train_ids, val_ids = story_tokens
    get_batch = batches_from_global_rng(train_ids, val_ids)
    steps_evaluated = {}
    for interval in (0, 2):
        torch.manual_seed(0)
        config = TrainingConfig(max_steps=5, eval_interval=interval, eval_batches=1, grad_clip=0.0)
        history = train(tiny_gpt(vocab), get_batch, config)
        steps_evaluated[interval] = [record["step"] for record in history["eval"]]
    assert steps_evaluated == {0: [5], 2: [0, 2, 4, 5]}
    # grad_clip=0: the update is the unclipped one (a tiny clip would change it)
    batch = get_random_batch(train_ids, 4, BLOCK, generator=torch.Generator().manual_seed(3))
    weights = []
    for clip in (0.0, 1e6, 1e-3):
        model = tiny_gpt(vocab)
        train_step(model, make_adamw(model, 1e-2), lambda split: batch, grad_clip=clip)
        weights.append(model.lm_head.weight.detach().clone())
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_schedule_and_training_reduce_the_loss(story_tokens):
    vocab, train_ids, val_ids = story_tokens
    torch.manual_seed(0)
    cfg = TrainingConfig(
        max_steps=40, max_lr=1e-2, min_lr=1e-3, warmup_steps=5, eval_interval=20, eval_batches=4
    )
    history = train(tiny_gpt(vocab), batches_from_global_rng(train_ids, val_ids, batch_size=16), cfg)
    lrs = [r["lr"] for r in history["train"]]
    assert lrs == [
        warmup_cosine_lr(s, max_lr=1e-2, min_lr=1e-3, warmup_steps=5, total_steps=40) for s in range(40)
    ]
    assert lrs[4] == 1e-2 and max(lrs) == pytest.approx(1e-2)  # warmup ends at max_lr ...
    assert all(a >= b - 1e-12 for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 1.1e-3  # ... then decays
    first, last = history["eval"][0], history["eval"][-1]
    assert last["val"] < first["val"] - 0.8  # from ~log(vocab) = 4 towards character statistics


def test_precision_choice_and_bf16_autocast_on_cpu(story_tokens):
    assert resolve_precision("auto", "cpu") is None
    assert resolve_precision("fp32", "cuda") is None
    assert resolve_precision("bf16", "cpu") is torch.bfloat16
    assert resolve_precision("fp16", "cpu") is torch.float16  # CPU autocast + GradScaler("cpu") exist
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainingConfig(max_steps=1, precision="fp8")

    vocab, train_ids, val_ids = story_tokens
    x, y = get_random_batch(train_ids, 4, BLOCK, generator=torch.Generator().manual_seed(3))
    model = tiny_gpt(vocab)
    with autocast_context("cpu", torch.bfloat16):
        logits, loss_bf16 = model(x, y)
    assert logits.dtype == torch.bfloat16  # the matmuls really ran in bf16
    _, loss_fp32 = model(x, y)
    assert loss_bf16.item() != loss_fp32.item() and abs(loss_bf16.item() - loss_fp32.item()) < 0.05

    losses, models = {}, {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        models[precision] = tiny_gpt(vocab)
        cfg = TrainingConfig(max_steps=5, precision=precision)
        history = train(models[precision], batches_from_global_rng(train_ids, val_ids), cfg)
        losses[precision] = [r["loss"] for r in history["train"]]
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], abs=0.05)
    assert all(np.isfinite(losses["bf16"]))
    assert all(p.dtype == torch.float32 for p in models["bf16"].parameters())  # master weights stay fp32


def test_config_validation_messages():
    with pytest.raises(ValueError, match="max_steps"):
        TrainingConfig(max_steps=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainingConfig(max_steps=5, warmup_steps=6)
    with pytest.raises(ValueError, match=r"no clipping. must be a finite number >= 0, got None"):
        TrainingConfig(max_steps=5, grad_clip=None)
    with pytest.raises(ValueError, match=r"no clipping. must be a finite number >= 0, got -1.0"):
        TrainingConfig(max_steps=5, grad_clip=-1.0)
    with pytest.raises(ValueError, match="checkpoint_path"):
        TrainingConfig(max_steps=5, save_interval=2)
    with pytest.raises(ValueError, match="min_lr"):
        TrainingConfig(max_steps=5, max_lr=1e-3, min_lr=1e-2)
    config = TrainingConfig(max_steps=5)  # no warmup, min_lr defaults to max_lr / 10
    assert config.lr_at(0) == 1e-3 and config.lr_at(5) == pytest.approx(1e-4)
