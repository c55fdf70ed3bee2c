"""Where and how a process trains: the device, the precision, the process group, stop requests.

setup_runtime     the device (CUDA when present), the autocast dtype and Muon's Newton-Schulz dtype
                  (asked of the hardware: Phase 3's hardware.py), and torchrun's process group
Runtime           what setup_runtime decided, with the autocast context and the hardware report
seed_everything   Python, NumPy and torch generators from one seed
unwrap            the plain model inside DDP / torch.compile wrappers
StopRequest       Ctrl-C / SIGTERM: save after this step, then stop (stop_requested: on every rank)
"""

from __future__ import annotations

import os
import random
import signal
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from phase3_components.src.hardware import (
    Choice,
    choose_newton_schulz_dtype,
    choose_precision,
    hardware_report,
)
from phase4_training.src.training_loop import autocast_context
from sparse_moe_transformer.src.cpu_memory import keep_freed_memory
from sparse_moe_transformer.src.rank_checks import process_group_timeout


@dataclass
class Runtime:
    """Where and how this process trains."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None = fp32 (no autocast)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    precision_reason: str = ""  # why this precision (printed in the run header)
    newton_schulz: Choice | None = None  # Muon's Newton-Schulz dtype and why (None: not decided here)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def hardware(self) -> dict:
        """The machine's facts and this run's dtype decisions (run header, metrics.jsonl, benchmarks)."""
        choices = [Choice("precision", self.precision, self.precision_reason)]
        return hardware_report(self.device, *choices, *([self.newton_schulz] if self.newton_schulz else []))

    def autocast(self):
        return autocast_context(self.device.type, self.amp_dtype)


def setup_runtime(device_name: str, precision: str, ns_dtype: str = "auto") -> Runtime:
    """Pick the device (CUDA when present), the autocast dtype and Newton-Schulz's dtype (asked of the
    hardware: Phase 3's hardware.py), and join torchrun's process group.

    Under `torchrun --nproc_per_node N`, RANK/WORLD_SIZE/LOCAL_RANK are set: GPUs use NCCL (one GPU
    per process, cuda:LOCAL_RANK), CPUs use gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available: use --device cpu")
    if device_name not in ("cpu", "cuda") and not device_name.startswith("cuda:"):
        raise ValueError(f"unknown --device {device_name!r}: use auto, cpu, cuda or cuda:N")
    device = torch.device(device_name)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not torch_dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch_dist.init_process_group(backend=backend, timeout=process_group_timeout())
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    choice = choose_precision(precision, device)
    if device.type == "cpu":
        keep_freed_memory()  # reuse big per-step buffers instead of page-faulting them in (cpu_memory.py)
    if device.type == "cuda":  # fp32 means IEEE fp32: TF32 would round matmul inputs to 10 mantissa bits
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    ns = choose_newton_schulz_dtype(ns_dtype, device)
    return Runtime(device, choice.autocast_dtype, rank, world_size, local_rank, choice.reason, ns)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def unwrap(model: nn.Module) -> nn.Module:
    """The plain SparseMoETransformer inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


class StopRequest:
    """SIGINT (Ctrl-C) / SIGTERM handler: the first signal asks the loop to save and stop after the
    current optimizer step; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
            "(press Ctrl-C again to quit at once)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def stop_requested(local: bool, rt: Runtime) -> bool:
    """True on every rank when any rank received Ctrl-C (so they all stop at the same step)."""
    if not rt.distributed:
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=rt.device)
    torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
    return bool(flag.item())


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or infinite."""
