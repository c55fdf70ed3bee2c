"""TrainSettings and the learning-rate schedule: the defaults are the recipe, a checkpoint written before a
setting existed resumes with the value it trained with, the wsd schedule's shape, and bad values refused."""

from dataclasses import asdict, fields

import pytest

from sparse_moe_transformer.src.run_config import merge_settings
from sparse_moe_transformer.src.train import PRESETS, preset_config
from sparse_moe_transformer.src.train_settings import SAVED_BEFORE_RECIPE, TrainSettings, lr_at

BASE = dict(
    batch_size=2, grad_accum_steps=1, seq_len=8, max_steps=100, max_lr=1e-3, min_lr=1e-4, warmup_steps=10
)


def test_the_defaults_are_the_recipe_and_every_preset_trains_with_it():
    s = TrainSettings(**BASE)
    assert (s.optimizer, s.lr_schedule, s.muon_lr) == ("muon", "wsd", 0.02)
    for name, preset in PRESETS.items():
        merged = merge_settings(name, None, {}, preset_config(name))
        assert (merged.optimizer, merged.lr_schedule) == ("muon", "wsd"), name
        assert merged.seq_len == preset.model.block_size  # the model's context unless --seq-len


def test_a_checkpoint_from_before_the_recipe_resumes_with_what_it_trained_with():
    recipe_fields = set(SAVED_BEFORE_RECIPE)
    old = {k: v for k, v in asdict(TrainSettings(**BASE)).items() if k not in recipe_fields}
    old["lr"] = old.pop("max_lr")  # the first checkpoints' name for it
    s = merge_settings("cpu-demo", old, {}, preset_config("cpu-demo"))
    assert (s.optimizer, s.lr_schedule, s.max_lr) == ("adamw", "cosine", 1e-3)
    # a checkpoint that has the fields keeps its own values
    s = merge_settings("cpu-demo", asdict(TrainSettings(**BASE)), {}, preset_config("cpu-demo"))
    assert (s.optimizer, s.lr_schedule) == ("muon", "wsd")
    # the flags given win over both
    s = merge_settings("cpu-demo", old, {"optimizer": None, "max_lr": 5e-4}, preset_config("cpu-demo"))
    assert (s.optimizer, s.max_lr) == ("adamw", 5e-4)


def test_merge_reads_every_field_from_the_preset_then_the_checkpoint_then_the_flags():
    names = {f.name for f in fields(TrainSettings)}
    preset = PRESETS["cpu-demo"].training
    assert set(preset) <= names  # a misspelt preset value would be dropped silently
    saved = {**asdict(merge_settings("cpu-demo", None, {}, preset_config("cpu-demo"))), "batch_size": 3}
    s = merge_settings("cpu-demo", saved, {"max_steps": 7, "warmup_steps": 2}, preset_config("cpu-demo"))
    assert (s.batch_size, s.max_steps, s.warmup_steps, s.max_lr) == (3, 7, 2, preset["max_lr"])


def test_wsd_schedule_warms_up_holds_then_decays_linearly_to_min_lr():
    s = TrainSettings(**BASE, lr_schedule="wsd", cooldown_frac=0.4)
    lrs = [lr_at(step, s) for step in range(101)]
    assert lrs[0] < lrs[5] < lrs[10] == pytest.approx(1e-3)
    assert all(lr == pytest.approx(1e-3) for lr in lrs[10:60])  # stable until the last 40 steps
    assert lrs[80] == pytest.approx(1e-3 + (1e-4 - 1e-3) * 20 / 40)  # halfway down the cool-down
    assert lrs[100] == pytest.approx(1e-4) and lrs[99] > lrs[100]
    cosine = TrainSettings(**{**asdict(s), "lr_schedule": "cosine"})
    assert lr_at(50, cosine) < 1e-3  # the cosine decays from the end of the warmup on


def test_bad_values_are_refused_with_the_flag_named():
    with pytest.raises(ValueError, match="--optimizer"):
        TrainSettings(**BASE, optimizer="sgd")
    with pytest.raises(ValueError, match="--lr-schedule"):
        TrainSettings(**BASE, lr_schedule="step")
    with pytest.raises(ValueError, match="--warmup-steps"):
        TrainSettings(**{**BASE, "warmup_steps": 101})
