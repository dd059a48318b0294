"""Memory-aware admission: how many network rows one call of a model may hold on its device.

A denoising call over N rows needs, beyond the weights already resident, activation memory that
grows linearly in N (every row runs the same U-Net on the same shape):

    peak(N) ≈ fixed + N · per_row

Two probe calls at start (`PROBE_ROWS` rows, after the weights are loaded and before the worker
takes jobs) measure peak(N₁) and peak(N₂) on the device's allocator, so

    per_row = (peak(N₂) − peak(N₁)) / (N₂ − N₁),    fixed = peak(N₁) − N₁ · per_row,

and the row limit is the largest N with fixed + N · per_row ≤ fraction · free, where `free` is the
device's free memory after the probe and `fraction` (`DDSERVE_MEMORY_FRACTION`) leaves room for the
allocator's fragmentation, the decoder and the other lanes. The worker's admission then never
builds a call larger than min(`max_batch`, limit), so the running set does not run out of memory
by construction.

What the probe cannot foresee — fragmentation, another process on the same GPU — is handled
after the fact: a call that still runs out of memory is split until the halves fit
(`workers.isolation`), no job fails for it, and the lane lowers its limit to what fitted, so the
next calls are built small enough instead of failing again.

Images of another size than the model's own (`size_multiple` models) run in a running set of
their own, whose limit is the measured one scaled by the area ratio (`row_limit_at`): a row's
activations grow with H·W, while the fixed part (the weights) does not, so this is a slight
under-estimate of what fits for larger sizes; a call that still runs out of memory is split and
lowers that set's limit as above.

The CPU has no allocator that torch can measure and no fixed memory pool, so on the CPU the probe
is skipped and `max_batch` alone is the limit (host memory errors are still split like any OOM).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

log = logging.getLogger(__name__)

PROBE_ROWS = (1, 4)  # the two call sizes measured at start


@dataclass(frozen=True)
class RowMemory:
    """Device memory of one network call: `fixed + rows · per_row` bytes at its peak."""

    fixed_bytes: int
    per_row_bytes: int

    def peak(self, rows: int) -> int:
        return self.fixed_bytes + rows * self.per_row_bytes


class MemoryGauge(Protocol):
    """A device's allocator as the probe sees it."""

    def free_bytes(self) -> int:
        """Memory the device can still hand out (bytes)."""
        ...

    def peak_of(self, call: Callable[[], object]) -> int:
        """Peak bytes allocated while `call` ran, above what was allocated before it."""
        ...


class CudaGauge:
    """The CUDA caching allocator of one device: free memory from the driver (`mem_get_info`, which
    counts other processes too), peaks from torch's allocator statistics."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def free_bytes(self) -> int:
        torch.cuda.empty_cache()  # cached blocks are free to this process's next calls
        free, _total = torch.cuda.mem_get_info(self.device)
        return int(free)

    def peak_of(self, call: Callable[[], object]) -> int:
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        call()
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device) - before)


def gauge_for(device: torch.device) -> MemoryGauge | None:
    """The device's gauge, or None where memory is not measured (the CPU)."""
    return CudaGauge(device) if device.type == "cuda" else None


def probe_row_memory(
    call: Callable[[int], object], gauge: MemoryGauge, rows: tuple[int, int] = PROBE_ROWS
) -> RowMemory:
    """Measure peak(N) of `call(N)` (one network call over N rows) at the two sizes of `rows`."""
    small, large = rows
    if not 0 < small < large:
        raise ValueError(f"probe sizes must satisfy 0 < N1 < N2, got {rows}")
    peak_small = gauge.peak_of(lambda: call(small))
    peak_large = gauge.peak_of(lambda: call(large))
    per_row = max(0, math.ceil((peak_large - peak_small) / (large - small)))
    fixed = max(0, peak_small - small * per_row)
    return RowMemory(fixed_bytes=fixed, per_row_bytes=per_row)


def row_limit(memory: RowMemory, free_bytes: int, fraction: float, max_batch: int) -> int:
    """The largest N ≤ max_batch with fixed + N · per_row ≤ fraction · free (at least 1: a call
    of one row that does not fit fails on its own rows, never the worker)."""
    budget = fraction * free_bytes - memory.fixed_bytes
    if memory.per_row_bytes <= 0:
        return max_batch
    return max(1, min(max_batch, int(budget // memory.per_row_bytes)))


def row_limit_at(
    limit: int | None, own: tuple[int, int], size: tuple[int, int], max_batch: int
) -> int | None:
    """The row limit of calls on images of `size` (height, width) for a model measured at its own
    size `own`: per_row ∝ H·W, so limit · (own area / area), between 1 and `max_batch` (None: not
    measured, the CPU)."""
    if limit is None:
        return None
    scaled = limit * (own[0] * own[1]) // (size[0] * size[1])
    return max(1, min(max_batch, scaled))


def measure_row_limit(
    name: str,
    call: Callable[[int], object],
    gauge: MemoryGauge | None,
    fraction: float,
    max_batch: int,
) -> int | None:
    """A model's row limit from a probe at start (None: not measured — the CPU, or the memory
    fraction set to 0), with a log line saying what it was derived from."""
    if gauge is None or fraction <= 0:
        return None
    memory = probe_row_memory(call, gauge)
    free = gauge.free_bytes()
    limit = row_limit(memory, free, fraction, max_batch)
    log.info(
        "model %s: %.1f MiB per row + %.1f MiB per call; %.0f MiB free × %.2f → at most %d rows "
        "per call (max_batch %d)",
        name,
        memory.per_row_bytes / 2**20,
        memory.fixed_bytes / 2**20,
        free / 2**20,
        fraction,
        limit,
        max_batch,
    )
    return limit
