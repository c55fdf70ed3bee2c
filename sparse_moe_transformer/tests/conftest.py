"""Fixtures shared by the MoE tests: a tiny training run through the real CLI, and the helpers of the tests
that drive the CLI (`argv`, `error_of`, `losses`).

Phase 5's server finds the MoE's loader through the installed entry point; importing `serving` here
registers it in the test process as well, so that only test_serving_moe_runs.py depends on the install."""

import json
from pathlib import Path

import pytest

from sparse_moe_transformer.src import serving  # noqa: F401 - registers the MoE's loader in this process
from sparse_moe_transformer.src.cli import main as cli_main


@pytest.fixture(scope="session")
def tiny_moe_run(tmp_path_factory):
    """A tiny MoE trained by the real CLI for 300 steps (seconds): its run folder (best.pt). Trained far
    enough to write word-like text, so the playground's screenshot shows tokens worth reading."""
    root = tmp_path_factory.mktemp("tiny_moe")
    data = "--dataset synthetic --synthetic-stories 200 --tokenizer bpe --vocab-size 300".split()
    steps = "--max-steps 300 --warmup-steps 10 --batch-size 8 --eval-interval 300 --eval-batches 1"
    fast = steps + " --sample-tokens 0"
    argv = ["--mode", "train", "--preset", "tiny", *data, *fast.split()]
    argv += ["--cache-dir", root / "cache", "--out-dir", root / "run"]
    cli_main([str(a) for a in argv])
    return root / "run"


TINY = ["--preset", "tiny", "--dataset", "synthetic", "--synthetic-stories", "200", "--tokenizer", "bpe"]
TINY += ["--vocab-size", "300", "--batch-size", "4", "--warmup-steps", "1", "--sample-tokens", "0"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One token cache for every tiny CLI run of the session."""
    return tmp_path_factory.mktemp("cli-cache")


@pytest.fixture
def argv():
    """argv(out_dir, cache_dir, *extra, steps=6): a tiny --mode train command line."""

    def make(out_dir, cache_dir, *extra, steps=6):
        return [str(a) for a in ["--mode", "train", *TINY, "--max-steps", steps, "--eval-interval", 3,
                                 "--eval-batches", 2, "--log-interval", 1, "--cache-dir", cache_dir,
                                 "--out-dir", out_dir, *extra]]  # fmt: skip

    return make


@pytest.fixture
def error_of():
    """error_of(args, capsys, code=2): the one-line error the CLI exits with (no traceback)."""

    def run(args, capsys, code=2) -> str:
        with pytest.raises(SystemExit) as info:
            cli_main(args)
        assert info.value.code == code
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error:"), err
        return err.strip().splitlines()[-1]

    return run


@pytest.fixture
def losses():
    """losses(out_dir): {step: training loss} from the run's metrics.jsonl."""

    def read(out_dir) -> dict[int, float]:
        lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}

    return read
