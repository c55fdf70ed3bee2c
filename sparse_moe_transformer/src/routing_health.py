"""Routing health: is every expert used? Read from the per-layer expert load the training loop logs.

At each log interval the loop records `expert_load`, for every MoE layer the share of its routed
(token, slot) pairs that went to each expert ([L][E], each row sums to 1; balanced = 1/E each). From it:

    summarize_load(expert_load)  -> LoadSummary   the worst layer (the one whose busiest expert takes the
                                                  largest share), its max and min share, and the idle
                                                  experts (share 0) over all layers: for the progress bar
    progress_postfix(summary)    -> dict          the same as short strings for tqdm's set_postfix
    CollapseWatch(n_expert, top_k).update(step, expert_load) -> str | None
                                                  a warning, returned once per run, when in some layer an
                                                  expert stays idle, or one expert keeps more than
                                                  `max_share` of the pairs, for `window` consecutive log
                                                  intervals; None otherwise (a healthy run stays silent)

Why a window: one log interval with an idle expert can be chance (few tokens, an early step); a collapse
persists. With top-k routing an expert takes at most 1/top_k of a layer's pairs (a token picks k
distinct experts), so a collapse onto k experts shows as k shares of 1/k and E - k idle experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from phase1_foundation.src.validation import check_int, check_number


@dataclass(frozen=True)
class LoadSummary:
    """The worst layer's shares and the idle experts of one logged expert load."""

    worst_layer: int  # the layer whose busiest expert takes the largest share
    max_share: float  # that expert's share
    min_share: float  # the least-used expert's share in the same layer
    idle_experts: int  # experts with share 0, summed over all layers
    n_expert: int


def load_array(expert_load) -> np.ndarray:
    """expert_load [L][E] (nested lists or an array) -> float64 [L, E], checked: non-negative shares."""
    load = np.asarray(expert_load, dtype=np.float64)
    if load.ndim != 2 or load.size == 0:
        raise ValueError(
            f"expert_load must be [n_layer][n_expert] shares (the metrics' 'expert_load'), "
            f"got shape {load.shape}"
        )
    if not np.isfinite(load).all() or (load < 0).any():
        raise ValueError("expert_load holds a negative or non-finite share: it must be token shares >= 0")
    return load


def summarize_load(expert_load, idle_share: float = 0.0) -> LoadSummary:
    """Worst layer's max/min share and the idle experts (share <= idle_share) of all layers."""
    load = load_array(expert_load)  # [L, E]
    worst = int(load.max(axis=1).argmax())
    return LoadSummary(
        worst_layer=worst,
        max_share=float(load[worst].max()),
        min_share=float(load[worst].min()),
        idle_experts=int((load <= idle_share).sum()),
        n_expert=load.shape[1],
    )


def progress_postfix(summary: LoadSummary) -> dict[str, str]:
    """For tqdm's set_postfix: the worst layer's max/min share (balanced = 1/E) and the idle experts."""
    return {
        "load": f"L{summary.worst_layer} {summary.max_share:.2f}/{summary.min_share:.2f}",
        "idle": str(summary.idle_experts),
    }


class CollapseWatch:
    """Warns once per run when routing collapses: in some layer an expert is idle (share <= idle_share),
    or one expert takes more than `max_share` of the pairs, for `window` consecutive log intervals.

    max_share defaults to 3/E (three times the balanced share) when top-k routing can reach it (an expert
    takes at most 1/top_k), else to halfway between 1/E and 1/top_k. With top_k = n_expert every expert
    takes 1/E of the pairs whatever the router does: only idle experts could be reported, and none can be.
    """

    def __init__(
        self,
        n_expert: int,
        top_k: int,
        window: int = 5,
        max_share: float | None = None,
        idle_share: float = 0.0,
        aux_loss_coef: float | None = None,
    ):
        check_int("CollapseWatch n_expert", n_expert, minimum=1)
        check_int("CollapseWatch top_k", top_k, minimum=1, maximum=n_expert)
        check_int("CollapseWatch window (log intervals)", window, minimum=1)
        if max_share is None:
            max_share = 3 / n_expert if 3 / n_expert < 1 / top_k else (1 / n_expert + 1 / top_k) / 2
        if top_k == n_expert:
            max_share = float("inf")  # no share can exceed 1/E (module docstring)
        elif not 1 / n_expert < max_share < 1 / top_k:
            raise ValueError(
                f"CollapseWatch max_share must lie between the balanced share 1/n_expert = "
                f"{1 / n_expert:.4g} and the most one expert can take, 1/top_k = {1 / top_k:.4g}; "
                f"got {max_share}"
            )
        check_number("CollapseWatch idle_share", idle_share, low=0, below=1 / n_expert)
        self.n_expert = n_expert
        self.window, self.max_share, self.idle_share = window, max_share, idle_share
        self.aux_loss_coef = aux_loss_coef
        self.idle_run: np.ndarray | None = None  # [L, E] consecutive intervals each expert was idle
        self.busy_run: np.ndarray | None = None  # [L, E] consecutive intervals each took > max_share
        self.warned = False

    def update(self, step: int, expert_load) -> str | None:
        """Feed one log interval's expert load [L][E]; returns the warning the first time a collapse
        has lasted `window` intervals, else None."""
        load = load_array(expert_load)  # [L, E]
        if load.shape[1] != self.n_expert:
            raise ValueError(
                f"expert_load has {load.shape[1]} experts per layer but the watch was built for "
                f"n_expert={self.n_expert}: build CollapseWatch with the model's Config.n_expert"
            )
        if self.idle_run is None or self.idle_run.shape != load.shape:
            self.idle_run, self.busy_run = np.zeros(load.shape, int), np.zeros(load.shape, int)
        # a streak grows while its condition holds and restarts at 0 when it does not
        self.idle_run = np.where(load <= self.idle_share, self.idle_run + 1, 0)
        self.busy_run = np.where(load > self.max_share, self.busy_run + 1, 0)
        if self.warned:
            return None
        for runs, what in ((self.busy_run, "busy"), (self.idle_run, "idle")):
            hits = np.argwhere(runs >= self.window)  # [n, 2] (layer, expert)
            if len(hits):
                self.warned = True
                layer, expert = (int(i) for i in hits[0])
                return self.message(step, layer, expert, what, load[layer])
        return None

    def message(self, step: int, layer: int, expert: int, what: str, shares: np.ndarray) -> str:
        n_idle = int((shares <= self.idle_share).sum())
        if what == "busy":
            problem = f"expert {expert} took more than {self.max_share:.3g} of the routed pairs"
        else:
            problem = f"expert {expert} received no tokens"
        coef = "" if self.aux_loss_coef is None else f" (now {self.aux_loss_coef:g})"
        return (
            f"WARNING routing collapse in layer {layer} at step {step}: {problem} for {self.window} "
            f"consecutive log intervals ({n_idle} of {self.n_expert} experts idle there, busiest "
            f"{shares.max():.3f}, balanced {1 / self.n_expert:.3f}). Fix: balance the load with "
            f"Config balance='bias', or raise aux_loss_coef{coef}. Shown once per run."
        )
