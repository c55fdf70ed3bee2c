"""The training CLI end to end on the CPU: a tiny model learns the synthetic stories, and the
generate / eval / benchmark / plot modes run on its checkpoint. Bad inputs give clear errors."""

import json
import math

import pytest
import torch

from sparse_moe_transformer.src import cli, serving, train
from sparse_moe_transformer.src.checkpointing import BEST_NAME, LATEST_NAME, read_checkpoint
from sparse_moe_transformer.src.moe_optimizer import make_optimizer
from sparse_moe_transformer.src.train_settings import TrainSettings
from sparse_moe_transformer.src.training_plots import PLOT_FILES

# A model small enough for a few dozen CPU steps in seconds.
TINY = ["--preset", "cpu-demo"]
for _field in ("n_layer=2", "d_model=32", "n_head=2", "n_expert=4", "top_k=2", "d_ff=64", "block_size=32"):
    TINY += ["--set", _field]
DATA = ["--dataset", "synthetic", "--synthetic-stories", "300", "--tokenizer", "bpe", "--vocab-size", "512"]


def run_cli(argv):
    return cli.main([str(a) for a in argv])


def cli_error(argv, capsys) -> str:
    """Run the CLI expecting a clean failure; return its message."""
    with pytest.raises(SystemExit) as info:
        run_cli(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run shared by the tests of this module."""
    root = tmp_path_factory.mktemp("cli")
    out_dir = root / "run"
    argv = ["--mode", "train", *TINY, *DATA, "--cache-dir", root / "cache", "--out-dir", out_dir]
    argv += ["--batch-size", 8, "--max-steps", 40, "--max-lr", 1e-2, "--min-lr", 1e-3, "--warmup-steps", 4]
    argv += ["--eval-interval", 20, "--eval-batches", 4, "--log-interval", 5, "--sample-tokens", 8]
    summary = run_cli(argv)
    return {"root": root, "out_dir": out_dir, "summary": summary}


def _records(out_dir, kind):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_smoke_run_learns_and_writes_everything(trained):
    out_dir, summary = trained["out_dir"], trained["summary"]
    assert summary["status"] == "finished" and summary["step"] == 40
    for name in (LATEST_NAME, BEST_NAME, "metrics.jsonl", "tokenizer.json", "config.json", *PLOT_FILES):
        assert (out_dir / name).is_file(), name
    evals = _records(out_dir, "eval")
    assert [r["step"] for r in evals] == [0, 20, 40]
    (hardware,) = _records(out_dir, "hardware")  # what every figure of the run was measured on
    assert hardware["facts"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(hardware["decisions"]) == {"precision", "newton_schulz"}
    first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
    assert first > math.log(512) - 0.5  # an untrained model is near-uniform over the vocabulary
    assert last < first - 1.0, f"validation loss did not fall clearly: {first:.3f} -> {last:.3f}"
    assert math.isclose(evals[-1]["val_ppl"], math.exp(last), rel_tol=1e-9)
    assert all(r["sample"].startswith("Once upon a time") for r in evals)
    train = _records(out_dir, "train")
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    for r in train:  # LM and auxiliary losses are reported separately
        assert r["aux_loss"] >= 0.99 and r["z_loss"] > 0 and r["loss"] > 0 and r["tokens_per_s"] > 0
        load = torch.tensor(r["expert_load"])  # [layers, experts], each row a distribution
        assert load.shape == (2, 4) and torch.allclose(load.sum(1), torch.ones(2))
    # the learning rate follows warmup + cosine
    lrs = [r["lr"] for r in train]
    assert lrs[0] > lrs[-1] and lrs[-1] >= 1e-3 - 1e-12
    ckpt = read_checkpoint(out_dir / LATEST_NAME)
    assert ckpt["step"] == 40 and ckpt["tokens"] == 40 * 8 * 32
    assert ckpt["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in evals))
    for key in ("optimizer", "scaler", "sampler", "rng", "config", "train_args", "tokenizer"):
        assert key in ckpt, key
    assert "scheduler" not in ckpt  # the schedule is a pure function of the step and train_args


def test_eval_mode_reproduces_the_logged_validation_loss(trained, capsys):
    result = run_cli(
        [
            "--mode",
            "eval",
            "--checkpoint",
            trained["out_dir"] / LATEST_NAME,
            *DATA[:4],  # the data, not the tokenizer flags: eval uses the checkpoint's tokenizer
            "--cache-dir",
            trained["root"] / "cache",
            "--eval-batches",
            4,
        ]
    )
    logged = _records(trained["out_dir"], "eval")[-1]["val_loss"]
    assert result["val_loss"] == pytest.approx(logged, abs=1e-5)
    assert "perplexity" in capsys.readouterr().out


def test_generate_streams_text_and_is_reproducible(trained, capsys):
    argv = [
        "--mode",
        "generate",
        "--checkpoint",
        trained["out_dir"],
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        12,
        "--temperature",
        0.9,
        "--top-k",
        20,
        "--top-p",
        0.95,
        "--repetition-penalty",
        1.1,
        "--num-samples",
        2,
        "--seed",
        3,
    ]
    first = run_cli(argv)
    out = capsys.readouterr().out
    assert len(first) == 2 and all(t.startswith("Once upon a time") for t in first)
    assert first[0] in out and "sample 2/2" in out
    assert run_cli(argv) == first  # same seed, same samples
    greedy = run_cli(
        ["--mode", "generate", "--checkpoint", trained["out_dir"], "--temperature", 0, "--max-new-tokens", 8]
    )
    assert len(greedy[0]) > len("Once upon a time")


def test_benchmark_reports_and_saves_json(trained, capsys):
    path = trained["root"] / "bench.json"
    result = run_cli(
        [
            "--mode",
            "benchmark",
            "--checkpoint",
            trained["out_dir"],
            "--bench-steps",
            2,
            "--bench-warmup",
            1,
            "--max-new-tokens",
            8,
            "--bench-json",
            path,
        ]
    )
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result))
    model, _, _ = serving.load_trained_model(str(trained["out_dir"]), torch.device("cpu"))
    assert saved["total_params"] == sum(p.numel() for p in model.parameters())
    assert 0 < saved["active_params_per_token"] < saved["total_params"]
    for key in (
        "forward_flops_per_token",
        "train_tokens_per_s",
        "decode_ms_per_token_median",
        "peak_memory_mb",
    ):
        assert saved[key] > 0, key
    split = saved["train_step_split_s"]  # forward + backward + optimizer = the step, up to the timer
    assert set(split) == {"forward", "backward", "optimizer"} and all(v > 0 for v in split.values())
    assert sum(split.values()) <= saved["train_step_s"] * 1.5
    facts, decisions = saved["hardware"]["facts"], saved["hardware"]["decisions"]
    assert facts["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and "native_bf16" in facts
    assert decisions["precision"] == {"dtype": "fp32", "reason": "auto: fp32 on a CPU"}
    ns = decisions["newton_schulz"]["dtype"]
    assert saved["optimizer"] in ("AdamW", f"Muon (Newton-Schulz in {ns}) + AdamW")
    out = capsys.readouterr().out
    assert "KV cache" in out and "native bf16" in out and "forward" in out


def test_benchmark_names_the_newton_schulz_dtype_it_was_told_to_use(trained, capsys):
    args = ["--mode", "benchmark", "--checkpoint", trained["out_dir"], "--bench-steps", 1,
            "--bench-warmup", 0, "--max-new-tokens", 2, "--bench-json", trained["root"] / "b.json",
            "--optimizer", "muon"]  # fmt: skip
    result = run_cli([*args, "--ns-dtype", "fp32"])
    assert result["optimizer"] == "Muon (Newton-Schulz in fp32) + AdamW"
    assert result["hardware"]["decisions"]["newton_schulz"] == {"dtype": "fp32", "reason": "asked for fp32"}
    assert run_cli([*args, "--optimizer", "adamw"])["optimizer"] == "AdamW"


def test_plot_mode_redraws(trained):
    for name in PLOT_FILES:
        (trained["out_dir"] / name).unlink()
    run_cli(["--mode", "plot", "--out-dir", trained["out_dir"]])
    assert all((trained["out_dir"] / name).is_file() for name in PLOT_FILES)


def test_plan_mode_checks_the_budget(capsys):
    plan = run_cli(["--mode", "plan", "--preset", "t1000"])
    out = capsys.readouterr().out
    assert "fits in 4 GiB" in out and plan["total"] < 4 * 1024**3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset", "wikipedia"], "unknown dataset 'wikipedia'"),
        (["--dataset", "tinystories"], "cannot reach the Hugging Face hub"),  # offline (conftest)
        (["--data-files", "MISSING.txt"], "data file not found"),
        (["--set", "n_layerz=3"], "unknown config field 'n_layerz'"),
        (["--set", "n_layer=three"], "n_layer must be an int"),
        (["--set", "n_layer"], "--set expects FIELD=VALUE"),
        (["--set", "n_head=3"], "n_head"),
        (["--set", "top_k=9"], "top_k"),
        (["--max-lr", "-1"], "--max-lr must be a finite number > 0"),
    ],
)
def test_bad_inputs_give_clear_errors(tmp_path, capsys, extra, message):
    argv = ["--mode", "train", *TINY, "--synthetic-stories", 300, "--vocab-size", 512]  # synthetic by default
    argv += [
        "--cache-dir",
        tmp_path / "cache",
        "--out-dir",
        tmp_path / "run",
        "--max-steps",
        2,
        "--warmup-steps",
        0,
    ]
    err = cli_error([*argv, *extra], capsys)
    assert message in err and "Traceback" not in err


def test_empty_data_file_and_unknown_tokenizer(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    err = cli_error(["--mode", "train", "--data-files", empty, "--out-dir", tmp_path / "r"], capsys)
    assert "data file is empty" in err
    with pytest.raises(SystemExit) as info:  # argparse refuses it with the list of choices
        run_cli(["--mode", "train", "--tokenizer", "sentencepiece"])
    assert info.value.code == 2 and "invalid choice: 'sentencepiece'" in capsys.readouterr().err


def test_checkpoint_errors(trained, tmp_path, capsys):
    base = ["--mode", "train", *TINY, *DATA, "--cache-dir", trained["root"] / "cache", "--max-steps", 50]
    # resuming with a different model config
    err = cli_error([*base, "--out-dir", trained["out_dir"], "--resume", "--set", "n_layer=3"], capsys)
    assert "different model config" in err and "n_layer: checkpoint 2, now 3" in err
    # resuming where nothing was trained
    err = cli_error([*base, "--out-dir", tmp_path / "nothing", "--resume"], capsys)
    assert "checkpoint not found" in err
    # starting over a finished run without --resume / --overwrite
    err = cli_error([*base, "--out-dir", trained["out_dir"]], capsys)
    assert "--resume" in err and "--overwrite" in err
    # generating from a corrupt file
    bad = tmp_path / "bad.pt"
    bad.write_bytes((trained["out_dir"] / LATEST_NAME).read_bytes()[:1000])
    err = cli_error(["--mode", "generate", "--checkpoint", bad], capsys)
    assert "corrupt or truncated" in err


def _tiny_config(dropout=0.0):
    return train.preset_config(
        "cpu-demo",
        vocab_size=64,
        n_layer=2,
        d_model=32,
        n_head=2,
        n_expert=4,
        top_k=2,
        d_ff=64,
        block_size=16,
        dropout=dropout,
    )


def test_adamw_groups_skip_norms_biases_and_embeddings():
    model = train.SparseMoETransformer(_tiny_config())
    settings = TrainSettings(
        batch_size=1,
        grad_accum_steps=1,
        seq_len=8,
        max_steps=1,
        max_lr=1e-3,
        min_lr=0.0,
        warmup_steps=0,
        weight_decay=0.1,
        optimizer="adamw",
    )
    optimizer = make_optimizer(model, settings, torch.device("cpu"))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    all_params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(all_params) == len(list(model.parameters()))  # every parameter exactly once
    for name, p in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        no_decay = (
            isinstance(module, torch.nn.Embedding)
            or "norm" in type(module).__name__.lower()
            or isinstance(module, torch.nn.LayerNorm)
            or p.dim() == 1
            or name.rsplit(".", 1)[-1] in ("b1", "b2", "bias")
        )
        assert (id(p) in decayed) != no_decay, name


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = train.SparseMoETransformer(_tiny_config(dropout=0.1)).train()
    x = torch.randint(0, 64, (3, 16))
    grads = []
    for enabled in (False, True):
        model.set_activation_checkpointing(enabled)
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks: checkpointing replays the RNG state
        out = model(x, targets=torch.roll(x, -1, 1))
        train.moe_losses(out, model.config).total.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model.set_activation_checkpointing(False)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)
