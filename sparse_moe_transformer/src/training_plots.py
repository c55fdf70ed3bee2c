"""PNG plots of a training run, drawn from its `metrics.jsonl`.

The training loop appends one JSON object per line to `<out-dir>/metrics.jsonl`:

    {"kind": "train", "step", "tokens", "lr", "loss", "aux_loss", "z_loss", "grad_norm",
     "tokens_per_s", "expert_load": [[fraction of routed tokens per expert] per layer], ...}
    {"kind": "eval",  "step", "tokens", "val_loss", "val_ppl", "sample", ...}

`make_plots(out_dir)` writes three figures next to it:

    loss.png          training LM loss (each logged step, and a moving average) and validation loss
                      against the optimizer step; the auxiliary load-balancing loss in a second panel
    learning_rate.png the learning-rate schedule as it ran (warmup, then the run's decay: wsd or cosine)
    expert_load.png   one heatmap per MoE layer: x = step, y = expert, colour = share of the
                      layer's routed (token, slot) pairs that went to that expert. A balanced
                      router is a flat colour at 1/n_expert; a collapsed one shows a few bright rows.
                      Below them, routing health over time (routing_health.py): the worst layer's
                      largest and smallest share against the balanced 1/n_expert, and the idle
                      experts of all layers.

Resumed runs append to the same file. A record logged after the checkpoint a run resumed from
is superseded by the resumed run's record for the same step: `read_metrics` keeps, for each kind,
the last record written for every step, in step order.

Run `python sparse_moe_transformer/src/training_plots.py OUT_DIR` (or the CLI's `--mode plot`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sparse_moe_transformer.src.routing_health import summarize_load
from sparse_moe_transformer.src.run_folder import METRICS_FILE  # noqa: E402

PLOT_FILES = ("loss.png", "learning_rate.png", "expert_load.png")


def read_metrics(path: str | Path) -> dict[str, list[dict]]:
    """Read a metrics.jsonl file -> {"train": [...], "eval": [...], ...} sorted by step.

    For each kind, a later record with the same step replaces the earlier one (a resumed run
    re-logs the steps after its checkpoint). Raises a clear error for a missing or broken file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no metrics file at {path}: train first (the training loop writes {METRICS_FILE} in --out-dir)"
        )
    by_kind: dict[str, dict[int, dict]] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for line_no, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if all(not rest.strip() for rest in lines[line_no:]):
                break  # a run killed mid-write can leave a partial last line: skip only that one
            raise ValueError(
                f"{path} line {line_no} is not JSON ({err}): the metrics file is damaged"
            ) from err
        if not isinstance(record, dict) or "kind" not in record or "step" not in record:
            raise ValueError(f"{path} line {line_no} has no 'kind'/'step': not a training metrics file")
        by_kind.setdefault(record["kind"], {})[int(record["step"])] = record
    return {kind: [records[s] for s in sorted(records)] for kind, records in by_kind.items()}


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (shorter at the start): [N] -> [N]."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(values) == 0:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))  # [N + 1]
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[start]) / (idx - start)


