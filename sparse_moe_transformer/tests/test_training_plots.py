"""Plots from metrics.jsonl: resumed runs supersede re-logged steps, every figure is written."""

import json

import numpy as np
import pytest

from sparse_moe_transformer.src.training_plots import (
    PLOT_FILES,
    expert_load_matrix,
    load_health_series,
    make_plots,
    moving_average,
    read_metrics,
)


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def _train(step, loss, load):
    return {"kind": "train", "step": step, "loss": loss, "lr": 1e-3, "aux_loss": 1.1, "expert_load": load}


def test_resumed_steps_replace_earlier_records_and_partial_last_line_is_skipped(tmp_path):
    load = [[0.5, 0.5], [0.25, 0.75]]
    records = [_train(1, 5.0, load), _train(2, 4.0, load), _train(3, 3.9, load)]
    records += [_train(3, 3.5, load), _train(4, 3.0, load)]  # resumed from step 2: step 3 again
    records += [{"kind": "eval", "step": 4, "val_loss": 3.2}]
    _write(tmp_path / "metrics.jsonl", records, tail='{"kind": "train", "st')  # killed mid-write
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in metrics["train"]] == [1, 2, 3, 4]
    assert metrics["train"][2]["loss"] == 3.5  # the resumed run's record
    assert metrics["eval"][0]["val_loss"] == 3.2
    steps, loads = expert_load_matrix(metrics["train"])
    assert steps.tolist() == [1, 2, 3, 4] and loads.shape == (2, 2, 4)  # [L, E, N]
    assert np.allclose(loads[1, :, 0], [0.25, 0.75])


def test_damaged_or_missing_file_is_an_error(tmp_path):
    _write(
        tmp_path / "metrics.jsonl", [_train(1, 5.0, None)], tail="garbage\n" + json.dumps(_train(2, 4, None))
    )
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(tmp_path / "metrics.jsonl")
    with pytest.raises(FileNotFoundError, match="train first"):
        read_metrics(tmp_path / "nothing.jsonl")


def test_make_plots_writes_three_pngs(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for step in range(1, 41):
        load = rng.dirichlet(np.ones(4), size=3).tolist()  # 3 layers x 4 experts
        records.append(_train(step, 6.0 - step / 10, load))
        if step % 10 == 0:
            records.append({"kind": "eval", "step": step, "val_loss": 6.1 - step / 10})
    _write(tmp_path / "metrics.jsonl", records)
    paths = make_plots(tmp_path)
    assert [p.name for p in paths] == list(PLOT_FILES)
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_moving_average():
    assert np.allclose(moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])


def test_load_health_series_follows_the_worst_layer_and_counts_idle_experts():
    records = [
        _train(10, 5.0, [[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]]),  # layer 1 collapsed: 2 idle
        _train(20, 4.0, [[0.7, 0.1, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]]),  # layer 0 is the worst now
        _train(30, 3.0, None),  # no load logged: skipped
    ]
    health = load_health_series(records)
    assert health["steps"].tolist() == [10, 20]
    assert health["max_share"].tolist() == [0.5, 0.7]
    assert health["min_share"].tolist() == [0.0, 0.1]
    assert health["idle_experts"].tolist() == [2, 0]
