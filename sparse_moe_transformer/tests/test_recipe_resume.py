"""The new recipe through the CLI: a run with Muon, RoPE, QK-norm, zero-init, soft-cap and the WSD
schedule stopped and resumed reproduces the uninterrupted run; changing --optimizer on resume is refused."""

import json
from pathlib import Path

import pytest

from sparse_moe_transformer.src import cli
from sparse_moe_transformer.src.checkpointing import LATEST_NAME, read_checkpoint

TINY = ["--preset", "cpu-demo"]
for _field in ("n_layer=2", "d_model=32", "n_head=2", "n_expert=4", "top_k=2", "d_ff=64", "block_size=32"):
    TINY += ["--set", _field]
RECIPE = [
    "--set",
    "pos=rope",
    "--set",
    "qk_norm=true",
    "--set",
    "zero_init_proj=true",
    "--set",
    "logit_softcap=15",
]
DATA = ["--dataset", "synthetic", "--synthetic-stories", "300", "--tokenizer", "bpe", "--vocab-size", "512"]


def _argv(out_dir, cache_dir, *extra):
    argv = [
        "--mode", "train", *TINY, *RECIPE, "--set", "dropout=0.1", *DATA, "--cache-dir", cache_dir,
        "--out-dir", out_dir, "--batch-size", 4, "--max-steps", 10, "--warmup-steps", 2, "--max-lr", 5e-3,
        "--optimizer", "muon", "--muon-lr", 0.02, "--lr-schedule", "wsd", "--eval-interval", 0,
        "--log-interval", 1, "--sample-tokens", 0, *extra,
    ]  # fmt: skip
    return [str(a) for a in argv]


def _train_losses(out_dir) -> dict[int, float]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


def test_muon_rope_recipe_resume_reproduces_the_uninterrupted_run(tmp_path, capsys):
    cache = tmp_path / "cache"
    cli.main(_argv(tmp_path / "full", cache))
    full = _train_losses(tmp_path / "full")
    cli.main(_argv(tmp_path / "split", cache, "--stop-at-step", 4))
    ckpt = read_checkpoint(tmp_path / "split" / LATEST_NAME)
    assert ckpt["train_args"]["optimizer"] == "muon" and ckpt["config"]["pos"] == "rope"
    assert any("momentum_buffer" in state for state in ckpt["optimizer"]["state"].values())
    cli.main(_argv(tmp_path / "split", cache, "--resume"))
    split = _train_losses(tmp_path / "split")
    assert sorted(split) == sorted(full) == list(range(1, 11))
    for step in full:
        assert abs(split[step] - full[step]) <= 1e-6, (step, split[step], full[step])
    assert full[10] < full[1]  # it trains

    with pytest.raises(SystemExit) as err:  # the optimizer state cannot change kind on resume
        cli.main(_argv(tmp_path / "split", cache, "--resume", "--max-steps", "12", "--optimizer", "adamw"))
    assert err.value.code == 2
    assert "--optimizer adamw differs from the checkpoint's (muon)" in capsys.readouterr().err
