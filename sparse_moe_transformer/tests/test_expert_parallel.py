"""Expert parallelism on the CPU (gloo): E ranks holding n_expert / E experts each train exactly like one
process holding all of them, with the same global batch.

expert_parallel_worker.py runs on every rank: it builds the one-process reference and the sharded model
from one seed and reports the largest differences; the tests here launch it and assert on them. The
training CLI tests run `train.py --expert-parallel 2` under torchrun and resume its checkpoint in one
process (and the other way round)."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import sparse_moe_transformer.src.train as train
from sparse_moe_transformer.src import cli
from sparse_moe_transformer.src.checkpointing import LATEST_NAME, read_checkpoint
from sparse_moe_transformer.src.expert_parallel import ExpertParallel, check_layout, shard_experts
from sparse_moe_transformer.src.memory_plan import GB, plan_memory
from sparse_moe_transformer.src.param_counts import count_hidden_matrix_parameters, count_parameters
from sparse_moe_transformer.src.train import SparseMoETransformer, preset_config

WORKER = Path(__file__).with_name("expert_parallel_worker.py")
TRAIN_SCRIPT = Path(train.__file__)
TOL = 1e-5
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

TWO_RANKS = [  # E = 2 on 2 processes
    {"name": "dropless, accumulation", "E": 2, "accum": 2},
    {"name": "capacity drops, accumulation", "E": 2, "accum": 2, "capacity_factor": 1.0},
    {"name": "capacity drops", "E": 2, "capacity_factor": 1.0},
    {
        "name": "activation checkpointing, capacity drops",
        "E": 2,
        "accum": 1,
        "capacity_factor": 1.0,
        "checkpointing": True,
    },
    # the routing bias chooses through the exchanges and moves by every rank's counts; the shared expert
    # is replicated on every rank, its gradient averaged like the attention's
    {
        "name": "bias balancing, a shared expert",
        "E": 2,
        "accum": 1,
        "options": {"balance": "bias", "balance_bias_step": 0.05, "n_shared_expert": 1},
    },  # fmt: skip
    {"name": "bytes", "E": 2, "balanced_bytes": True},
    {"name": "saved bytes", "E": 2, "saved_bytes": True},
]
FOUR_RANKS = [  # E = 4 on 4 processes, and E = 2 on 4 (two copies of the experts, averaged)
    {"name": "dropless, accumulation", "E": 4, "accum": 2},
    {"name": "capacity drops, accumulation", "E": 4, "accum": 2, "capacity_factor": 1.0},
    {"name": "two expert groups, accumulation", "E": 2, "accum": 2},
    {"name": "bytes", "E": 4, "balanced_bytes": True},
    {"name": "saved bytes", "E": 4, "saved_bytes": True},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]  # fmt: skip


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc; torchrun starts each rank in its own session)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # after "(command name)": state, ppid
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _run_ranks(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """torchrun and its ranks; when a rank hangs (a collective that some rank never joins), the ranks
    and torchrun are killed and the test fails instead of waiting forever."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*_children(proc.pid), proc.pid]:
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the ranks did not finish in {timeout} s: {err[-2000:]}") from None
    # torchrun's own summary (~40 lines) ends stderr; what the ranks printed before it (a traceback, a
    # C++ abort message) is the cause, so the message keeps a long tail, and stdout's tail
    assert proc.returncode == 0, f"exit {proc.returncode}\nstderr:\n{err[-6000:]}\nstdout:\n{out[-2000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _launch(out: Path, n: int, cases: list[dict]) -> list[dict]:
    _run_ranks([*_torchrun(n), str(WORKER), str(out), json.dumps(cases)])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("ep2"), 2, TWO_RANKS)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("ep4"), 4, FOUR_RANKS)


@pytest.fixture(params=["two_ranks", "four_ranks"])
def ranks(request):
    cases = TWO_RANKS if request.param == "two_ranks" else FOUR_RANKS
    results = request.getfixturevalue(request.param)
    return [(c, [r[c["name"]] for r in results]) for c in cases if "accum" in c or "capacity_factor" in c]


def test_logits_and_dropped_pairs_equal_one_process(ranks):
    for case, per_rank in ranks:
        for r in per_rank:
            assert r["logits"] <= TOL, (case["name"], r["logits"])
            reference_dropped, ep_dropped = r["dropped"]
            assert ep_dropped == reference_dropped, case["name"]  # the same pairs dropped (logits agree)
            assert (reference_dropped > 0) == ("capacity_factor" in case), case["name"]


def test_lm_aux_and_z_losses_equal_one_process(ranks):
    for case, per_rank in ranks:
        for r in per_rank:
            for name in ("lm", "aux", "z", "total"):
                assert r[f"loss_{name}"] <= TOL, (case["name"], name, r[f"loss_{name}"])


