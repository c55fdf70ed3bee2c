"""Checkpoints that never lose work: exact resume, Ctrl-C saves and exits, a NaN loss stops cleanly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sparse_moe_transformer.src.train as train
from sparse_moe_transformer.src import cli, run_config
from sparse_moe_transformer.src.checkpointing import LATEST_NAME, read_checkpoint

TRAIN_SCRIPT = Path(train.__file__)
TINY = ["--preset", "cpu-demo"]
for _field in ("n_layer=2", "d_model=32", "n_head=2", "n_expert=4", "top_k=2", "d_ff=64", "block_size=32"):
    TINY += ["--set", _field]
DATA = ["--dataset", "synthetic", "--synthetic-stories", "300", "--tokenizer", "bpe", "--vocab-size", "512"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("resume-cache")


def _argv(out_dir, cache_dir, *extra):
    # dropout 0.1 (the preset's) is on: resume must restore the dropout RNG stream, and the data
    # order (sampler position), not only the weights
    argv = [
        "--mode",
        "train",
        *TINY,
        "--set",
        "dropout=0.1",
        *DATA,
        "--cache-dir",
        cache_dir,
        "--out-dir",
        out_dir,
        "--batch-size",
        4,
        "--max-steps",
        10,
        "--warmup-steps",
        2,
        "--max-lr",
        5e-3,
        "--eval-interval",
        0,
        "--log-interval",
        1,
        "--sample-tokens",
        0,
        *extra,
    ]
    return [str(a) for a in argv]


def _train_losses(out_dir) -> dict[int, float]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


def test_resume_reproduces_the_uninterrupted_run(tmp_path, cache_dir, monkeypatch):
    cli.main(_argv(tmp_path / "full", cache_dir))
    full = _train_losses(tmp_path / "full")

    summary = cli.main(_argv(tmp_path / "split", cache_dir, "--stop-at-step", 4))
    assert summary["status"] == "stopped" and read_checkpoint(tmp_path / "split" / LATEST_NAME)["step"] == 4
    torch.manual_seed(1234)  # disturb the global RNGs: the checkpoint must restore them
    cli.main(_argv(tmp_path / "split", cache_dir, "--resume"))
    split = _train_losses(tmp_path / "split")
    assert sorted(split) == sorted(full) == list(range(1, 11))
    for step in full:
        assert abs(split[step] - full[step]) <= 1e-6, (step, split[step], full[step])
    # train_time_s (seconds of optimizer steps) is stored in the checkpoint and carries on after resume
    records = [json.loads(r) for r in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    times = [r["train_time_s"] for r in records if r["kind"] == "train"]
    assert len(times) == 10 and all(b > a > 0 for a, b in zip(times, times[1:]))
    assert read_checkpoint(tmp_path / "split" / LATEST_NAME)["train_time_s"] == times[-1]

    # Control: the same resume without restoring the RNG states drifts (dropout masks differ), so
    # the comparison above really checks the restored state.
    cli.main(_argv(tmp_path / "norng", cache_dir, "--stop-at-step", 4))
    monkeypatch.setattr(run_config, "restore_rng_state", lambda state: None)
    torch.manual_seed(1234)
    cli.main(_argv(tmp_path / "norng", cache_dir, "--resume"))
    drift = _train_losses(tmp_path / "norng")
    assert max(abs(drift[s] - full[s]) for s in range(5, 11)) > 1e-4


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir, monkeypatch, capsys):
    real_forward = train.SparseMoETransformer.forward
    calls = {"n": 0}

    def forward_that_breaks(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 6:  # the 6th training step's loss becomes NaN
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(train.SparseMoETransformer, "forward", forward_that_breaks)
    with pytest.raises(SystemExit) as info:
        cli.main(_argv(tmp_path / "nan", cache_dir, "--save-interval", 2))
    assert info.value.code == 3
    err = capsys.readouterr().err
    assert "not finite" in err and "step 6" in err and "last good checkpoint" in err
    ckpt = read_checkpoint(tmp_path / "nan" / LATEST_NAME)
    assert ckpt["step"] == 4  # saved at step 4; step 6 never updated the weights
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    monkeypatch.setattr(train.SparseMoETransformer, "forward", real_forward)
    summary = cli.main(_argv(tmp_path / "nan", cache_dir, "--resume"))  # and the run continues from it
    assert summary["status"] == "finished" and summary["step"] == 10


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, cache_dir):
    out_dir = tmp_path / "sigint"
    argv = _argv(out_dir, cache_dir, "--max-steps", 100000, "--save-interval", 0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN_SCRIPT), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    metrics = out_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        while not (metrics.exists() and metrics.read_text().count('"train"') >= 2):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "training did not start within 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output  # saved, but not finished: the conventional Ctrl-C exit code
    assert "interrupted at step" in output and "Traceback" not in output
    ckpt = read_checkpoint(out_dir / LATEST_NAME)
    assert ckpt["step"] == max(_train_losses(out_dir))  # saved after the last completed step
    assert ckpt["sampler"]["index"] == ckpt["step"]  # with the data position of that step


def test_a_checkpoint_written_by_the_previous_version_still_resumes(tmp_path, cache_dir):
    """The previous version wrote no checksum, named the fields n_layers/n_heads/n_experts/max_len and
    lr/grad_accum/block_size, and (before that) had no attn_dropout, whose default (None: the same as
    dropout) is the old behaviour: such a checkpoint resumes under today's names."""
    cli.main(_argv(tmp_path, cache_dir, "--stop-at-step", 4))
    path = tmp_path / LATEST_NAME
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    del checkpoint["checksum"], checkpoint["config"]["attn_dropout"]
    old_config = {
        "n_layer": "n_layers",
        "n_head": "n_heads",
        "n_expert": "n_experts",
        "block_size": "max_len",
    }
    old_settings = {"max_lr": "lr", "grad_accum_steps": "grad_accum", "seq_len": "block_size"}
    for entry, names in (("config", old_config), ("train_args", old_settings)):
        checkpoint[entry] = {names.get(k, k): v for k, v in checkpoint[entry].items()}
    torch.save(checkpoint, path)
    summary = cli.main(_argv(tmp_path, cache_dir, "--resume"))
    assert summary["status"] == "finished"
    assert sorted(_train_losses(tmp_path)) == list(range(1, 11))
    assert read_checkpoint(path)["config"]["attn_dropout"] is None


