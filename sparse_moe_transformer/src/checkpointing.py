"""Checkpoints of the Sparse MoE training CLI: written atomically, read safely, checked on load.

A run folder (`--out-dir`) holds two checkpoints:

    latest.pt   the most recent state (every --save-interval steps, at each evaluation, at the end,
                on Ctrl-C); `--resume` continues from it
    best.pt     the state with the lowest validation loss so far (a copy of latest.pt made when an
                evaluation improves on the best), the one `generate` and `eval` use by default

What a checkpoint holds (a dict; everything is a tensor or a plain str/int/float/bool/None
container, so `torch.load(weights_only=True)` reads it without running any pickled code):

    format, version   identify the file as ours ("llm-foundation/sparse-moe", 1)
    model             the model's state_dict
    optimizer         AdamW's state_dict (moments, step counts, param groups)
    scheduler         the learning-rate schedule: its parameters and the step it has reached
    scaler            the fp16 GradScaler's state_dict (empty when disabled)
    step              optimizer steps done
    tokens            training tokens seen
    sampler           the BlockBatchSampler's state_dict (the data position)
    rng               one entry per DDP rank: python / numpy / torch (/ cuda) generator states
    config            the model Config as a dict (dataclasses.asdict)
    train_args        the training settings (batch size, lr, ...) as a dict
    tokenizer         the tokenizer's to_state() dict: `generate` needs nothing but the checkpoint
    best_val_loss     the lowest validation loss seen (float or None)

Writing goes through Phase 2's `save_checkpoint`: a temporary file in the same folder, flushed and
fsync'ed, then `os.replace`d over the target. A crash (or Ctrl-C, or a full disk) in the middle of a
save leaves the previous checkpoint intact. `best.pt` is produced the same way (copy to a temp file,
fsync, rename).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from phase2_architecture.src.atomic_files import atomic_write
from phase2_architecture.src.training_utils import save_checkpoint

CHECKPOINT_FORMAT = "llm-foundation/sparse-moe"
CHECKPOINT_VERSION = 1
LATEST_NAME = "latest.pt"
BEST_NAME = "best.pt"


def save_moe_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int, **extra
) -> Path:
    """Write one checkpoint atomically (see the module docstring for the entries).

    `model` must be the plain module (not the DDP or torch.compile wrapper) so the state_dict keys
    do not depend on how the run was launched. `extra` entries must be tensors or plain data.
    """
    if hasattr(model, "module") or hasattr(model, "_orig_mod"):
        raise TypeError(
            "save the unwrapped model (model.module for DDP, model._orig_mod for torch.compile): "
            "its state_dict keys must not depend on the wrapper"
        )
    save_checkpoint(
        path, model, optimizer, step, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, **extra
    )
    return Path(path)


def save_run_checkpoints(
    out_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    *,
    is_best: bool,
    **extra,
) -> list[Path]:
    """Write out_dir/latest.pt, and copy it to out_dir/best.pt when `is_best`; returns the paths written."""
    out_dir = Path(out_dir)
    latest = save_moe_checkpoint(out_dir / LATEST_NAME, model, optimizer, step, **extra)
    written = [latest]
    if is_best:
        written.append(atomic_copy(latest, out_dir / BEST_NAME))
    return written


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy `src` to a temp file next to `dst`, fsync it, and rename it over `dst`."""
    with atomic_write(dst) as out, open(src, "rb") as inp:
        shutil.copyfileobj(inp, out, length=16 << 20)
    return Path(dst)


def resolve_checkpoint(path: str | os.PathLike, prefer: str = BEST_NAME) -> Path:
    """A checkpoint file, or a run folder -> its `prefer` checkpoint (else the other one)."""
    path = Path(path)
    if path.is_dir():
        for name in (prefer, LATEST_NAME, BEST_NAME):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"no checkpoint in {path} (expected {BEST_NAME} or {LATEST_NAME}): "
            "train into this --out-dir first"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {path} (pass a .pt file or a run folder written by --mode train)"
        )
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint dict safely (weights_only=True, onto the CPU) and check it is ours.

    FileNotFoundError for a missing file; ValueError for a corrupt, truncated or foreign file.
    """
    path = resolve_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, random bytes, a pickle with forbidden objects, ...
        raise ValueError(
            f"cannot read checkpoint {path}: the file is corrupt or truncated, or was not written by this "
            f"project ({type(err).__name__}: {str(err).splitlines()[0][:200]}); use {BEST_NAME} or "
            f"{LATEST_NAME} of a finished run, or train again"
        ) from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a Sparse MoE checkpoint (no format={CHECKPOINT_FORMAT!r} entry): pass a file "
            "written by `train.py --mode train`"
        )
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} has checkpoint version {checkpoint.get('version')!r}; this code reads version "
            f"{CHECKPOINT_VERSION}: use the matching version of llm-foundation"
        )
    for key in ("model", "config", "step"):
        if key not in checkpoint:
            raise ValueError(f"{path} has no {key!r} entry: the checkpoint is incomplete")
    checkpoint["path"] = str(path)
    return checkpoint


def config_differences(saved: dict, current: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """'field: checkpoint X, now Y' for every field that differs (fields in `ignore` are skipped)."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            diffs.append(f"{key}: checkpoint {a!r}, now {b!r}")
    return diffs


def check_same_config(
    saved: dict, current: dict, path: str | os.PathLike, ignore: tuple[str, ...] = ()
) -> None:
    """Raise a ValueError listing every difference between the checkpoint's config and this run's."""
    diffs = config_differences(saved, current, ignore)
    if diffs:
        raise ValueError(
            f"checkpoint {path} was written for a different model config ({'; '.join(diffs)}): resume "
            "with the same --preset and --set values, or train into a new --out-dir"
        )


def load_model_state(model: nn.Module, checkpoint: dict) -> None:
    """Copy the checkpoint's weights into `model`; a clear ValueError when they do not fit."""
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        first = str(err).splitlines()
        raise ValueError(
            f"checkpoint {checkpoint.get('path', '')} does not match this model "
            f"({' '.join(first[:3])[:400]}): it was written for a different config"
        ) from err
