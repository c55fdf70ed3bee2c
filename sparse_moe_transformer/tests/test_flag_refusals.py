"""A run that would fail later fails before its first step, with one line naming the problem and the fix:
bad numbers, a validation split too short, a prompt too long, a resume that contradicts its checkpoint.
(The `argv`, `error_of` and `losses` fixtures are in conftest.py.)"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_moe_transformer.src import cli


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
def test_bad_settings_fail_before_any_step(tmp_path, cache_dir, capsys, extra, message, argv, error_of):
    err = error_of(argv(tmp_path / "run", cache_dir, *extra), capsys)
    assert message in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran


def test_a_validation_split_shorter_than_one_sequence_fails_before_the_first_step(tmp_path, capsys, error_of):
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


def test_eval_mode_refuses_negative_eval_batches(tmp_path, cache_dir, capsys, error_of):
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


def test_resume_contradictions_are_refused_and_changes_are_said(tmp_path, cache_dir, capsys, argv, error_of):
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


def test_an_empty_sample_prompt_starts_from_end_of_text(tmp_path, cache_dir, argv):
    summary = cli.main(
        argv(tmp_path / "run", cache_dir, "--sample-prompt", "", "--sample-tokens", 4, steps=3)
    )
    assert summary["status"] == "finished"
