"""Fixtures shared by the MoE tests that serve a trained model.

Phase 5's server finds the MoE's loader through the installed entry point; importing `serving` here
registers it in the test process as well, so that only test_serving_moe_runs.py depends on the install."""

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
