"""benchmarks/speedrun.py: the time-to-quality report's arithmetic on hand-made curves, and the whole
script end to end on tiny models (fresh worker processes, alternating seeds, the JSON report)."""

import importlib.util
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speedrun.py"
spec = importlib.util.spec_from_file_location("speedrun", SCRIPT)
speedrun = importlib.util.module_from_spec(spec)
spec.loader.exec_module(speedrun)


def curve(*points):
    return [{"step": i + 1, "train_time_s": t, "val_loss": v} for i, (t, v) in enumerate(points)]


def test_time_to_reach_interpolates_between_the_evaluations_that_bracket_the_target():
    c = curve((10.0, 5.0), (20.0, 4.0), (30.0, 3.0))
    assert speedrun.time_to_reach(c, 3.5) == pytest.approx(25.0)
    assert speedrun.time_to_reach(c, 4.0) == pytest.approx(20.0)
    assert speedrun.time_to_reach(c, 6.0) == pytest.approx(10.0)  # already below at the first evaluation
    assert speedrun.time_to_reach(c, 2.9) is None  # never reached


def test_time_to_reach_takes_the_first_crossing_when_the_curve_goes_back_up():
    c = curve((10.0, 5.0), (20.0, 3.0), (30.0, 4.0), (40.0, 2.0))
    assert speedrun.time_to_reach(c, 3.5) == pytest.approx(17.5)


def test_loss_at_interpolates_and_holds_the_last_loss_after_a_run_ended():
    c = curve((10.0, 5.0), (20.0, 4.0))
    assert speedrun.loss_at(c, 15.0) == pytest.approx(4.5)
    assert speedrun.loss_at(c, 100.0) == pytest.approx(4.0)


def test_variant_overrides_and_iters_scale_the_schedule():
    r = speedrun.parse_variant("nanogpt-moe:dropout=0.0,max_lr=2e-3", iters=300)
    assert r["config"]["dropout"] == 0.0 and r["settings"]["max_lr"] == 2e-3
    assert r["settings"]["max_steps"] == 280 and r["settings"]["warmup_steps"] == 20  # 1400, 100 x 0.2
    base = speedrun.parse_variant("baseline", iters=300)
    assert base["settings"]["max_steps"] == 300 and base["config"]["tie_weights"] is True
    with pytest.raises(ValueError, match="not a field"):
        speedrun.parse_variant("baseline:n_expert=4", iters=None)  # the GPT has no experts
    with pytest.raises(ValueError, match="unknown variant"):
        speedrun.parse_variant("nanogpt", iters=None)
    assert speedrun.split_variants("baseline,ours:a=1,b=2,nanogpt-moe") == [
        "baseline",
        "ours:a=1,b=2",
        "nanogpt-moe",
    ]


def test_fused_baseline_computes_the_lessons_attention_exactly():
    """The baseline's F.scaled_dot_product_attention (nanoGPT's path) = the Phase 2 GPT's explicit
    causal attention: same logits, same loss, same gradients; only the speed may differ."""
    import torch

    from phase2_architecture.src.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, d_model=32, tie_weights=True)
    explicit, fused = GPT(config), GPT(config)
    fused.load_state_dict(explicit.state_dict())
    speedrun.fuse_attention(fused)
    idx, targets = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    (logits_e, loss_e), (logits_f, loss_f) = explicit(idx, targets), fused(idx, targets)
    torch.testing.assert_close(logits_f, logits_e, atol=1e-5, rtol=1e-5)
    loss_e.backward()
    loss_f.backward()
    for (name, p_e), p_f in zip(explicit.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p_f.grad, p_e.grad, atol=1e-5, rtol=1e-4, msg=name)
    # causal: changing the last token leaves every earlier position's logits unchanged
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 50
    torch.testing.assert_close(fused(changed)[0][:, :-1], logits_f[:, :-1], atol=1e-6, rtol=0)
    assert speedrun.parse_variant("baseline", iters=None)["fused_attention"] is True
    assert speedrun.parse_variant("baseline:fused_attention=false", iters=None)["fused_attention"] is False


def test_speedrun_end_to_end_on_tiny_models_reports_L_star_and_ratios(tmp_path):
    out_json = tmp_path / "speedrun.json"
    cmd = [
        sys.executable, str(SCRIPT), "--dataset", "synthetic", "--synthetic-stories", "60",
        "--vocab-size", "300", "--cache-dir", str(tmp_path / "cache"), "--tiny", "--iters", "6",
        "--evals", "2", "--seeds", "0", "1",
        "--variants", "baseline,nanogpt-moe:max_lr=3e-3,optimizer=muon,ns_dtype=fp32",
        "--threads", "1", "--json", str(out_json),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    assert re.search(r"L\* \(median final validation loss of baseline\) = [\d.]+", out)
    assert re.search(r"fp32 matmul peak .*: median [\d.]+ GFLOP/s", out)
    other = "nanogpt-moe:max_lr=3e-3,optimizer=muon,ns_dtype=fp32"
    target_line = re.escape(other) + r": time to L\* / baseline time = .*tokens/s [\d.]+x the baseline's"
    assert re.search(target_line, out)
    saved = json.loads(out_json.read_text())
    runs, rep = saved["runs"], saved["report"]
    # alternating: seed 0 of both variants, then seed 1 of both
    expected = [("baseline", 0), (other, 0), ("baseline", 1), (other, 1)]
    assert [(r["variant"], r["seed"]) for r in runs] == expected
    for r in runs:
        times = [p["train_time_s"] for p in r["curve"]]
        assert [p["step"] for p in r["curve"]] == [3, 6] and times == sorted(times)
        assert r["steps"] == 6 and 0 < r["model_flops_per_s"] and 0 < r["matmul_peak_flops"]
        decisions = r["hardware"]["decisions"]  # every figure stored with the machine and its dtype choices
        assert r["hardware"]["facts"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        if r["variant"] == other:
            assert decisions["newton_schulz"] == {"dtype": "fp32", "reason": "asked for fp32"}
        else:
            assert "newton_schulz" not in decisions  # the baseline's AdamW has none
    base_finals = [r["curve"][-1]["val_loss"] for r in runs if r["variant"] == "baseline"]
    assert rep["L_star"] == pytest.approx(statistics.median(base_finals))
    for row in rep["variants"][other]["runs"]:
        if row["time_to_L_star_s"] is not None:
            assert row["time_ratio"] == pytest.approx(row["time_to_L_star_s"] / rep["baseline_train_time_s"])
    assert speedrun.main(["--report", str(out_json)])["L_star"] == rep["L_star"]  # a saved run re-reports
    # any variant can be the reference (the ablations measure against "ours"); the Markdown table
    finals = [r["curve"][-1]["val_loss"] for r in runs if r["variant"] == other]
    assert speedrun.main(["--report", str(out_json), "--reference", other])["L_star"] == pytest.approx(
        statistics.median(finals)
    )
    table = speedrun.markdown_table(rep)
    assert table.count("\n") == 3 and f"| `{other}` | " in table and "| `baseline` | " in table
    # the baseline run that ends at or below L* reaches it by its own end
    best = min(rep["variants"]["baseline"]["runs"], key=lambda row: row["final_loss"])
    assert best["time_to_L_star_s"] is not None and best["time_to_L_star_s"] <= best["train_time_s"] + 1e-9
