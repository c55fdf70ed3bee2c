"""The benchmark scripts run end to end on tiny settings. Timings are printed, never asserted;
what is checked is that every report line is there and that the cached generation equals the
recomputed one."""

import json
import re
import subprocess
import sys
from pathlib import Path

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
