"""Two gloo ranks launched by hand (RANK / WORLD_SIZE, as torchrun sets them): ranks given different
data stop before the first step with one line on every rank; a rank that stops answering ends the
other one within --dist-timeout with one line naming it; evaluation lines are printed once, by rank 0."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import sparse_moe_transformer.src.train as train
from sparse_moe_transformer.src import cli
from sparse_moe_transformer.src.cli import EXIT_RANK_STOPPED
from sparse_moe_transformer.src.rank_checks import RankHeartbeat

TRAIN_SCRIPT = Path(train.__file__)
FAST = ["--mode", "train", "--preset", "tiny", "--tokenizer", "bpe", "--vocab-size", "300",
        "--batch-size", "2", "--warmup-steps", "0", "--eval-batches", "1", "--sample-tokens", "0",
        "--device", "cpu"]  # fmt: skip
SYNTHETIC = ["--dataset", "synthetic", "--synthetic-stories", "50"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(argv_of_rank: list[list]) -> list[subprocess.Popen]:
    """One process per rank with the environment torchrun would give it; rank 0 hosts the store."""
    port = str(_free_port())
    procs = []
    for rank, argv in enumerate(argv_of_rank):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(len(argv_of_rank))}  # fmt: skip
        cmd = [sys.executable, str(TRAIN_SCRIPT), *map(str, argv)]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def _finish(procs, timeout=120) -> list[tuple[int, str, str]]:
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results.append((proc.returncode, out, err))
    return results


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A token cache filled once in this process, so the ranks below only read it."""
    cache = tmp_path_factory.mktemp("dist-cache")
    root = tmp_path_factory.mktemp("dist-warm")
    cli.main([str(a) for a in [*FAST, *SYNTHETIC, "--max-steps", 1, "--eval-interval", 0,
                               "--cache-dir", cache, "--out-dir", root / "run"]])  # fmt: skip
    return cache


def test_ranks_given_different_data_stop_before_the_first_step(tmp_path, cache_dir):
    for name, line in (("a.txt", "the cat sat on the mat."), ("b.txt", "dogs run in the park!")):
        (tmp_path / name).write_text("\n".join(f"{line} {i}" for i in range(400)))
    common = [*FAST, "--max-steps", 2, "--eval-interval", 0, "--cache-dir", tmp_path / "cache"]
    common += ["--out-dir", tmp_path / "run", "--text-split", "line", "--valid-fraction", 0.2]
    results = _finish(
        _start_ranks([[*common, "--data-files", tmp_path / name] for name in ("a.txt", "b.txt")])
    )
    for rank, (code, _, err) in enumerate(results):
        assert code == 2, (rank, err[-2000:])
        lines = _error_lines(err)
        assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
        assert "the ranks do not share their inputs" in lines[0] and f"this is rank {rank}" in lines[0]
        assert "rank 1: tokenizer, train data, validation data" in lines[0]
        assert "--data-files" in lines[0]
    assert not (tmp_path / "run" / "latest.pt").exists()  # not one step was taken


def test_a_stopped_rank_is_named_within_the_timeout(tmp_path, cache_dir):
    argv = [*FAST, *SYNTHETIC, "--max-steps", 100_000, "--eval-interval", 0, "--save-interval", 0]
    argv += [
        "--log-interval",
        1,
        "--dist-timeout",
        3,
        "--cache-dir",
        cache_dir,
        "--out-dir",
        tmp_path / "run",
    ]
    rank0, rank1 = _start_ranks([argv, argv])
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 2):
            assert rank0.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.2)
        os.kill(rank1.pid, signal.SIGSTOP)  # paused: alive, but it answers nothing
        code, _, err = _finish([rank0], timeout=90)[0]
    finally:
        rank1.kill()
        rank1.communicate()
    lines = _error_lines(err)
    assert code == EXIT_RANK_STOPPED, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith("error: rank 0 at step ") and "rank 1 stopped answering" in lines[0]
    assert "3 s of --dist-timeout" in lines[0] and "--resume" in lines[0]


def test_evaluation_lines_are_printed_by_rank_0_only(tmp_path, cache_dir):
    argv = [*FAST, *SYNTHETIC, "--max-steps", 4, "--eval-interval", 2, "--cache-dir", cache_dir]
    argv += ["--out-dir", tmp_path / "run"]
    results = _finish(_start_ranks([argv, argv]))
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in evals if r["kind"] == "eval"]
    assert steps == [0, 2, 4]
    printed = [results[rank][1].count("| val loss") for rank in (0, 1)]
    assert printed == [len(steps), 0], printed


def test_the_heartbeat_thread_has_left_when_training_ends(monkeypatch):
    """A heartbeat still inside the store's C++ call at interpreter exit aborts the rank (SIGABRT) after a
    finished run; leaving the `with` block waits for the thread. A slow store stands in for a loaded host."""
    entered = threading.Event()

    class SlowStore:
        def add(self, key, amount):
            entered.set()
            time.sleep(1.0)
            return amount

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setattr(RankHeartbeat, "_client", lambda self, timeout_s: SlowStore())
    with RankHeartbeat(rank=0, world_size=2) as heartbeat:
        assert entered.wait(timeout=10)  # the thread is inside a store call
    assert not heartbeat._thread.is_alive()
