"""Every flag a mode does not read is refused with one line naming it (and why), never silently
ignored; the table behind that rule (cli.MODE_FLAGS) is checked against what each mode really reads."""

import argparse

import pytest

from sparse_moe_transformer.src import cli
from sparse_moe_transformer.src.checkpointing import LATEST_NAME, read_checkpoint

DATA = ["--dataset", "synthetic", "--synthetic-stories", "50"]
TRAIN = ["--mode", "train", "--preset", "tiny", *DATA, "--tokenizer", "bpe", "--vocab-size", "300",
         "--max-steps", "2", "--warmup-steps", "0", "--batch-size", "2", "--eval-interval", "0",
         "--eval-batches", "1", "--sample-tokens", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny MoE trained for 2 steps: a run folder with latest.pt, best.pt and metrics.jsonl."""
    root = tmp_path_factory.mktemp("mode-flags")
    cli.main([*TRAIN, "--cache-dir", str(root / "cache"), "--out-dir", str(root / "run")])
    return root


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err


def test_generate_and_eval_refuse_the_model_and_tokenizer_flags(run, capsys):
    ckpt = ["--checkpoint", run / "run"]
    err = _error(
        ["--mode", "generate", *ckpt, "--preset", "tiny", "--set", "n_layer=3", "--tokenizer", "gpt2"], capsys
    )
    assert "--mode generate does not use --preset, --set, --tokenizer" in err
    assert "the checkpoint holds the model's config and its tokenizer" in err
    err = _error(["--mode", "eval", *ckpt, *DATA, "--tokenizer", "bpe", "--vocab-size", "300"], capsys)
    assert "--mode eval does not use --tokenizer, --vocab-size" in err
    err = _error(["--mode", "generate", *ckpt, "--precision", "bf16", "--max-steps", "5"], capsys)
    assert "--mode generate does not use --max-steps, --precision" in err and "fp32" in err


def test_resume_with_a_checkpoint_is_refused_and_trains_nothing(run, capsys):
    out_dir = run / "run"
    step = read_checkpoint(out_dir / LATEST_NAME)["step"]
    argv = [*TRAIN, "--cache-dir", run / "cache", "--out-dir", out_dir, "--resume", "--max-steps", "4"]
    err = _error([*argv, "--checkpoint", out_dir / "best.pt"], capsys)
    assert "--mode train does not use --checkpoint" in err and "--resume continues OUT_DIR/latest.pt" in err
    assert read_checkpoint(out_dir / LATEST_NAME)["step"] == step


def test_a_flag_given_with_its_default_value_still_counts(capsys):
    err = _error(["--mode", "plan", "--temperature", "0.8", "--preset", "tiny"], capsys)
    assert "--mode plan does not use --temperature" in err


@pytest.mark.parametrize(
    "argv, unread, why",
    [
        (["--mode", "plot", "--out-dir", "x", "--preset", "tiny"], "--preset", "--out-dir names the run"),
        (
            ["--mode", "eval", "--checkpoint", "x", "--out-dir", "x"],
            "--out-dir",
            "--checkpoint names the run",
        ),
        (
            ["--mode", "benchmark", "--checkpoint", "x", "--set", "n_layer=1"],
            "--set",
            "--checkpoint names the model",
        ),
    ],
    ids=[
        "plot-out-dir-names-the-run",
        "eval-checkpoint-names-the-run",
        "benchmark-checkpoint-names-the-model",
    ],
)
def test_a_flag_made_unread_by_another_is_refused(argv, unread, why, capsys):
    err = _error(argv, capsys)
    assert f"does not use {unread} ({why})" in err


def test_the_table_names_every_flag_of_the_parser_and_no_other():
    parser = cli.build_parser()
    dests = {a.dest for a in parser._actions} - {"help", "mode"}
    named = set().union(*cli.MODE_FLAGS.values())
    assert named == dests, f"unclassified: {dests - named}; unknown: {named - dests}"


class RecordingNamespace(argparse.Namespace):
    """A namespace that records which of its attributes are read once `_reads` is set."""

    def __getattribute__(self, name):
        values = object.__getattribute__(self, "__dict__")
        if values.get("_reads") is not None and name in values and not name.startswith("_"):
            values["_reads"].add(name)
        return object.__getattribute__(self, name)


def _flags_read(argv, monkeypatch) -> set[str]:
    """The flags the mode reads once cli.main has checked them (the mode's own reads)."""
    seen = {}
    parse_args = argparse.ArgumentParser.parse_args

    def parse_into_recorder(self, args=None, namespace=None):
        return parse_args(self, args, RecordingNamespace() if namespace is None else namespace)

    def check_then_record(args):
        check_flags(args)
        seen["args"] = args
        args._reads = set()

    check_flags = cli.check_flags
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_into_recorder)
    monkeypatch.setattr(cli, "check_flags", check_then_record)
    cli.main([str(a) for a in argv])
    reads = set(seen["args"]._reads)
    if "overrides" in reads:  # --set, parsed by check_flags into args.overrides
        reads.add("set")
    if "out_dir" in reads:  # without --out-dir, main makes it runs/PRESET
        reads.add("preset")
    return reads - {"overrides", "mode"}  # main reads --mode to pick the mode


@pytest.mark.parametrize("mode", cli.MODES)
def test_each_mode_reads_exactly_the_flags_of_its_table(mode, run, tmp_path, monkeypatch):
    # the run folder by --out-dir (not --checkpoint), so that eval/generate/benchmark read both
    out = ["--out-dir", run / "run"]
    argv = {
        "train": [*TRAIN, "--cache-dir", run / "cache", "--out-dir", tmp_path / "new"],
        "eval": ["--mode", "eval", *out, *DATA, "--cache-dir", run / "cache", "--eval-batches", "1"],
        "generate": ["--mode", "generate", *out, "--max-new-tokens", "2"],
        "benchmark": ["--mode", "benchmark", "--preset", "tiny", "--out-dir", tmp_path, "--bench-steps", "1",
                      "--bench-warmup", "0", "--max-new-tokens", "2"],
        "plan": ["--mode", "plan", "--preset", "tiny"],
        "plot": ["--mode", "plot", *out],
    }[mode]  # fmt: skip
    reads = _flags_read(argv, monkeypatch)
    table = cli.MODE_FLAGS[mode]
    assert table - reads == set(), f"--mode {mode} accepts flags it never reads: {table - reads}"
    assert reads - table == set(), f"--mode {mode} reads flags its table refuses: {reads - table}"
