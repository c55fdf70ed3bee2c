"""The benchmark scripts run end to end on tiny settings (they check their own outputs: cached ==
uncached, speculative == target). Timings are printed, never asserted."""

import runpy
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _main(name):
    return runpy.run_path(str(BENCHMARKS / name), run_name="benchmark")["main"]


def test_bench_kv_cache_prints_a_row_per_length(capsys):
    rows = _main("bench_kv_cache.py")(
        ["--lengths", "8", "16", "--repeats", "1", "--d-model", "32", "--n-layer", "1"]
    )
    assert [r["new_tokens"] for r in rows] == [8, 16]
    assert all(r["no_cache_s"] > 0 and r["cache_s"] > 0 for r in rows)
    assert "speed-up" in capsys.readouterr().out


def test_bench_inference_writes_the_plot(tmp_path):
    png = tmp_path / "inference.png"
    results = _main("bench_inference.py")(
        [
            "--png",
            str(png),
            "--batch-sizes",
            "1",
            "2",
            "--new-tokens",
            "4",
            "--repeats",
            "1",
            "--d-model",
            "32",
            "--n-layer",
            "1",
            "--int8",
        ]
    )
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert set(results) == {"float32", "int8"}
    assert [r["batch_size"] for r in results["int8"]] == [1, 2]


def test_bench_quantization_and_speculative_run(capsys):
    rows = _main("bench_quantization.py")(
        ["--steps", "2", "--d-model", "32", "--n-layer", "1", "--val-tokens", "300"]
    )
    assert rows[0]["variant"] == "float32" and rows[1]["size_bytes"] < rows[0]["size_bytes"]
    rows = _main("bench_speculative.py")(
        [
            "--target-steps",
            "2",
            "--draft-steps",
            "2",
            "--target-d-model",
            "32",
            "--target-n-layer",
            "1",
            "--new-tokens",
            "12",
            "--num-draft",
            "3",
        ]
    )
    assert rows[0]["k"] == 3 and 0 <= rows[0]["acceptance"] <= 1
    assert "acceptance" in capsys.readouterr().out


def test_scripts_run_as_files():
    """`python phase5_production/src/<file>.py` works without sys.path tricks (the package is installed)."""
    root = BENCHMARKS.parent
    out = subprocess.run(
        [sys.executable, str(root / "src" / "server.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--checkpoint" in out.stdout and "127.0.0.1" in out.stdout
