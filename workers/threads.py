"""How many threads a worker's network calls use: torch's intra-op pool and ONNX Runtime's.

torch's default is one thread per core, which a machine running anything else besides (the
gateway in the embedded mode, a second worker, the store threads) oversubscribes: on a loaded 2-core
machine a 16-image request took 30–40 s with the default and 3–5 s with one thread. So the count is
a setting (`DDSERVE_TORCH_THREADS`, `ddserve worker --threads`), and unset it is every core for a
worker process, every core but one for the embedded `ddserve serve`, where the gateway shares the
process. ONNX Runtime's intra-op threads follow torch's unless `DDSERVE_ORT_THREADS` says otherwise.
Both are logged when a worker starts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from ddserve.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadPlan:
    torch: int
    onnxruntime: int
    cores: int


def plan_threads(settings: Settings, *, embedded: bool, cores: int | None = None) -> ThreadPlan:
    """The thread counts for a worker in its own process (`embedded=False`) or beside the gateway."""
    available = cores if cores is not None else (os.cpu_count() or 1)
    automatic = max(1, available - 1) if embedded else available
    torch_threads = settings.torch_threads or automatic
    return ThreadPlan(torch_threads, settings.ort_threads or torch_threads, available)


def apply_threads(settings: Settings, *, embedded: bool) -> ThreadPlan:
    """Set torch's threads for this process and record ONNX Runtime's in `settings` (read when the
    codecs load); log both."""
    plan = plan_threads(settings, embedded=embedded)
    torch.set_num_threads(plan.torch)
    settings.ort_threads = plan.onnxruntime
    log.info(
        "threads: torch %d, ONNX Runtime %d (%d cores%s)",
        plan.torch,
        plan.onnxruntime,
        plan.cores,
        ", one left to the gateway" if embedded and settings.torch_threads is None else "",
    )
    return plan
