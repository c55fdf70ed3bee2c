"""Weights that hold NaN or inf are refused wherever a checkpoint is loaded, with or without a checksum:
generate, eval, --resume and load_trained_model each stop with one line naming the file and the tensor."""

import pytest
import torch

from phase2_architecture.src.training_utils import NonFiniteWeightsError
from sparse_moe_transformer.src import cli
from sparse_moe_transformer.src.checkpointing import LATEST_NAME, payload_checksum, read_checkpoint
from sparse_moe_transformer.src.serving import load_trained_model

DATA = ["--dataset", "synthetic", "--synthetic-stories", "50", "--tokenizer", "bpe", "--vocab-size", "300"]
FAST = ["--max-steps", 2, "--warmup-steps", 0, "--batch-size", 2, "--eval-interval", 0, "--eval-batches", 1]
BAD_TENSOR = "layers.1.moe.w1"  # an expert matrix deep in the model, not the first tensor of the file


def _run(argv):
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny MoE trained for 2 steps by the real CLI: a run folder with latest.pt and best.pt."""
    root = tmp_path_factory.mktemp("integrity")
    _run(["--mode", "train", "--preset", "tiny", *DATA, *FAST, "--sample-tokens", 0,
          "--cache-dir", root / "cache", "--out-dir", root / "run"])  # fmt: skip
    return root / "run"


def _poison(src, dst, value: float, keep_checksum: bool) -> str:
    """Copy checkpoint `src` to `dst` with one value of BAD_TENSOR set to `value`; return the tensor name.

    keep_checksum=False drops the checksum (a file written before checksums existed); True writes a
    checksum that matches the poisoned weights (NaN weights saved as they were)."""
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    names = [n for n in checkpoint["model"] if n.startswith(BAD_TENSOR)]
    assert names, f"no tensor named {BAD_TENSOR}* in {list(checkpoint['model'])}"
    checkpoint["model"][names[0]].view(-1)[3] = value
    checkpoint.pop("checksum")
    if keep_checksum:
        checkpoint["checksum"] = payload_checksum(checkpoint)
    torch.save(checkpoint, dst)
    return names[0]


def _one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        _run(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("keep_checksum", [False, True], ids=["no-checksum", "matching-checksum"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_generate_and_eval_refuse_non_finite_weights(run_dir, tmp_path, capsys, value, keep_checksum):
    bad = tmp_path / "bad.pt"
    name = _poison(run_dir / LATEST_NAME, bad, value, keep_checksum)
    for mode in (
        ["--mode", "generate", "--max-new-tokens", 4],
        ["--mode", "eval", *DATA[:4], "--cache-dir", tmp_path],
    ):
        err = _one_line_error([*mode, "--checkpoint", bad], capsys)
        assert str(bad) in err and name in err and "NaN/inf" in err, err


def test_load_trained_model_and_read_checkpoint_refuse_nan_weights(run_dir, tmp_path):
    bad = tmp_path / "bad.pt"
    name = _poison(run_dir / LATEST_NAME, bad, float("nan"), keep_checksum=False)
    for load in (read_checkpoint, load_trained_model):
        with pytest.raises(NonFiniteWeightsError, match=name):
            load(bad)
    # the untouched file of the same run still loads: the check refuses only what is broken
    model, _, _ = load_trained_model(run_dir / LATEST_NAME)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_refuses_a_latest_checkpoint_with_nan_weights(run_dir, tmp_path, capsys):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    name = _poison(run_dir / LATEST_NAME, out_dir / LATEST_NAME, float("nan"), keep_checksum=False)
    argv = ["--mode", "train", "--resume", "--out-dir", out_dir, *DATA[:4], "--max-steps", 4]
    err = _one_line_error([*argv, "--cache-dir", tmp_path / "cache"], capsys)
    assert str(out_dir / LATEST_NAME) in err and name in err, err