def expert_load_matrix(train_records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Stack the logged expert loads -> (steps [N], loads [L, E, N]). Records without loads are skipped."""
    rows = [(r["step"], r["expert_load"]) for r in train_records if r.get("expert_load")]
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0, 0))
    steps = np.array([s for s, _ in rows])
    loads = np.array([load for _, load in rows], dtype=np.float64)  # [N, L, E]
    return steps, loads.transpose(1, 2, 0)  # [L, E, N]


def load_health_series(train_records: list[dict]) -> dict[str, np.ndarray]:
    """Per logged expert load: steps, the worst layer's max and min share, the idle experts (all layers)."""
    rows = [(r["step"], summarize_load(r["expert_load"])) for r in train_records if r.get("expert_load")]
    return {
        "steps": np.array([step for step, _ in rows], dtype=np.int64),
        "max_share": np.array([s.max_share for _, s in rows]),
        "min_share": np.array([s.min_share for _, s in rows]),
        "idle_experts": np.array([s.idle_experts for _, s in rows], dtype=np.int64),
    }


def make_plots(out_dir: str | Path, metrics_path: str | Path | None = None) -> list[Path]:
    """Draw loss.png, learning_rate.png and expert_load.png into `out_dir`; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed; before the steps below import pyplot
    out_dir = Path(out_dir)
    metrics = read_metrics(metrics_path or out_dir / METRICS_FILE)
    train, evals = metrics.get("train", []), metrics.get("eval", [])
    if not train and not evals:
        raise ValueError(f"{out_dir / METRICS_FILE} holds no training or evaluation records yet")
    return [
        _plot_loss(train, evals, out_dir / "loss.png"),
        _plot_learning_rate(train, out_dir / "learning_rate.png"),
        _plot_expert_load(train, out_dir / "expert_load.png"),
    ]


def _plot_loss(train: list[dict], evals: list[dict], path: Path) -> Path:
    """Train LM loss (raw and smoothed) and validation loss above; the load-balancing aux loss below."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_aux) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=(3, 1))
    if train:
        steps = np.array([r["step"] for r in train])
        loss = np.array([r["loss"] for r in train])
        ax_loss.plot(steps, loss, color="tab:blue", alpha=0.3, lw=1, label="train LM loss")
        window = max(1, len(loss) // 20)
        ax_loss.plot(
            steps,
            moving_average(loss, window),
            color="tab:blue",
            lw=2,
            label=f"train LM loss (mean of {window} logs)",
        )
        aux = [r.get("aux_loss") for r in train]
        if all(a is not None for a in aux):
            ax_aux.plot(steps, aux, color="tab:purple", lw=1, label="load-balancing aux loss")
            ax_aux.axhline(1.0, color="grey", ls=":", lw=1, label="perfect balance (= 1)")
            ax_aux.legend(loc="upper right", fontsize=8)
    if evals:
        ax_loss.plot(
            [r["step"] for r in evals],
            [r["val_loss"] for r in evals],
            "o-",
            color="tab:orange",
            lw=2,
            label="validation loss",
        )
    ax_loss.set_ylabel("cross-entropy (nats / token)")
    ax_loss.set_title("Sparse MoE training: language-model loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_aux.set_xlabel("optimizer step")
    ax_aux.set_ylabel("aux loss")
    ax_aux.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _plot_learning_rate(train: list[dict], path: Path) -> Path:
    """The learning rate logged at each optimizer step."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    if train:
        ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate per optimizer step (AdamW's; Muon's follows it, scaled)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _plot_expert_load(train: list[dict], path: Path) -> Path:
    """One heatmap of expert load per layer over training, then the routing health of the worst layer."""
    import matplotlib.pyplot as plt

    steps, loads = expert_load_matrix(train)  # [N], [L, E, N]
    n_layer = max(1, loads.shape[0])
    fig, axes = plt.subplots(
        n_layer + 1, 1, figsize=(8, 3.2 + 1.6 * n_layer), sharex=True, squeeze=False,
        height_ratios=[1] * n_layer + [1.3],
    )  # fmt: skip
    health_ax, axes = axes[-1, 0], axes[:-1]
    if loads.size:
        n_expert = loads.shape[1]
        vmax = max(2.0 / n_expert, float(loads.max()))
        extent = (steps[0], steps[-1] if len(steps) > 1 else steps[0] + 1, n_expert - 0.5, -0.5)
        for layer, ax in enumerate(axes[:, 0]):
            image = ax.imshow(
                loads[layer],
                aspect="auto",
                interpolation="nearest",
                cmap="viridis",
                vmin=0.0,
                vmax=vmax,
                extent=extent,
            )
            ax.set_ylabel(f"layer {layer}\nexpert")
        fig.colorbar(image, ax=axes[:, 0].tolist(), label=f"share of routed tokens (balanced = 1/{n_expert})")
        axes[0, 0].set_title("Expert load per layer over training")
        _plot_load_health(health_ax, load_health_series(train), n_expert)
    else:
        axes[0, 0].text(0.5, 0.5, "no expert loads logged", ha="center", va="center")
    health_ax.set_xlabel("optimizer step")
    return _save(fig, path)


def _plot_load_health(ax, health: dict[str, np.ndarray], n_expert: int) -> None:
    """The worst layer's max and min share against the balanced share; idle experts on a second axis."""
    steps = health["steps"]
    ax.plot(steps, health["max_share"], color="tab:red", lw=1.5, label="worst layer: largest share")
    ax.plot(steps, health["min_share"], color="tab:blue", lw=1.5, label="worst layer: smallest share")
    ax.axhline(1 / n_expert, color="grey", ls=":", lw=1, label=f"balanced (1/{n_expert})")
    ax.set_ylabel("share")
    ax.set_ylim(bottom=0)
    idle_ax = ax.twinx()
    idle_ax.step(steps, health["idle_experts"], where="post", color="black", lw=1, label="idle experts")
    idle_ax.set_ylabel("idle experts")
    idle_ax.set_ylim(bottom=0, top=max(1, int(health["idle_experts"].max()) + 1))
    lines = ax.get_legend_handles_labels()
    idle = idle_ax.get_legend_handles_labels()
    ax.legend(lines[0] + idle[0], lines[1] + idle[1], loc="upper left", fontsize=7)
    ax.grid(alpha=0.3)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Draw the PNG plots of a training run from its metrics.jsonl."
    )
    parser.add_argument(
        "out_dir", help="the run's --out-dir (holding metrics.jsonl); the PNGs are written there"
    )
    args = parser.parse_args(argv)
    try:
        paths = make_plots(args.out_dir)
    except (OSError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
