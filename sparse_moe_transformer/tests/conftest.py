"""Fixtures shared by the MoE tests that serve a trained model."""

import pytest

from sparse_moe_transformer.src.cli import main as cli_main


@pytest.fixture(scope="session")
def tiny_moe_run(tmp_path_factory):
    """A tiny MoE trained for 2 steps by the real CLI (a few seconds): its run folder (best.pt)."""
    root = tmp_path_factory.mktemp("tiny_moe")
    data = "--dataset synthetic --synthetic-stories 50 --tokenizer bpe --vocab-size 300".split()
    fast = (
        "--max-steps 2 --warmup-steps 0 --batch-size 2 --eval-interval 2 --eval-batches 1 --sample-tokens 0"
    )
    argv = ["--mode", "train", "--preset", "tiny", *data, *fast.split()]
    argv += ["--cache-dir", root / "cache", "--out-dir", root / "run"]
    cli_main([str(a) for a in argv])
    return root / "run"