def test_every_gradient_equals_one_process(ranks):
    for case, per_rank in ranks:
        for rank, r in enumerate(per_rank):
            bad = {name: d for name, d in r["grads"].items() if d > TOL}
            assert not bad, (case["name"], rank, bad)
            assert r["grad_norm"] <= TOL, (case["name"], r["grad_norm"])


def test_weights_after_three_adamw_steps_equal_one_process(ranks):
    for case, per_rank in ranks:
        for rank, r in enumerate(per_rank):
            bad = {name: d for name, d in r["weights"].items() if d > TOL}
            assert not bad, (case["name"], rank, bad)
            assert r["weights_moved"] > 100 * TOL  # the steps changed the weights far beyond the tolerance


def test_muon_on_expert_slices_equals_muon_on_whole_stacks(ranks):
    for case, per_rank in ranks:
        assert all(r["muon"] <= 1e-6 for r in per_rank), case["name"]


def test_bytes_sent_are_the_rows_the_routing_sends(ranks):
    for case, per_rank in ranks:
        for r in per_rank:
            measured, from_routing = r["bytes_forward"]
            assert measured == from_routing > 0, case["name"]


@pytest.mark.parametrize("fixture", ["two_ranks", "four_ranks"])
def test_bytes_per_layer_with_a_balanced_router_equal_the_formula(fixture, request):
    """tokens x d_model x top_k x 2 exchanges x (E - 1) / E x 4 bytes forward; the backward as much again."""
    for r in request.getfixturevalue(fixture):
        b = r["bytes"]
        assert b["forward"] == b["formula"] > 0
        assert b["forward_and_backward"] == 2 * b["formula"]


@pytest.mark.parametrize("fixture", ["two_ranks", "four_ranks"])
def test_saved_activations_equal_the_memory_plan(fixture, request):
    """Summed over the ranks, what autograd keeps per layer equals the plan's balanced per-rank bytes
    times the ranks, to the byte (the expert slices, the exchange's combine and its indices)."""
    r = request.getfixturevalue(fixture)[0]["saved bytes"]
    assert r["measured"] == r["planned"]


def test_memory_plan_divides_the_expert_state_by_e():
    """Per rank: parameters, gradients and AdamW / Muon state of the model that rank really holds."""
    config = preset_config("tiny", n_expert=8)
    for size in (1, 2, 4, 8):
        model = SparseMoETransformer(config)
        if size > 1:
            shard_experts(model, ExpertParallel(size, 8, size, 1, None, None))
        held = sum(p.numel() for p in model.parameters())
        muon = sum(p.numel() for p in model.hidden_matrices())
        plan = plan_memory(
            config, 2, 16, n_params=count_parameters(config), precision="fp32", expert_parallel=size,
            n_muon_params=count_hidden_matrix_parameters(config),
        )  # fmt: skip
        assert plan.parameters == plan.gradients == 4 * held, size
        assert plan.optimizer_state == 8 * held - 4 * muon, size
        assert plan.all_to_all_buffers == (0 if size == 1 else 2 * 2 * 16 * config.top_k * 4 * config.d_model)
    with pytest.raises(ValueError, match="must divide n_expert"):
        plan_memory(config, 2, 16, n_params=count_parameters(config), expert_parallel=3)


def test_plan_mode_shows_the_most_experts_that_fit_for_each_e(capsys):
    result = cli.main(
        ["--mode", "plan", "--preset", "t1000", "--plan-device", "cuda", "--gpu-memory-gb", "4"]
    )
    largest = result["largest_by_expert_parallel"]
    assert list(largest) == [1, 2, 4, 8]
    counts = [largest[e]["n_expert"] for e in (1, 2, 4, 8)]
    assert all(n % e == 0 for n, e in zip(counts, (1, 2, 4, 8)))
    assert counts == sorted(counts) and counts[-1] > 4 * counts[0]  # sharding experts lets them grow
    for e, row in largest.items():  # the largest that fits: E more experts would not
        config = preset_config("t1000", n_expert=row["n_expert"] + e)
        over = plan_memory(
            config, 4, 256, n_params=count_parameters(config), precision="fp16", expert_parallel=e,
            n_muon_params=count_hidden_matrix_parameters(config),
        )  # fmt: skip
        assert row["gib"] * GB <= 4 * GB < over.total
    assert "E = 8:" in capsys.readouterr().out


