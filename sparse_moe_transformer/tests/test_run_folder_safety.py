"""Nothing lost, nothing silent in a run folder: a diverged run never saves NaN weights; damaged, foreign
or incomplete checkpoints and a full disk give one-line errors and keep the last good checkpoint;
--overwrite and a second trainer cannot pick the wrong run; a stop or a resume in another process
repeats the uninterrupted run. (The `argv`, `error_of` and `losses` fixtures are in conftest.py.)"""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sparse_moe_transformer.src.train as train
from sparse_moe_transformer.src import checkpointing, cli, runtime
from sparse_moe_transformer.src.checkpointing import BEST_NAME, LATEST_NAME, RunFolderLock, read_checkpoint

TRAIN_SCRIPT = Path(train.__file__)


def test_non_finite_weights_are_never_saved_and_the_message_names_the_good_checkpoint(
    tmp_path, cache_dir, capsys, monkeypatch, argv, error_of
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


def test_flipped_bytes_in_a_checkpoint_are_caught_by_its_checksum(
    tmp_path, cache_dir, capsys, argv, error_of
):
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


def test_overwrite_deletes_the_previous_runs_checkpoints(tmp_path, cache_dir, capsys, argv):
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


def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path, cache_dir, capsys, argv, error_of):
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


def test_damaged_and_incomplete_checkpoints_and_files_in_the_way(tmp_path, cache_dir, capsys, argv, error_of):
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


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(
    tmp_path, cache_dir, capsys, monkeypatch, argv, error_of
):
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


def run_script(*args, **kwargs):
    command = [sys.executable, str(TRAIN_SCRIPT), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def test_stop_and_resume_in_separate_processes_reproduce_the_uninterrupted_run(
    tmp_path, cache_dir, argv, losses
):
    # Newton-Schulz in fp32 in both runs: "auto" times matmuls in each launch and two independent launches
    # may decide differently (a resumed run reuses its first launch's decision: the next test)
    common = ["--set", "dropout=0.1", "--eval-interval", 0, "--save-interval", 0, "--ns-dtype", "fp32"]
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


def test_a_resumed_run_keeps_the_dtypes_its_first_launch_chose(tmp_path, cache_dir, argv):
    """--precision and --ns-dtype "auto" are decided once, by timing matmuls in the first launch; the
    checkpoint keeps the decision, so a resume (whose timings may differ) computes in the same dtypes."""
    out_dir = tmp_path / "run"
    cli.main(argv(out_dir, cache_dir, "--stop-at-step", 2, "--eval-interval", 0, steps=4))
    saved = read_checkpoint(out_dir / LATEST_NAME)["train_args"]
    assert saved["precision"] == "fp32" and saved["ns_dtype"] in ("fp32", "bf16", "fp16")
    other = "fp32" if saved["ns_dtype"] != "fp32" else "bf16"
    # a resume on a machine where "auto" would choose differently still uses the saved dtype
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            "sparse_moe_transformer.src.runtime.choose_newton_schulz_dtype",
            lambda requested, device, _real=runtime.choose_newton_schulz_dtype: _real(
                other if requested == "auto" else requested, device
            ),
        )
        cli.main(argv(out_dir, cache_dir, "--resume", "--eval-interval", 0, steps=4))
    assert read_checkpoint(out_dir / LATEST_NAME)["train_args"]["ns_dtype"] == saved["ns_dtype"]
