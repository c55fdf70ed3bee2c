"""Keep freed memory for reuse on the CPU (glibc malloc), so big per-step buffers stop page-faulting.

PyTorch's CPU allocator calls malloc/free directly. glibc serves blocks above its mmap threshold
(at most 32 MiB) with a fresh mmap and returns them to the kernel on free. A training step allocates
the same big buffers every time: gradients (the stacked expert weights of the t1000 preset are 32 MiB
per matrix), activations, optimizer temporaries. Each of them then costs one page fault per 4 KiB
page on first touch, and the kernel zeroes every page: for a 16-expert MoE layer at 1024 tokens
that was about a fifth of the forward + backward time (BENCHMARKS.md).

`keep_freed_memory()` tells glibc to serve every block from its heap (M_MMAP_MAX = 0) and to keep
freed heap memory instead of trimming it (M_TRIM_THRESHOLD = 2 GiB), so the next step reuses pages
that are already mapped. This is what PyTorch's CPU performance guide gets by preloading jemalloc
or tcmalloc, without the extra library. The cost: the process keeps its peak memory until it exits.
It changes process-wide malloc settings, so the training CLI and the benchmarks call it (on the
CPU only); importing the model does not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: about 2 GiB of free heap is kept


def keep_freed_memory() -> bool:
    """Configure glibc malloc to reuse freed memory; True when applied, False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return all(mallopt(param, value) == 1 for param, value in settings)
