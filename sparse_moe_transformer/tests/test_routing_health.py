"""Routing health from the logged expert load: the progress-bar summary picks the worst layer, and the
collapse watch warns exactly once, naming the layer and the fix, when an expert stays idle or one expert
keeps too large a share for a window of log intervals; a healthy run, and a collapse shorter than the
window, stay silent."""

import numpy as np
import pytest
import torch

from sparse_moe_transformer.src.routing_health import CollapseWatch, progress_postfix, summarize_load

E, K, L = 8, 2, 3


def healthy_loads(n, seed=0):
    """n log intervals of near-balanced loads [L, E] (Dirichlet around 1/E: shares 0.05 .. 0.2)."""
    rng = np.random.default_rng(seed)
    return [rng.dirichlet(np.full(E, 50.0), size=L) for _ in range(n)]


def collapsed(load, layer, experts):
    """The same load with `layer` routed only to `experts`, in equal shares; the others idle."""
    load = load.copy()
    load[layer] = 0.0
    load[layer, experts] = 1.0 / len(experts)
    return load


def test_summary_names_the_worst_layer_its_max_min_share_and_counts_idle_experts():
    load = np.empty((L, E))
    load[0] = [0.25, 0.2, 0.15, 0.15, 0.1, 0.1, 0.05, 0.0]  # an idle expert too, but a smaller max
    load[1] = [0.4, 0.3, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0]  # the busiest expert of all layers
    load[2] = [0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.3, 0.0]
    s = summarize_load(load.tolist())
    assert (s.worst_layer, s.max_share, s.min_share, s.idle_experts) == (1, 0.4, 0.0, 5)
    assert progress_postfix(s) == {"load": "L1 0.40/0.00", "idle": "5"}
    balanced = summarize_load(np.full((L, E), 1 / E))
    assert balanced.idle_experts == 0 and balanced.max_share == balanced.min_share == 1 / E


def test_healthy_run_stays_silent():
    watch = CollapseWatch(E, K, window=3)
    for i, load in enumerate(healthy_loads(200)):
        assert watch.update(10 * (i + 1), load) is None


def test_idle_experts_for_a_window_warn_once_naming_the_layer_and_the_fix():
    watch = CollapseWatch(E, K, window=4, aux_loss_coef=0.01)
    loads = healthy_loads(20)
    messages = []
    for i, load in enumerate(loads):
        if i >= 5:  # layer 2 collapses onto experts 0..3 from interval 5 on and stays collapsed
            load = collapsed(load, 2, [0, 1, 2, 3])
        messages.append(watch.update(10 * (i + 1), load))
    fired = [(i, m) for i, m in enumerate(messages) if m is not None]
    assert len(fired) == 1  # once per run, although the collapse lasts
    i, message = fired[0]
    assert i == 5 + 4 - 1  # after exactly `window` intervals of the collapse
    assert "layer 2" in message and "received no tokens" in message and f"step {10 * (i + 1)}" in message
    assert "balance='bias'" in message and "aux_loss_coef (now 0.01)" in message


def test_one_expert_taking_too_large_a_share_warns():
    watch = CollapseWatch(E, K, window=3)  # max_share 3/8: top-2 onto two experts gives 0.5 each
    assert watch.max_share == pytest.approx(3 / E)
    out = []
    for i, load in enumerate(healthy_loads(6)):
        load = load.copy()
        load[0] = [0.45, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05]  # no idle expert, one busy one
        out.append(watch.update(i, load))
    assert out[:2] == [None, None] and "layer 0" in out[2] and "expert 0 took more than 0.375" in out[2]
    assert out[3:] == [None] * 3


def test_a_collapse_shorter_than_the_window_stays_silent():
    watch = CollapseWatch(E, K, window=4)
    for i, load in enumerate(healthy_loads(40)):
        if i % 5 < 3:  # three intervals collapsed, then one healthy: the streak restarts
            load = collapsed(load, 1, [6, 7])
        assert watch.update(i, load) is None


def test_default_threshold_is_reachable_under_top_k_and_bad_settings_are_refused():
    assert CollapseWatch(32, 8).max_share == pytest.approx(3 / 32)  # fine-grained: 3/32 < 1/8
    assert 1 / 4 < CollapseWatch(4, 2).max_share < 1 / 2  # 3/4 could never be reached with top-2
    with pytest.raises(ValueError, match="1/top_k"):
        CollapseWatch(8, 2, max_share=0.6)
    with pytest.raises(ValueError, match="n_expert"):
        CollapseWatch(8, 2).update(0, np.full((2, 4), 0.25))
    with pytest.raises(ValueError, match=r"\[n_layer\]\[n_expert\]"):
        summarize_load([0.5, 0.5])
    with pytest.raises(ValueError, match="negative"):
        summarize_load([[1.5, -0.5]])


def test_the_training_log_records_the_warning_once_on_a_collapse_and_never_on_a_healthy_run(tmp_path):
    """MetricsLog (what the loop writes to metrics.jsonl) runs the watch on every train record."""
    from types import SimpleNamespace

    from sparse_moe_transformer.src.run_folder import MetricsLog
    from sparse_moe_transformer.src.runtime import Runtime
    from sparse_moe_transformer.src.train import preset_config

    config = preset_config("tiny")  # 2 layers, 4 experts, top-2
    runtime = Runtime(torch.device("cpu"), None)

    def records(counts_per_interval, out_dir):
        out_dir.mkdir()
        run = SimpleNamespace(config=config, runtime=runtime, out_dir=out_dir)
        metrics = MetricsLog(run)
        written = []
        for step, counts in enumerate(counts_per_interval, start=1):
            metrics.add({"losses": torch.ones(4), "expert_counts": counts, "grad_norm": 1.0}, 0.1, 64)
            written.append(
                metrics.write_train_record(
                    SimpleNamespace(step=step, tokens=64 * step, train_time=0.1 * step), 1e-3, 1.0, runtime
                )
            )
        metrics.close()
        return written

    collapsed = torch.tensor([[32.0, 32.0, 0.0, 0.0], [16.0, 16.0, 16.0, 16.0]])  # layer 0: 2 of 4 idle
    healthy = torch.tensor([[17.0, 15.0, 16.0, 16.0], [16.0, 16.0, 15.0, 17.0]])
    warned = [r for r in records([collapsed] * 8, tmp_path / "collapsed") if "routing_warning" in r]
    assert len(warned) == 1 and "layer 0" in warned[0]["routing_warning"]
    assert "balance='bias'" in warned[0]["routing_warning"]
    assert not any("routing_warning" in r for r in records([healthy] * 8, tmp_path / "healthy"))
