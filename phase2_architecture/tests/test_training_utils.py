"""Training loop learns; LR schedule applied; checkpoints round-trip exactly and are written atomically."""

import dataclasses
import os

import pytest
import torch

from phase1_foundation.src.primitives import Embedding, Linear
from phase2_architecture.src import training_utils
from phase2_architecture.src.gpt import GPT, GPTConfig
from phase2_architecture.src.mixture_of_experts import MoEConfig, MoELanguageModel
from phase2_architecture.src.training_utils import (
    estimate_loss,
    load_checkpoint,
    make_adamw,
    read_checkpoint_file,
    save_checkpoint,
    train_model,
    warmup_cosine,
    weight_decay_groups,
)

CONFIG = GPTConfig(vocab_size=11, block_size=12, n_layer=2, n_head=2, d_model=32)


def make_get_batch(seed=0, batch_size=8):
    """Batches cut from a periodic sequence 0 1 2 ... 10 0 1 2 ...: the next token is fully predictable."""
    data = torch.arange(400) % 11
    g = torch.Generator().manual_seed(seed)

    def get_batch(split):
        offset = 0 if split == "train" else 200
        starts = torch.randint(0, 200 - 13, (batch_size,), generator=g) + offset
        x = torch.stack([data[s : s + 12] for s in starts])
        y = torch.stack([data[s + 1 : s + 13] for s in starts])
        return x, y

    return get_batch


def test_train_model_learns_and_follows_the_lr_schedule():
    torch.manual_seed(0)
    model = GPT(CONFIG)
    get_batch = make_get_batch()
    before = estimate_loss(model, get_batch, eval_batches=4)
    history = train_model(
        model,
        get_batch,
        steps=60,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=10,
        eval_interval=30,
        eval_batches=4,
        progress=False,
    )
    assert len(history) == 60
    assert [h["step"] for h in history] == list(range(60))
    for h in history:
        expected = warmup_cosine(h["step"], 3e-3, 3e-4, warmup_steps=10, steps=60)
        assert h["lr"] == pytest.approx(expected)
    assert "val_loss" in history[0] and "val_loss" in history[30] and "val_loss" in history[-1]
    assert "val_loss" not in history[1]
    assert history[-1]["val_loss"] < 0.3 * before["val"]  # a predictable sequence is learned
    assert before.keys() == {"train", "val"}


def test_warmup_cosine_schedule_by_hand():
    lr, min_lr, warmup, steps = 1.0, 0.1, 4, 14
    assert warmup_cosine(0, lr, min_lr, warmup, steps) == pytest.approx(0.25)  # (0 + 1) / 4
    assert warmup_cosine(3, lr, min_lr, warmup, steps) == pytest.approx(1.0)  # warmup ends at lr
    assert warmup_cosine(4, lr, min_lr, warmup, steps) == pytest.approx(1.0)  # the cosine starts at lr
    assert warmup_cosine(9, lr, min_lr, warmup, steps) == pytest.approx(0.55)  # halfway: (lr + min_lr) / 2
    assert warmup_cosine(14, lr, min_lr, warmup, steps) == pytest.approx(0.1)  # min_lr at the end
    assert warmup_cosine(0, 1.0, 0.0, 0, 10) == 1.0  # no warmup


def test_grad_clip_bounds_the_update():
    """With plain SGD (lr 1) the update IS the clipped gradient: its norm must equal grad_clip."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_get_batch(seed=2)("train")
    model(x, y)[1].backward()  # the unclipped gradient norm, computed independently
    true_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()
    model.zero_grad(set_to_none=True)

    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    history = train_model(
        model, make_get_batch(seed=2), steps=1, lr=1.0, grad_clip=1e-2, optimizer=sgd, progress=False
    )
    assert true_norm > 1e-2  # so clipping is active
    assert history[0]["grad_norm"] == pytest.approx(true_norm, rel=1e-4)  # reported: norm before clipping
    update = torch.sqrt(sum((p.detach() - b).pow(2).sum() for p, b in zip(model.parameters(), before)))
    assert update.item() == pytest.approx(1e-2, rel=1e-3)


def test_zero_is_off_for_grad_clip_and_eval_interval():
    """grad_clip=0: the SGD (lr 1) update is the whole gradient; eval_interval=0: one evaluation, the last."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_get_batch(seed=2)("train")
    model(x, y)[1].backward()
    true_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()
    model.zero_grad(set_to_none=True)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    train_model(model, make_get_batch(seed=2), steps=1, lr=1.0, grad_clip=0, optimizer=sgd, progress=False)
    update = torch.sqrt(sum((p.detach() - b).pow(2).sum() for p, b in zip(model.parameters(), before)))
    assert update.item() == pytest.approx(true_norm, rel=1e-4)

    evaluated = {}
    for interval in (0, 2):
        history = train_model(GPT(CONFIG), make_get_batch(), steps=5, lr=1e-3, eval_interval=interval,
                              eval_batches=1, progress=False)  # fmt: skip
        evaluated[interval] = [h["step"] for h in history if "val_loss" in h]
    assert evaluated == {0: [4], 2: [0, 2, 4]}
    with pytest.raises(ValueError, match="no clipping. must be a finite number >= 0, got None"):
        train_model(GPT(CONFIG), make_get_batch(), steps=1, lr=1e-3, grad_clip=None)