def test_layouts_that_do_not_fit_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="must divide the number of ranks"):
        check_layout(2, 3, 8)
    with pytest.raises(ValueError, match="must divide n_expert"):
        check_layout(4, 4, 6)
    with pytest.raises(ValueError, match="fp16"):
        check_layout(2, 2, 8, precision="fp16")
    with pytest.raises(SystemExit):  # one process cannot hold half of the experts
        cli.main(["--mode", "train", "--expert-parallel", "2", "--out-dir", str(tmp_path), "--device", "cpu"])
    assert "--expert-parallel 2 must divide the number of ranks (1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--mode", "generate", "--expert-parallel", "2", "--checkpoint", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--mode generate does not use --expert-parallel" in err and "holds every expert" in err, err


# ----------------------------------------------------------------------------- the training CLI

TINY = [
    "--preset",
    "cpu-demo",
    "--set",
    "dropout=0.0",
    "--optimizer",
    "adamw",
]  # AdamW: see test_ddp_equivalence
for _field in ("n_layer=2", "d_model=32", "n_head=2", "n_expert=4", "top_k=2", "d_ff=64", "block_size=32"):
    TINY += ["--set", _field]
DATA = ["--dataset", "synthetic", "--synthetic-stories", "300", "--tokenizer", "bpe", "--vocab-size", "512"]


def _argv(out_dir, cache_dir, batch_size, *extra):
    argv = ["--mode", "train", *TINY, *DATA, "--cache-dir", cache_dir, "--out-dir", out_dir,
            "--batch-size", batch_size, "--max-steps", 6, "--warmup-steps", 2, "--max-lr", 1e-2,
            "--eval-interval", 3, "--eval-batches", 0, "--log-interval", 1, "--sample-tokens", 4,
            "--device", "cpu", *extra]  # fmt: skip
    return [str(a) for a in argv]


def _records(out_dir, kind):
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _train_on_two_ranks(argv):
    return _run_ranks([*_torchrun(2), str(TRAIN_SCRIPT), *argv, "--expert-parallel", "2"])


def test_a_run_moves_between_layouts_and_matches_one_uninterrupted_process(tmp_path, capsys):
    """Steps 1-2 with E = 2 on 2 ranks, 3-4 resumed in one process, 5-6 resumed with E = 2 again: the same
    losses and final weights as one process throughout; the E = 2 checkpoint generates in one process.

    The evaluations cover the whole validation split (699 windows of 32 tokens, global batches of 8): in
    the last batch rank 1 has no window and still serves its experts to rank 0."""
    cache = tmp_path / "cache"
    cli.main(_argv(tmp_path / "single", cache, 8))  # also fills the token cache
    run = tmp_path / "moving"
    proc = _train_on_two_ranks(_argv(run, cache, 4, "--stop-at-step", 2))
    assert proc.stdout.count("memory plan") == 1  # only rank 0 logs
    cli.main(_argv(run, cache, 8, "--resume", "--stop-at-step", 4))  # one process, the same global batch
    _train_on_two_ranks(_argv(run, cache, 4, "--resume"))

    single, moving = _records(tmp_path / "single", "train"), _records(run, "train")
    assert [r["step"] for r in moving] == [r["step"] for r in single] == list(range(1, 7))
    for a, b in zip(single, moving):
        for key in ("loss", "aux_loss", "z_loss"):
            assert abs(a[key] - b[key]) <= TOL, (a["step"], key, a[key], b[key])
    for a, b in zip(_records(tmp_path / "single", "eval"), _records(run, "eval")):
        assert a["step"] == b["step"] and abs(a["val_loss"] - b["val_loss"]) <= TOL
    single_ckpt, moving_ckpt = (
        read_checkpoint(tmp_path / "single" / LATEST_NAME),
        read_checkpoint(run / LATEST_NAME),
    )
    # Saved in one process's layout (every expert, in order). AdamW divides each gradient by its running
    # RMS, so an element whose gradient is ~0 can move by rounding noise times lr (1e-2) over six steps:
    # 1e-3 here still catches a misplaced expert (weights of std 0.02 differ by ~0.03).
    for name, w in single_ckpt["model"].items():
        assert w.shape == moving_ckpt["model"][name].shape
        assert (w - moving_ckpt["model"][name]).abs().max() <= 1e-3, name
    assert moving_ckpt["train_args"]["expert_parallel"] == 2

    capsys.readouterr()
    cli.main(["--mode", "generate", "--checkpoint", str(run / LATEST_NAME), "--max-new-tokens", "8",
              "--temperature", "0", "--device", "cpu"])  # fmt: skip
    from_moving = capsys.readouterr().out
    cli.main(["--mode", "generate", "--checkpoint", str(tmp_path / "single" / LATEST_NAME),
              "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu"])  # fmt: skip
    assert from_moving == capsys.readouterr().out and from_moving.strip()  # greedy: the same text
