"""DistributedDataParallel on the CPU: 2 gloo processes under torchrun train exactly like one process
with the same global batch (each rank reads its own slice; gradients are averaged)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import sparse_moe_transformer.src.train as train
from sparse_moe_transformer.src import cli
from sparse_moe_transformer.src.checkpointing import LATEST_NAME, read_checkpoint

TRAIN_SCRIPT = Path(train.__file__)
TINY = ["--preset", "cpu-demo", "--set", "dropout=0.0"]  # no dropout: ranks draw different masks
# AdamW, not the preset's Muon: Muon's Newton-Schulz runs in bf16, which turns the 1e-7 float-order
# differences of gradients summed over ranks into 1e-4 differences of the update. What this test proves,
# that DDP hands the optimizer the gradients of one process, does not depend on the optimizer.
TINY += ["--optimizer", "adamw"]
for _field in ("n_layer=2", "d_model=32", "n_head=2", "n_expert=4", "top_k=2", "d_ff=64", "block_size=32"):
    TINY += ["--set", _field]
DATA = ["--dataset", "synthetic", "--synthetic-stories", "300", "--tokenizer", "bpe", "--vocab-size", "512"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(out_dir, cache_dir, batch_size):
    argv = [
        "--mode",
        "train",
        *TINY,
        *DATA,
        "--cache-dir",
        cache_dir,
        "--out-dir",
        out_dir,
        "--batch-size",
        batch_size,
        "--max-steps",
        6,
        "--warmup-steps",
        2,
        "--max-lr",
        1e-2,
        "--eval-interval",
        3,
        "--eval-batches",
        2,
        "--log-interval",
        1,
        "--sample-tokens",
        0,
        "--device",
        "cpu",
    ]
    return [str(a) for a in argv]


def _records(out_dir, kind):
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_two_gloo_ranks_match_one_process(tmp_path):
    cache = tmp_path / "cache"
    cli.main(_argv(tmp_path / "single", cache, batch_size=8))  # also fills the token cache

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(TRAIN_SCRIPT),
        *_argv(tmp_path / "ddp", cache, batch_size=4),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    problems = [line for line in proc.stderr.splitlines() if "rror" in line or "Traceback" in line]
    assert proc.returncode == 0, "\n".join(problems[-20:]) or proc.stderr[-3000:]
    assert proc.stdout.count("memory plan") == 1  # only rank 0 logs

    single, ddp = _records(tmp_path / "single", "train"), _records(tmp_path / "ddp", "train")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == list(range(1, 7))
    for a, b in zip(single, ddp):
        for key in ("loss", "aux_loss", "z_loss"):
            assert abs(a[key] - b[key]) <= 1e-5, (a["step"], key, a[key], b[key])
        assert (
            a["expert_load"] == b["expert_load"]
            or max(abs(x - y) for la, lb in zip(a["expert_load"], b["expert_load"]) for x, y in zip(la, lb))
            < 1e-6
        )
    val_single, val_ddp = _records(tmp_path / "single", "eval"), _records(tmp_path / "ddp", "eval")
    for a, b in zip(val_single, val_ddp):
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-5
    # the checkpoint holds both ranks' RNG states and the global data position
    ckpt = read_checkpoint(tmp_path / "ddp" / LATEST_NAME)
    assert len(ckpt["rng"]) == 2 and ckpt["sampler"]["global_batch"] == 8


def test_accumulation_on_two_gloo_ranks_equals_one_big_batch_and_resumes_in_one_process(tmp_path):
    """2 ranks x 2 micro-batches of 2 (the no_sync branch) = 1 process with batch 8; the DDP checkpoint
    then resumes in 1 process with the same global batch (4 x 2) and continues the same trajectory.
    Balancing by routing bias is on: the ranks move their biases by the global batch's load (the
    single process's), and the biases resume with the checkpoint.

    The Switch loss is off: it multiplies two per-micro-batch means, so accumulation optimises a slightly
    different balance objective than one big batch (the LM loss and the z-loss are means over tokens)."""
    cache = tmp_path / "cache"

    def argv(out_dir, batch_size, accum, *extra):
        args = _argv(out_dir, cache, batch_size) + [
            "--grad-accum-steps",
            str(accum),
            "--set",
            "aux_loss_coef=0",
            "--set",
            "balance=bias",
            "--set",
            "balance_bias_step=0.01",
        ]
        return args + ["--eval-interval", "0", "--save-interval", "0", *map(str, extra)]

    cli.main(argv(tmp_path / "single", 8, 1))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(TRAIN_SCRIPT)]
    cmd = launch + argv(tmp_path / "ddp", 2, 2, "--stop-at-step", 3)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_checkpoint(tmp_path / "ddp" / LATEST_NAME)["rng"]) == 2

    cli.main(argv(tmp_path / "ddp", 4, 2, "--resume"))  # one process, the same global batch of 8
    single, ddp = _records(tmp_path / "single", "train"), _records(tmp_path / "ddp", "train")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == list(range(1, 7))
    for a, b in zip(single, ddp):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
    weights_single = read_checkpoint(tmp_path / "single" / LATEST_NAME)["model"]
    weights_ddp = read_checkpoint(tmp_path / "ddp" / LATEST_NAME)["model"]
    for name, w in weights_single.items():
        assert (w - weights_ddp[name]).abs().max() <= 1e-5, name
    biases = [name for name in weights_single if name.endswith("balance_bias")]
    assert biases and all(weights_single[name].abs().sum() > 0 for name in biases)  # they moved
