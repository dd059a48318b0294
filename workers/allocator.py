"""Keep memory the worker frees in its own heap, so that network calls on the CPU stop page-faulting.

glibc's malloc hands large freed blocks back to the kernel: a block above the *mmap threshold* is
unmapped when freed, and free space above the *trim threshold* at the top of the heap is released.
A U-Net forward on the CPU allocates its activations and frees them again in every call, so every
call faults the same pages in again, each one zeroed by the kernel. `benchmarks/bench_allocator.py`
measures it side by side (on this project's 2-vCPU CI machine, one torch thread, the benchmark's
small U-Net at 32 rows: 17–24 % of the CPU time in the kernel, and a median 1.2–1.4× slower than
with the memory kept).

`retain_freed_memory` raises both thresholds through `mallopt(3)`: blocks up to 32 MiB (glibc's
largest mmap threshold on 64-bit) come from the heap, and the heap is never trimmed. It is the CPU
counterpart of PyTorch's CUDA caching allocator, with the same cost: the process keeps its peak
heap. Setting either threshold by hand also turns off glibc's dynamic adjustment of them, which is
what we want: the thresholds no longer depend on the order of earlier allocations.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (4 MiB · sizeof(long))
NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def retain_freed_memory() -> bool:
    """Apply the thresholds to this process. True when applied; False where malloc is not glibc's
    (macOS, musl): there is nothing to change, and nothing breaks."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the C library the interpreter already uses
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
    )
    if not applied:
        log.warning(
            "mallopt refused the worker's heap thresholds; freed memory goes back to the OS"
        )
    return applied