def decayed_names(model, groups) -> set[str]:
    decayed = {id(p) for p in groups[0]["params"]}
    return {name for name, p in model.named_parameters() if id(p) in decayed}


def test_weight_decay_groups_decay_matmul_weights_only_in_gpt_moe_and_tied_models():
    # Named by hand: every matrix an input is multiplied by, and nothing else.
    gpt = GPT(CONFIG)
    groups = weight_decay_groups(gpt, 0.1)
    projections = [f"attn.{m}_proj" for m in ("q", "k", "v", "out")] + ["ffn.up_proj", "ffn.down_proj"]
    expected = {f"blocks.{i}.{m}.weight" for i in range(CONFIG.n_layer) for m in projections}
    expected.add("lm_head.weight")
    assert decayed_names(gpt, groups) == expected  # no embeddings, norm gains or biases
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(gpt.parameters()))

    moe = MoELanguageModel(
        MoEConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, d_model=16, n_expert=2, top_k=1, d_ff=24)
    )
    moe_groups = weight_decay_groups(moe, 0.1)
    attention = {f"blocks.0.attn.{m}_proj.weight" for m in ("q", "k", "v", "out")}
    experts = {"blocks.0.moe.w1", "blocks.0.moe.w2", "blocks.0.moe.gate.weight"}  # b1, b2 are [E, F] biases
    assert decayed_names(moe, moe_groups) == attention | experts | {"lm_head.weight"}

    tied = GPT(dataclasses.replace(CONFIG, tie_weights=True))  # the table is also the head's matmul weight
    assert "tok_emb.weight" in decayed_names(tied, weight_decay_groups(tied, 0.1))
    assert "pos_emb.weight" not in decayed_names(tied, weight_decay_groups(tied, 0.1))

    from_primitives = torch.nn.Sequential(Embedding(11, 8), Linear(8, 11))  # Phase 1's own modules
    assert decayed_names(from_primitives, weight_decay_groups(from_primitives, 0.1)) == {"1.weight"}


def test_weight_decay_groups_leave_out_excluded_and_frozen_parameters():
    model = GPT(CONFIG)
    model.tok_emb.weight.requires_grad_(False)
    muon = [block.attn.q_proj.weight for block in model.blocks]  # updated by another optimizer
    groups = weight_decay_groups(model, 0.1, exclude=muon)
    listed = {id(p) for g in groups for p in g["params"]}
    assert not listed & {id(p) for p in muon} and id(model.tok_emb.weight) not in listed
    assert len(listed) == len(list(model.parameters())) - len(muon) - 1
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0, got -0.1"):
        weight_decay_groups(model, -0.1)


def test_make_adamw_uses_the_weight_decay_groups():
    model = GPT(CONFIG)
    opt = make_adamw(model, lr=1e-3, weight_decay=0.1)
    expected = weight_decay_groups(model, 0.1)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [
        [id(p) for p in g["params"]] for g in expected
    ]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_estimate_loss_restores_training_mode_and_is_deterministic_in_eval():
    model = GPT(GPTConfig(vocab_size=11, block_size=12, n_layer=1, n_head=2, d_model=16, dropout=0.5))
    model.train()
    a = estimate_loss(model, make_get_batch(seed=1), eval_batches=3)
    b = estimate_loss(model, make_get_batch(seed=1), eval_batches=3)
    assert a == b  # same batches, no dropout in eval
    assert model.training


def test_checkpoint_round_trip_restores_outputs_optimizer_and_future_training(tmp_path):
    torch.manual_seed(0)
    model = GPT(CONFIG)
    opt = make_adamw(model, lr=1e-3)
    train_model(model, make_get_batch(), steps=5, lr=1e-3, optimizer=opt, progress=False)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, opt, step=5, config=dataclasses.asdict(CONFIG), note="hello")

    torch.manual_seed(123)
    restored = GPT(CONFIG)
    restored_opt = make_adamw(restored, lr=1e-3)
    info = load_checkpoint(path, restored, restored_opt)
    assert info["step"] == 5 and info["note"] == "hello" and GPTConfig(**info["config"]) == CONFIG

    x, _ = make_get_batch(seed=9)("val")
    assert torch.equal(model(x)[0], restored(x)[0])
    for key, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(
                torch.as_tensor(value), torch.as_tensor(restored_opt.state_dict()["state"][key][name])
            )
    # One more identical step on both gives identical parameters (moments and step count restored).
    for m, o in ((model, opt), (restored, restored_opt)):
        train_model(m, make_get_batch(seed=4), steps=1, lr=1e-3, optimizer=o, progress=False)
    for p, q in zip(model.parameters(), restored.parameters()):
        assert torch.equal(p, q)


