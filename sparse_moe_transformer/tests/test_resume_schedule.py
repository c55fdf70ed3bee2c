"""A resumed run never makes its learning rate jump: a --max-steps (or other schedule shape) change that
would move the next step's lr is refused with the fix; one that keeps it (a wsd run extended before its
cool-down) is re-planned and announced; a --max-steps below the step reached is an error."""

import json

import pytest

from sparse_moe_transformer.src import cli
from sparse_moe_transformer.src.checkpointing import LATEST_NAME, read_checkpoint

MAX_LR, MIN_LR = 3e-3, 3e-4
FAST = ["--preset", "tiny", "--dataset", "synthetic", "--synthetic-stories", "50", "--tokenizer", "bpe",
        "--vocab-size", "300", "--batch-size", "2", "--warmup-steps", "1", "--eval-interval", "0",
        "--log-interval", "1", "--sample-tokens", "0", "--max-lr", MAX_LR, "--min-lr", MIN_LR,
        "--cooldown-frac", "0.4"]  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("schedule-cache")


def _train(out_dir, cache_dir, *extra):
    argv = ["--mode", "train", *FAST, "--cache-dir", cache_dir, "--out-dir", out_dir, *extra]
    return cli.main([str(a) for a in argv])


def _error(out_dir, cache_dir, capsys, *extra) -> str:
    with pytest.raises(SystemExit) as info:
        _train(out_dir, cache_dir, *extra)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err


def _lrs(out_dir) -> dict[int, float]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["lr"] for r in map(json.loads, lines) if r["kind"] == "train"}


def test_a_longer_max_steps_inside_the_wsd_cool_down_is_refused(tmp_path, cache_dir, capsys):
    # wsd over 10 steps: the cool-down is the last 4 (steps 7-10); stopped at 8, the lr has decayed
    out_dir = tmp_path / "run"
    _train(out_dir, cache_dir, "--lr-schedule", "wsd", "--max-steps", 10, "--stop-at-step", 8)
    decayed = _lrs(out_dir)[8]
    assert MIN_LR < decayed < MAX_LR
    capsys.readouterr()
    err = _error(out_dir, cache_dir, capsys, "--lr-schedule", "wsd", "--resume", "--max-steps", 20)
    assert "--max-steps 20 on resume would move the learning rate" in err and "keep --max-steps 10" in err
    assert "cool-down starts at step 7" in err
    assert read_checkpoint(out_dir / LATEST_NAME)["step"] == 8  # refused before any step


def test_a_max_steps_below_the_step_reached_is_an_error(tmp_path, cache_dir, capsys):
    out_dir = tmp_path / "run"
    _train(out_dir, cache_dir, "--lr-schedule", "wsd", "--max-steps", 10, "--stop-at-step", 8)
    capsys.readouterr()
    err = _error(out_dir, cache_dir, capsys, "--resume", "--max-steps", 5)
    assert (
        "--max-steps 5 is below the step this run has reached (8)" in err and "--max-steps 8 or more" in err
    )
    err = _error(out_dir, cache_dir, capsys, "--resume", "--stop-at-step", 8)
    assert "--stop-at-step 8 is not after the step this run has reached (8)" in err


def test_a_wsd_run_extended_before_its_cool_down_is_re_planned_and_announced(tmp_path, cache_dir, capsys):
    out_dir = tmp_path / "run"
    _train(out_dir, cache_dir, "--lr-schedule", "wsd", "--max-steps", 10, "--stop-at-step", 3)
    capsys.readouterr()
    _train(out_dir, cache_dir, "--lr-schedule", "wsd", "--resume", "--max-steps", 20)
    out = capsys.readouterr().out
    # 20 steps, the last 8 (13-20) are the cool-down, which starts from the peak
    plan = "lr 0.003, then a linear cool-down towards 0.0003 over steps 13-20"
    assert f"max_steps 10 -> 20 (schedule re-planned: {plan})" in out
    lrs = _lrs(out_dir)
    assert sorted(lrs) == list(range(1, 21))
    assert all(lrs[i] == MAX_LR for i in range(2, 14))  # the stable phase continues where it was
    assert all(lrs[i + 1] <= lrs[i] for i in range(2, 20))  # never back up after the warmup
    assert lrs[14] < MAX_LR and lrs[20] > MIN_LR  # step 20 runs at the last lr before min_lr


@pytest.mark.parametrize("change", [["--max-steps", 20], ["--warmup-steps", 3]], ids=["max-steps", "warmup"])
def test_a_cosine_run_refuses_a_new_schedule_shape_after_its_warmup(tmp_path, cache_dir, capsys, change):
    out_dir = tmp_path / "run"
    _train(out_dir, cache_dir, "--lr-schedule", "cosine", "--max-steps", 10, "--stop-at-step", 4)
    capsys.readouterr()
    err = _error(out_dir, cache_dir, capsys, "--lr-schedule", "cosine", "--resume", *change)
    assert f"{change[0]} {change[1]} on resume would move the learning rate of step 5" in err
    assert "keep" in err and "new --out-dir" in err
