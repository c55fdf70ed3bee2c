"""Nothing lost, nothing silent: the training CLI under bad input and faults.

Each test is a probe a careless or hostile user made: a run that would fail at its end fails before
its first step; non-finite settings and damaged files give one-line errors; a diverged run never
saves NaN weights; --overwrite, --resume and a second trainer cannot pick the wrong run; a stop
or a resume in another process loses nothing."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparse_moe_transformer.src.train as train
from sparse_moe_transformer.src import checkpointing, cli
from sparse_moe_transformer.src.checkpointing import BEST_NAME, LATEST_NAME, RunFolderLock, read_checkpoint

TRAIN_SCRIPT = Path(train.__file__)
TINY = ["--preset", "tiny", "--dataset", "synthetic", "--synthetic-stories", "200", "--tokenizer", "bpe"]
TINY += ["--vocab-size", "300", "--batch-size", "4", "--warmup-steps", "1", "--sample-tokens", "0"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("faults-cache")


def argv(out_dir, cache_dir, *extra, steps=6):
    return [str(a) for a in ["--mode", "train", *TINY, "--max-steps", steps, "--eval-interval", 3,
                             "--eval-batches", 2, "--log-interval", 1, "--cache-dir", cache_dir,
                             "--out-dir", out_dir, *extra]]  # fmt: skip


def error_of(args, capsys, code=2) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error:"), err
    return err.strip().splitlines()[-1]


def losses(out_dir) -> dict[int, float]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


# ------------------------------------------------------------------ failing before the first step


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-lr", "inf"], "--max-lr must be a finite number > 0, got inf"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
        (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
        (["--grad-clip", "nan"], "--grad-clip must be a finite number"),
        (["--log-interval", "0"], "--log-interval must be a positive integer"),
        (
            ["--set", "capacity_factor=inf"],
            "Config.capacity_factor (None = dropless) must be a finite number",
        ),
        (["--set", "init_std=1e30"], "Config.init_std must be a finite number >= 0 and <= 1"),
        (["--vocab-size", "1000000000"], "more than this trainer supports"),
        (["--vocab-size", "99999999999999999999"], "more than this trainer supports"),
        (["--vocab-size", "1000000"], "exceeds what"),
        (["--sample-tokens", "8", "--sample-prompt", "word " * 200], "--sample-prompt is"),
        (["--seq-len", "33"], "exceeds the model's block_size 32"),
    ],
)
def test_bad_settings_fail_before_any_step(tmp_path, cache_dir, capsys, extra, message):
    err = error_of(argv(tmp_path / "run", cache_dir, *extra), capsys)
    assert message in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran


def test_a_validation_split_shorter_than_one_sequence_fails_before_the_first_step(tmp_path, capsys):
    train_file, valid_file = tmp_path / "train.txt", tmp_path / "valid.txt"
    train_file.write_text(
        "\n\n".join(f"Story {i}: the cat sat on the mat and was happy." for i in range(300))
    )
    valid_file.write_text("A short one.")
    args = ["--mode", "train", "--preset", "tiny", "--data-files", f"{train_file},{valid_file}",
            "--tokenizer", "bpe", "--vocab-size", "300", "--eval-interval", "0", "--max-steps", "50",
            "--cache-dir", tmp_path / "cache", "--out-dir", tmp_path / "run"]  # fmt: skip
    err = error_of([str(a) for a in args], capsys)
    assert "the validation split has" in err and "fewer than one sequence" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_eval_mode_refuses_negative_eval_batches(tmp_path, cache_dir, capsys):
    err = error_of(["--mode", "eval", "--checkpoint", str(tmp_path), "--eval-batches", "-1"], capsys)
    assert "--eval-batches must be a non-negative integer" in err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flag=st.sampled_from(sorted(cli.INT_FLAGS) + sorted(cli.FLOAT_FLAGS)),
    value=st.one_of(
        st.integers(min_value=-(10**25), max_value=10**25),
        st.floats(allow_nan=True, allow_infinity=True),
    ),
)
def test_fuzz_numeric_flags_give_a_value_error_or_pass(flag, value):
    """Any number in any numeric flag: accepted, or refused by a ValueError naming the flag."""
    args = cli.build_parser().parse_args(["--mode", "plan"])
    setattr(args, flag, int(value) if flag in cli.INT_FLAGS and isinstance(value, float) and value == value
            and abs(value) < 1e30 else value)  # fmt: skip
    try:
        cli.check_flags(args)
    except ValueError as err:
        assert f"--{flag.replace('_', '-')}" in str(err)


# ------------------------------------------------------------------ damaged weights never called good


def test_non_finite_weights_are_never_saved_and_the_message_names_the_good_checkpoint(
    tmp_path, cache_dir, capsys, monkeypatch
):
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step_that_poisons(self, *args, **kwargs):  # the update itself writes NaN (a finite loss before)
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:  # step 4 is a save step: the save itself must refuse these weights
            self.param_groups[0]["params"][0].data.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_that_poisons)
    out_dir = tmp_path / "run"
    # --optimizer adamw: the poisoned step is AdamW's (the presets' Muon+AdamW would not call AdamW.step)
    run = argv(out_dir, cache_dir, "--save-interval", 2, "--optimizer", "adamw", steps=8)
    err = error_of(run, capsys, code=3)
    good = read_checkpoint(out_dir / LATEST_NAME)
    assert good["step"] == 3 and all(torch.isfinite(t).all() for t in good["model"].values())
    assert "the weights are not finite; they were not saved" in err and str(out_dir / LATEST_NAME) in err

    calls["n"] = 0  # the same poisoned 4th step, now in a run that saves nothing before it
    early = argv(
        tmp_path / "early", cache_dir, "--save-interval", 0, "--eval-interval", 0, "--optimizer", "adamw"
    )
    err = error_of(early, capsys, 3)
    assert "no checkpoint was saved" in err and not (tmp_path / "early" / LATEST_NAME).exists()


def test_flipped_bytes_in_a_checkpoint_are_caught_by_its_checksum(tmp_path, cache_dir, capsys):
    out_dir = tmp_path / "run"
    cli.main(argv(out_dir, cache_dir))
    data = bytearray((out_dir / LATEST_NAME).read_bytes())
    weights = read_checkpoint(out_dir / LATEST_NAME)["model"]["lm_head.weight"].numpy().tobytes()
    at = bytes(data).index(weights[:64])  # inside the tensor data, where torch.load notices nothing
    data[at : at + 64] = bytes(b ^ 0xFF for b in data[at : at + 64])
    (out_dir / LATEST_NAME).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is damaged: its contents do not match the checksum"):
        read_checkpoint(out_dir / LATEST_NAME)
    err = error_of(argv(out_dir, cache_dir, "--resume", steps=8), capsys)
    assert str(out_dir / LATEST_NAME) in err


# ------------------------------------------------------------------ the wrong run never used


def test_overwrite_deletes_the_previous_runs_checkpoints(tmp_path, cache_dir, capsys):
    out_dir = tmp_path / "run"
    cli.main(argv(out_dir, cache_dir))
    assert (out_dir / BEST_NAME).exists()
    (out_dir / ".tmp-latest.pt-abc123").write_bytes(b"x" * 100)  # left by a save killed with -9
    cli.main(argv(out_dir, cache_dir, "--overwrite", "--eval-interval", 0, "--save-interval", 0, steps=2))
    out = capsys.readouterr().out
    assert "deleted the previous run's latest.pt, best.pt, metrics.jsonl" in out
    assert "removed 1 temporary file" in out and not list(out_dir.glob(".tmp-*"))
    assert read_checkpoint(out_dir / LATEST_NAME)["step"] == 2
    # the old best.pt is gone, so generate/eval cannot pick the previous run's weights
    assert not (out_dir / BEST_NAME).exists() or read_checkpoint(out_dir / BEST_NAME)["step"] == 2


def test_resume_contradictions_are_refused_and_changes_are_said(tmp_path, cache_dir, capsys):
    out_dir = tmp_path / "run"
    cli.main(argv(out_dir, cache_dir, "--stop-at-step", 2))
    capsys.readouterr()
    assert "choose one" in error_of(argv(out_dir, cache_dir, "--resume", "--overwrite"), capsys)
    err = error_of(argv(out_dir, cache_dir, "--resume", "--tokenizer", "gpt2"), capsys)
    assert "--tokenizer gpt2 differs from the checkpoint's tokenizer (bpe)" in err
    err = error_of(argv(out_dir, cache_dir, "--resume", "--vocab-size", "400"), capsys)
    assert "--vocab-size 400 differs" in err
    cli.main(argv(out_dir, cache_dir, "--resume", "--max-lr", "0.002", steps=8))
    out = capsys.readouterr().out
    plan = "lr 0.002, then a linear cool-down towards 0.0003 over steps 6-8"  # wsd: the last 40% of 8 steps
    assert f"changed   on resume, from this step on: max_steps 6 -> 8 (schedule re-planned: {plan}), " in out
    assert "max_lr 0.003 -> 0.002" in out


def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path, cache_dir, capsys):
    out_dir = tmp_path / "run"
    hold = (
        "import sys, time\nfrom sparse_moe_transformer.src.checkpointing import RunFolderLock\n"
        "with RunFolderLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, out_dir], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = error_of(argv(out_dir, cache_dir), capsys)
        assert f"another trainer (pid {holder.pid}) is writing into {out_dir}" in err
    finally:
        holder.kill()
        holder.wait()
    with RunFolderLock(out_dir):  # released when its process died
        pass


# ------------------------------------------------------------------ clear errors, not tracebacks


def test_damaged_and_incomplete_checkpoints_and_files_in_the_way(tmp_path, cache_dir, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "(it is empty)" in error_of(["--mode", "generate", "--checkpoint", str(empty)], capsys)

    out_dir = tmp_path / "run"
    cli.main(argv(out_dir, cache_dir, "--stop-at-step", 2))
    checkpoint = torch.load(out_dir / LATEST_NAME, weights_only=True)
    for key in ("optimizer", "sampler", "rng"):
        del checkpoint[key]
    checkpoint["checksum"] = checkpointing.payload_checksum(checkpoint)
    torch.save(checkpoint, out_dir / LATEST_NAME)
    err = error_of(argv(out_dir, cache_dir, "--resume"), capsys)
    assert "cannot be resumed: it has no optimizer, sampler, rng entries" in err

    checkpoint["config"]["router_type"] = "hash"  # a field this version does not know
    checkpoint["checksum"] = checkpointing.payload_checksum(checkpoint)
    torch.save(checkpoint, tmp_path / "foreign.pt")
    err = error_of(["--mode", "generate", "--checkpoint", str(tmp_path / "foreign.pt")], capsys)
    assert "['router_type']" in err and "newer or foreign version" in err

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "is a file" in error_of(argv(a_file, cache_dir), capsys)


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path, cache_dir, capsys, monkeypatch):
    out_dir = tmp_path / "run"
    cli.main(argv(out_dir, cache_dir, "--stop-at-step", 2))
    real_save = checkpointing.save_checkpoint

    def full_disk(path, *args, **kwargs):
        if Path(path).parent == out_dir:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "save_checkpoint", full_disk)
    err = error_of(argv(out_dir, cache_dir, "--resume"), capsys)
    assert "the disk is full while saving" in err and "the previous latest.pt is kept" in err
    assert read_checkpoint(out_dir / LATEST_NAME)["step"] == 2


def test_an_empty_sample_prompt_starts_from_end_of_text(tmp_path, cache_dir):
    summary = cli.main(
        argv(tmp_path / "run", cache_dir, "--sample-prompt", "", "--sample-tokens", 4, steps=3)
    )
    assert summary["status"] == "finished"


# ------------------------------------------------------------------ stop and resume in other processes


def run_script(*args, **kwargs):
    command = [sys.executable, str(TRAIN_SCRIPT), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def test_stop_and_resume_in_separate_processes_reproduce_the_uninterrupted_run(tmp_path, cache_dir):
    common = ["--set", "dropout=0.1", "--eval-interval", 0, "--save-interval", 0]
    cli.main(argv(tmp_path / "full", cache_dir, *common, steps=40))
    full = losses(tmp_path / "full")

    # (a) --stop-at-step in one process, --resume in another
    first = run_script(*argv(tmp_path / "split", cache_dir, *common, "--stop-at-step", 15, steps=40))
    assert first.returncode == 0, first.stderr
    second = run_script(*argv(tmp_path / "split", cache_dir, *common, "--resume", steps=40))
    assert second.returncode == 0, second.stderr
    split = losses(tmp_path / "split")
    assert sorted(split) == sorted(full) and max(abs(split[s] - full[s]) for s in full) <= 1e-6

    # (b) SIGINT a running process, then --resume in a new one
    out_dir = tmp_path / "sigint"
    proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *argv(out_dir, cache_dir, *common, steps=40)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while not ((out_dir / "metrics.jsonl").exists() and len(losses(out_dir)) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    stopped_at = read_checkpoint(out_dir / LATEST_NAME)["step"]
    assert stopped_at < 40
    resumed = run_script(*argv(out_dir, cache_dir, *common, "--resume", steps=40))
    assert resumed.returncode == 0, resumed.stderr
    after = losses(out_dir)
    assert sorted(after) == sorted(full) and max(abs(after[s] - full[s]) for s in full) <= 1e-6