def test_fp16_with_a_grad_scaler_resumes_exactly_with_its_scale(tmp_path, cache_dir):
    """fp16 autocast + torch.amp.GradScaler("cpu") (the T1000's precision, run on the CPU): the scaler's
    state (its scale and growth tracker) is saved and restored, so the resumed run repeats the losses."""
    fp16 = ("--precision", "fp16")
    cli.main(_argv(tmp_path / "full", cache_dir, *fp16))
    cli.main(_argv(tmp_path / "split", cache_dir, *fp16, "--stop-at-step", 4))
    scaler = read_checkpoint(tmp_path / "split" / LATEST_NAME)["scaler"]
    assert scaler["scale"] > 1 and "_growth_tracker" in scaler
    cli.main(_argv(tmp_path / "split", cache_dir, *fp16, "--resume"))
    full, split = _train_losses(tmp_path / "full"), _train_losses(tmp_path / "split")
    assert sorted(split) == sorted(full) == list(range(1, 11))
    assert max(abs(split[s] - full[s]) for s in full) <= 1e-6
    # the scaler continued from its saved state: the same scale and steps-since-overflow as the full run
    ends = [read_checkpoint(tmp_path / run / LATEST_NAME)["scaler"] for run in ("full", "split")]
    assert ends[0] == ends[1] and ends[0]["_growth_tracker"] == 10