def test_crash_mid_write_leaves_old_checkpoint_loadable(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = GPT(CONFIG)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, step=1)
    good = {k: v.clone() for k, v in model.state_dict().items()}

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the disk, then the process "dies"
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(training_utils.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, step=2)
    monkeypatch.undo()

    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    fresh = GPT(CONFIG)
    assert load_checkpoint(path, fresh)["step"] == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, good[k])


def test_load_errors_are_clear(tmp_path):
    model = GPT(CONFIG)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt", model)
    corrupt = tmp_path / "corrupt.pt"
    save_checkpoint(corrupt, model)
    corrupt.write_bytes(corrupt.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(corrupt, model)
    path = tmp_path / "ok.pt"
    save_checkpoint(path, model)
    other = GPT(dataclasses.replace(CONFIG, d_model=64))
    with pytest.raises(ValueError, match="does not match this model"):
        load_checkpoint(path, other)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(path, model, make_adamw(model, 1e-3))
    with_opt = tmp_path / "with_opt.pt"
    save_checkpoint(with_opt, model, make_adamw(model, 1e-3))
    single_group = torch.optim.AdamW(model.parameters(), lr=1e-3)  # 1 param group instead of 2
    with pytest.raises(ValueError, match="does not match this optimizer"):
        load_checkpoint(with_opt, model, single_group)
    with pytest.raises(TypeError, match="dataclasses.asdict"):
        save_checkpoint(path, model, config=CONFIG)


UNPICKLED = []  # what an object's __setstate__ appends when a reader lets the file run code


class RunsCodeWhenUnpickled:
    def __setstate__(self, state):
        UNPICKLED.append(state)


def test_the_one_reader_runs_no_code_from_the_file_and_names_empty_and_foreign_files(tmp_path):
    evil = tmp_path / "evil.pt"
    obj = RunsCodeWhenUnpickled()
    obj.x = 1  # a non-empty state: unpickling calls __setstate__
    torch.save({"model": {}, "extra": obj}, evil)
    with pytest.raises(ValueError, match="not a readable checkpoint.*retrain it") as err:
        read_checkpoint_file(evil, remedy="retrain it")
    assert UNPICKLED == [] and len(str(err.value).splitlines()) == 1
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(evil, GPT(CONFIG))  # load_checkpoint reads through it
    assert UNPICKLED == []
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"\(it is empty\)"):
        read_checkpoint_file(empty)
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="holds a Tensor, not a checkpoint dict"):
        read_checkpoint_file(tmp_path / "tensor.pt")
    saved = tmp_path / "ok.pt"
    save_checkpoint(saved, GPT(CONFIG), step=3)
    checkpoint = read_checkpoint_file(saved)
    assert checkpoint["step"] == 3 and all(t.device.type == "cpu" for t in checkpoint["model"].values())


def test_train_model_rejects_bad_arguments():
    model = GPT(CONFIG)
    with pytest.raises(ValueError, match="steps"):
        train_model(model, make_get_batch(), steps=0, lr=1e-3)
    with pytest.raises(ValueError, match="warmup_steps"):
        train_model(model, make_get_batch(), steps=5, lr=1e-3, warmup_steps=10)
    with pytest.raises(ValueError, match="min_lr"):
        train_model(model, make_get_batch(), steps=5, lr=1e-3, min_lr=1.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_load_refuses_non_finite_weights_and_leaves_the_model_untouched(tmp_path, value):
    torch.manual_seed(0)
    saved = GPT(CONFIG)
    with torch.no_grad():
        saved.blocks[1].ffn.down_proj.weight[2, 5] = value
    path = tmp_path / "diverged.pt"
    save_checkpoint(path, saved)
    target = GPT(CONFIG)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(training_utils.NonFiniteWeightsError, match=r"blocks\.1\.ffn\.down_proj") as err:
        load_checkpoint(path, target)
    assert str(path) in str(err.value) and len(str(err.value).splitlines()) == 1
    for k, v in target.state_dict().items():  # refused before any weight was copied in
        assert torch.equal(v, before[k]), k
