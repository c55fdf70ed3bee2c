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
    optimizer         the optimizer's state_dict (Muon momenta or AdamW moments, step counts, param groups)
    scaler            the fp16 GradScaler's state_dict (empty when disabled)
    step              optimizer steps done
    tokens            training tokens seen
    sampler           the BlockBatchSampler's state_dict (the data position)
    rng               one entry per DDP rank: python / numpy / torch (/ cuda) generator states
    config            the model Config as a dict (dataclasses.asdict)
    train_args        the training settings (batch size, lr, ...) as a dict: the learning-rate schedule
                      is a pure function of them and the step
    tokenizer         the tokenizer's to_state() dict: `generate` needs nothing but the checkpoint
    best_val_loss     the lowest validation loss seen (float or None)
    checksum          BLAKE2b of every other entry (tensor bytes, shapes, dtypes and plain values):
                      a bit flipped inside the tensor data is caught on load, with the file named

Writing goes through Phase 2's `save_checkpoint`: a temporary file in the same folder, flushed and
fsync'ed, then `os.replace`d over the target. A crash (or Ctrl-C, or a full disk) in the middle of a
save leaves the previous checkpoint intact. `best.pt` is produced the same way (copy to a temp file,
fsync, rename). A save that fails for lack of disk space says so and names what was kept.

The run folder is locked while a trainer writes into it (`RunFolderLock`), and temporary files that a
killed save left behind are removed when the next run starts there (`remove_stale_temp_files`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from phase2_architecture.src.atomic_files import atomic_write
from phase2_architecture.src.training_utils import check_finite_weights, read_checkpoint_file, save_checkpoint

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
    entries = dict(format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, **extra)
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
               "step": int(step), **entries}  # fmt: skip
    try:
        save_checkpoint(path, model, optimizer, step, checksum=payload_checksum(payload), **entries)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        kept = f"the previous {Path(path).name} is kept" if Path(path).exists() else "nothing was saved"
        message = f"the disk is full while saving {path}: {kept}; free some space, then --resume"
        raise OSError(errno.ENOSPC, message) from err
    return Path(path)


def payload_checksum(entries: dict) -> str:
    """BLAKE2b over a checkpoint's entries (the `checksum` and `path` entries excluded), in key order:
    each tensor's dtype, shape and bytes, and the repr of every plain value."""
    digest = hashlib.blake2b(digest_size=16)

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                if key not in ("checksum", "path"):
                    digest.update(f"K{key!r}".encode())
                    feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"V{value!r}".encode())

    feed(entries)
    return digest.hexdigest()


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
    """Load a checkpoint dict (a file, or a run folder's best.pt) and check it is ours.

    Read by Phase 2's `read_checkpoint_file` (weights_only=True, onto the CPU). FileNotFoundError for a
    missing file; ValueError for a corrupt, truncated or foreign file, or one whose weights hold NaN/inf
    (checksum or not).
    """
    path = resolve_checkpoint(path)
    remedy = f"use {BEST_NAME} or {LATEST_NAME} of a finished run, or train again"
    checkpoint = read_checkpoint_file(path, remedy)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
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
    if "checksum" in checkpoint and payload_checksum(checkpoint) != checkpoint["checksum"]:
        raise ValueError(
            f"{path} is damaged: its contents do not match the checksum written with it (bytes changed "
            f"on disk after the save); use the other checkpoint of the run ({BEST_NAME}/{LATEST_NAME}) "
            "or train again"
        )
    check_finite_weights(checkpoint["model"], path)  # the checksum cannot tell: NaN saved is NaN read
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


class RunFolderLock:
    """An exclusive lock on a run folder while one trainer writes into it (fcntl.flock on .lock).

    A second trainer pointed at the same --out-dir fails at once with a clear error instead of
    interleaving checkpoints; the lock is released when the process ends, even after kill -9."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True):
        self.path = Path(out_dir) / ".lock"
        self.enabled = enabled
        self.file = None

    def __enter__(self):
        if not self.enabled:
            return self
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here; run one trainer per folder
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise ValueError(
                f"another trainer ({holder}) is writing into {self.path.parent}: wait for it to finish, "
                "or choose another --out-dir"
            ) from None
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # closing releases the flock
        return False


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the `.tmp-*` files that atomic_write leaves when its process is killed mid-save.

    Call it only while holding the folder's RunFolderLock: then no save of ours is in progress."""
    removed = []
    for path in Path(folder).glob(".tmp-*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
