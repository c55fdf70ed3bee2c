"""The benchmark scripts run end to end on tiny settings. Timings are printed, never asserted;
what is checked is that every report line is there and that the cached generation equals the
recomputed one."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_moe_transformer.src.train import preset_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name, *args):
    cmd = [sys.executable, str(BENCHMARKS / name), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout


def test_bench_moe_ffn_reports_ours_and_dense_for_each_size():
    tiny = ["--repeats", "1", "--warmup", "0"]
    out = run_script("bench_moe_ffn.py", "--only-fast", "--tokens", "64", "128", *tiny)
    main_part, cpu_demo_part = out.split("cpu-demo layer")
    part_64, part_128 = main_part.split("\n64 tokens:")[1].split("\n128 tokens:")
    for section in (part_64, part_128, cpu_demo_part):
        assert re.search(r"ours\s+[\d.]+ ms\s+[\d.]+ GFLOP/s\s+[\d.]+x", section)
        assert re.search(r"dense\s+[\d.]+ ms\s+[\d.]+ GFLOP/s\s+1\.00x", section)
        assert re.search(r"machine state: 64 MiB copy at [\d.]+ GiB/s", section)


def test_bench_moe_ffn_takes_the_layer_shape_for_fine_grained_experts():
    tiny = ["--repeats", "1", "--warmup", "0", "--only-fast", "--tokens", "64"]
    shape = ["--d-model", "32", "--d-ff", "16", "--n-expert", "8", "--top-k", "4"]
    out = run_script("bench_moe_ffn.py", *tiny, *shape)
    assert "MoE FFN: d_model 32, d_ff 16, 8 experts, top-4; dense: 32 -> 64 -> 32" in out
    main_part = out.split("cpu-demo layer")[0]
    assert re.search(r"ours\s+[\d.]+ ms\s+[\d.]+ GFLOP/s\s+[\d.]+x", main_part)


def test_bench_moe_ffn_processes_mode_reports_one_ratio_per_process():
    tiny = ["--repeats", "1", "--warmup", "0"]
    out = run_script("bench_moe_ffn.py", "--processes", "2", "--tokens", "64", *tiny)
    sample = r"process \d, 64 tokens: ours [\d.]+ ms, dense [\d.]+ ms, [\d.]+x; 64 MiB copy at [\d.]+ GiB/s"
    assert len(re.findall(sample, out)) == 2
    assert re.search(r"64 tokens: median ours / dense [\d.]+x \(per process: [\d.]+, [\d.]+\)", out)


def test_bench_generation_cached_tokens_equal_recomputed_tokens():
    out = run_script("bench_generation.py", "--new-tokens", "6", "--repeats", "1")
    assert re.search(r"with KV cache\s+[\d.]+ tokens/s", out)
    assert "same tokens: True" in out


def test_bench_optimizer_step_times_every_variant_and_stores_the_hardware(tmp_path):
    out_json = tmp_path / "optimizer_step.json"
    out = run_script("bench_optimizer_step.py", "--presets", "tiny", "--rounds", "1", "--warmup", "0",
                     "--variants", "adamw", "muon-fp32", "--json", str(out_json))  # fmt: skip
    assert re.search(r"adamw\s+[\d.]+ ms\s+1\.00x AdamW", out)
    assert re.search(r"muon-fp32\s+[\d.]+ ms\s+[\d.]+x AdamW", out)
    assert "Newton-Schulz (auto):" in out and "native bf16" in out
    report = json.loads(out_json.read_text())
    assert report["hardware"]["decisions"]["newton_schulz"]["dtype"] in ("fp32", "bf16")
    assert set(report["presets"][0]["median_step_s"]) == {"adamw", "muon-fp32"}


def test_bench_expert_parallel_reports_both_layouts_per_rank():
    out = run_script(
        "bench_expert_parallel.py", "--preset", "tiny", "--batch-size", "2", "--seq-len", "8", "--steps", "1",
        "--warmup", "0",
    )  # fmt: skip
    rate = r"rank [01]: +[\d,]+ tokens/s, +[\d.]+ ms/step, peak RSS +\d+ MiB"
    assert len(re.findall(r"E = 1 \(DDP\) +" + rate, out)) == 2
    exchanged = r"exchanges [\d.]+ MiB/step \(balanced formula [\d.]+ MiB\)"
    assert len(re.findall(r"E = 2 \(expert parallel\) +" + rate + r".*" + exchanged, out)) == 2


def test_bench_memory_runs_end_to_end_at_a_tiny_size(tmp_path):
    out_json = tmp_path / "memory.json"
    tiny = ["--preset", "tiny", "--set", "vocab_size=300", "--batch-size", "2", "--block-size", "16"]
    out = run_script("bench_memory.py", *tiny, "--json", str(out_json))
    result = json.loads(out_json.read_text())
    rows = result["saved_for_backward"]
    assert [(r["precision"], r["activation_checkpointing"]) for r in rows] == [
        ("fp32", False),
        ("fp32", True),
        ("bf16", False),
        ("bf16", True),
    ]
    for r in rows:
        assert r["plan_bytes"] == r["measured_bytes"], r  # the plan is exact on the CPU
    train = result["training_steps"]
    assert train["tokenizer_vocab_size"] == 300 and train["max_token_id"] < 300
    assert len(train["losses"]) == 2 and all(math.isfinite(v) for v in train["losses"])
    assert train["peak_rss_bytes"] > train["rss_before_model_bytes"] > 0
    assert "peak resident memory" in out and "plan total (CPU, fp32)" in out


def test_gpu_check_cpu_path_trains_every_variant_and_reports_the_inference_figures(tmp_path):
    """The CPU path of the GPU check, run as a script from a plain checkout (no installed package):
    the hardware decisions, Newton-Schulz timed per dtype, fp32 / fp16 (GradScaler) / bf16 (where native)
    with and without checkpointing training with the preset's Muon on the same batches and agreeing; the
    FLOPs per forward equal the matmul FLOPs of the tiny model (the CPU's fused attention kernel is not
    counted). The JSON is complete at the end (it is rewritten after every part)."""
    out_json = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-S", str(BENCHMARKS / "gpu_check.py"), "--device", "cpu", "--tiny",
           "--steps", "2", "--json", str(out_json)]  # fmt: skip
    # -S: no site-packages .pth hooks, so this package's editable install is not on the path; torch is
    # put back by hand, as a lent GPU machine would have it
    torch_site = str(Path(torch.__file__).resolve().parents[1])
    env["PYTHONPATH"] = torch_site
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    result = json.loads(out_json.read_text())
    assert result["optimizer"] == "muon" and result["hardware"]["decisions"]["precision"]["dtype"] == "fp32"
    assert set(result["newton_schulz_ms_per_step"]) >= {"fp32"}
    rows = result["training"]
    lows = ["fp16", "bf16"] if result["hardware"]["facts"]["native_bf16"] else ["fp16"]
    assert [r["variant"] for r in rows] == ["fp32"] + [f"{p}{ck}" for p in lows for ck in ("", " +ckpt")]
    for r in rows:
        assert len(r["losses"]) == 2 and all(math.isfinite(v) for v in r["losses"])
        assert r["tokens_per_s"] > 0 and r.get("max_loss_diff_vs_fp32", 0) < 0.05
        assert "peak_allocated" not in r  # no memory figures without CUDA
    assert rows[1]["losses"] == rows[2]["losses"]  # checkpointing recomputes the same numbers
    config = preset_config("tiny")
    C, F, E, k, V, T = config.d_model, config.d_ff, config.n_expert, config.top_k, 300, config.block_size
    matmul_flops = T * (config.n_layer * (8 * C * C + 2 * C * E + k * 4 * C * F) + 2 * C * V)
    for fig in result["inference"]:
        assert fig["latency_ms_per_token"] > 0 and fig["flops_seq_len"] == T
        assert fig["gflops_per_forward"] * 1e9 == pytest.approx(matmul_flops, rel=1e-9)
    assert [fig["precision"] for fig in result["inference"]] == ["fp32", *lows]
    assert "inference, batch 1" in out and "Newton-Schulz per optimizer step" in out
