"""What this machine computes fast: its facts, a short measurement, and the dtype choices made from them.

A dtype that is fast on one machine can be 60x slower on the next. On a CPU without AVX512-BF16 or AMX,
PyTorch computes bf16 and fp16 matmuls at 1-2 GFLOP/s against ~100 in fp32; a CPU with AMX runs bf16
several times faster than fp32. A Turing GPU (compute capability 7.5) has no bf16 at all, and a Quadro
T1000 (TU117) has no tensor cores, so whether its fp16 beats fp32 is a question, not a given. So every
dtype choice in the project is made here, from what the hardware says and, where that is not enough,
from what it does:

    hardware_facts(device)        CPU capability and native bf16/fp16, or GPU name, capability, memory
    matmul_gflops(device, dtype)  one representative matmul timed in that dtype (tens of ms, once per process)
    choose_newton_schulz_dtype    the dtype Muon's orthogonalisation iterates in (muon.py)
    choose_precision              the autocast dtype of a training run (`--precision auto`)

A Choice carries its reason ("bf16 matmul measured 0.02x fp32 here"), which run headers print and
results store beside every figure (`hardware_report`).
"""

from __future__ import annotations

import functools
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

FASTER = 1.2  # a low-precision dtype is chosen only when its matmul is measured >= 1.2x fp32's speed
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class HardwareFacts:
    """What the hardware says about itself, without running anything."""

    device: str  # "cpu" or "cuda:N"
    name: str  # CPU model or GPU name
    cpu_capability: str  # ATen's kernel level on this CPU: "AVX2", "AVX512", "DEFAULT" ...
    native_bf16: bool  # CPU: AVX512-BF16 or AMX; GPU: compute capability >= 8.0
    native_fp16: bool  # CPU: AVX512-FP16 or AMX-FP16; GPU: compute capability >= 5.3
    compute_capability: tuple[int, int] | None = None  # GPUs only
    memory_bytes: int | None = None  # GPUs only

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def summary(self) -> str:
        """One line for a run header."""
        if self.is_cuda:
            major, minor = self.compute_capability
            return (
                f"{self.name}, compute capability {major}.{minor}, {self.memory_bytes / 1024**3:.1f} GiB; "
                f"native bf16 {'yes' if self.native_bf16 else 'no'}"
            )
        return (
            f"{self.name}, {self.cpu_capability}; native bf16 {'yes' if self.native_bf16 else 'no'}, "
            f"native fp16 {'yes' if self.native_fp16 else 'no'}"
        )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_has(name: str) -> bool:
    """torch.cpu._is_<name>_supported(), False where this torch does not have the probe."""
    probe = getattr(torch.cpu, f"_is_{name}_supported", None)
    return bool(probe()) if probe is not None else False


@functools.cache
def _facts(device: str) -> HardwareFacts:
    cpu_capability = torch.backends.cpu.get_cpu_capability()
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        cc = (props.major, props.minor)
        # torch.cuda.is_bf16_supported() answers True on Turing too, where bf16 is only emulated:
        # the compute capability is the fact that matters.
        return HardwareFacts(
            device, props.name, cpu_capability, native_bf16=cc >= (8, 0), native_fp16=cc >= (5, 3),
            compute_capability=cc, memory_bytes=props.total_memory,
        )  # fmt: skip
    return HardwareFacts(
        "cpu", _cpu_name(), cpu_capability,
        native_bf16=_cpu_has("avx512_bf16") or _cpu_has("amx_tile"),
        native_fp16=_cpu_has("avx512_fp16") or _cpu_has("amx_fp16"),
    )  # fmt: skip


def hardware_facts(device: torch.device | str = "cpu") -> HardwareFacts:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _facts(f"cuda:{index}")
    return _facts("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    """Seconds for `repeats` matmuls a @ b (the first call of a dtype also warms its kernels up)."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return time.perf_counter() - start


@functools.cache
def _measured_gflops(device: str, dtypes: tuple[torch.dtype, ...]) -> dict[torch.dtype, float]:
    """Median GFLOP/s of an n x n matmul in each dtype, the dtypes taking turns in every round so that
    all of them see the same machine state (a shared host's speed swings within seconds). n = 256 on a
    CPU (an emulated bf16 matmul then takes ~15 ms), 2048 on a GPU; about 0.1 s in all on a CPU."""
    dev = torch.device(device)
    n = 2048 if dev.type == "cuda" else 256
    g = torch.Generator().manual_seed(0)
    pairs = {dt: [torch.randn(n, n, generator=g).to(dev, dt) for _ in range(2)] for dt in dtypes}
    threads = torch.get_num_threads()
    if dev.type == "cpu":  # one thread: a ratio per core, free of thread-pool wake-ups on a busy host
        torch.set_num_threads(1)
    try:
        return _interleaved_gflops(dev, pairs, n)
    finally:
        torch.set_num_threads(threads)


def _interleaved_gflops(dev: torch.device, pairs: dict, n: int) -> dict[torch.dtype, float]:
    repeats = {dt: max(1, min(50, math.ceil(3e-3 / _timed(dev, a, b, 1)))) for dt, (a, b) in pairs.items()}
    times: dict[torch.dtype, list[float]] = {dt: [] for dt in pairs}
    for _ in range(5):  # each timed sample lasts >= ~3 ms, so timer and scheduler noise stay small
        for dt, (a, b) in pairs.items():
            times[dt].append(_timed(dev, a, b, repeats[dt]) / repeats[dt])
    return {dt: 2 * n**3 / statistics.median(t) / 1e9 for dt, t in times.items()}


def matmul_gflops(device: torch.device | str, dtype: torch.dtype) -> float:
    """GFLOP/s of one representative matmul in `dtype` on `device` (measured in turns with fp32, once
    per process and dtype)."""
    facts = hardware_facts(device)
    dtypes = (torch.float32,) if dtype == torch.float32 else (torch.float32, dtype)
    return _measured_gflops(facts.device, dtypes)[dtype]


@dataclass(frozen=True)
class Choice:
    """A dtype decision and the reason for it."""

    what: str  # "newton_schulz" or "precision"
    name: str  # "fp32", "bf16" or "fp16"
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of a precision choice; None = plain fp32 (no autocast)."""
        return None if self.name == "fp32" else self.dtype


Gflops = Callable[[torch.dtype], float]  # dtype -> measured GFLOP/s (tests pass made-up timings)


def _fastest_measured(candidates: list[torch.dtype], gflops: Gflops) -> tuple[torch.dtype | None, str]:
    """The fastest candidate measured >= FASTER x fp32, or None; and the measurements as text."""
    fp32 = gflops(torch.float32)
    ratios = {dt: gflops(dt) / fp32 for dt in candidates}
    text = ", ".join(f"{DTYPE_NAMES[dt]} matmul measured {r:.2g}x fp32" for dt, r in ratios.items())
    winners = [dt for dt in candidates if ratios[dt] >= FASTER]
    return (max(winners, key=ratios.get) if winners else None), text


def choose_newton_schulz_dtype(
    requested: str = "auto",
    device: torch.device | str = "cpu",
    facts: HardwareFacts | None = None,
    gflops: Gflops | None = None,
) -> Choice:
    """The dtype Newton-Schulz iterates in for `requested` ("auto", or fp32/bf16/fp16 as asked).

    auto: bf16 where the hardware has it natively and it is measured faster than fp32; fp16 on GPUs where
    it is measured faster; fp32 otherwise. Newton-Schulz only needs singular values pushed near 1, so any
    of the three is accurate enough once the input is normalised in fp32 (muon.newton_schulz).
    """
    if requested not in PRECISIONS:
        raise ValueError(f"Newton-Schulz dtype must be one of {PRECISIONS}, got {requested!r}")
    if requested != "auto":
        return Choice("newton_schulz", requested, f"asked for {requested}")
    facts = facts or hardware_facts(device)
    gflops = gflops or functools.partial(matmul_gflops, facts.device)
    candidates = [torch.bfloat16] if facts.native_bf16 else []
    if facts.is_cuda and facts.native_fp16:
        candidates.append(torch.float16)
    if not candidates:
        where = "this GPU" if facts.is_cuda else f"this CPU ({facts.cpu_capability}, no AVX512-BF16/AMX)"
        return Choice("newton_schulz", "fp32", f"fp32: {where} has no native bf16")
    best, measured = _fastest_measured(candidates, gflops)
    if best is None:
        return Choice("newton_schulz", "fp32", f"fp32: {measured}")
    return Choice("newton_schulz", DTYPE_NAMES[best], f"{DTYPE_NAMES[best]}: {measured}")


def choose_precision(
    requested: str,
    device: torch.device | str = "cpu",
    facts: HardwareFacts | None = None,
    gflops: Gflops | None = None,
) -> Choice:
    """The training precision for `--precision requested` on this device.

    auto: fp32 on a CPU; bf16 on a GPU with native bf16 (compute capability >= 8.0); below that, fp16 with
    a GradScaler when fp16 matmuls are measured faster than fp32, else fp32 (a GPU without tensor cores,
    such as the T1000's TU117, may gain nothing from fp16 and would still pay its underflow risk).
    fp32/bf16/fp16 are taken as asked: CPU autocast supports both half types.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested != "auto":
        return Choice("precision", requested, f"--precision {requested}")
    facts = facts or hardware_facts(device)
    if not facts.is_cuda:
        return Choice("precision", "fp32", "auto: fp32 on a CPU")
    major, minor = facts.compute_capability
    if facts.native_bf16:
        return Choice("precision", "bf16", f"auto: compute capability {major}.{minor} has native bf16")
    gflops = gflops or functools.partial(matmul_gflops, facts.device)
    best, measured = _fastest_measured([torch.float16], gflops)
    no_bf16 = f"auto: compute capability {major}.{minor} < 8.0 has no native bf16"
    if best is None:
        return Choice("precision", "fp32", f"{no_bf16}, and {measured}, so fp32")
    return Choice("precision", "fp16", f"{no_bf16}; {measured}, so fp16 with a GradScaler")


def hardware_report(device: torch.device | str, *choices: Choice) -> dict:
    """The facts and decisions as a JSON-ready dict, stored beside every measured figure."""
    facts = hardware_facts(device)
    return {
        "facts": {**asdict(facts), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "decisions": {c.what: {"dtype": c.name, "reason": c.reason} for c in choices},
    }
