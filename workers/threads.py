"""How many threads a worker's network calls use: torch's intra-op pool and ONNX Runtime's.

torch's default is one thread per core, which a machine running anything else besides (the
gateway in the embedded mode, a second worker, the store threads) oversubscribes: on a loaded 2-core
machine a 16-image request took 30–40 s with the default and 3–5 s with one thread. So the count is
a setting (`DDSERVE_TORCH_THREADS`, `ddserve worker --threads`), and unset it is every core for a
worker process, every core but one for the embedded `ddserve serve`, where the gateway shares the
process. ONNX Runtime's intra-op threads follow torch's unless `DDSERVE_ORT_THREADS` says otherwise.
Both are logged when a worker starts.

The engine's prepare thread (text and first-stage encoding beside the steps,
`workers.engine.PrepareThread`) runs its torch calls with the cores the worker's count leaves
free, at least one (`spare_threads`): by default a worker takes every core, so an encoding under
way adds one thread to them, for its ~0.5 s; `DDSERVE_TORCH_THREADS` = cores − 1 leaves it a core
of its own. torch's count is per thread once a thread has run a parallel operator, but
`torch.set_num_threads` also sets the count threads started later begin with; `limit_this_thread`
changes the calling thread's alone.
"""

from __future__ import annotations

import logging
import os
import threading
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


def spare_threads(shared: int, cores: int | None = None) -> int:
    """Intra-op threads for a second thread of torch work beside `shared` threads: the cores
    those leave free, at least one."""
    available = cores if cores is not None else (os.cpu_count() or 1)
    return max(1, available - shared)


def limit_this_thread(threads: int) -> int:
    """Run the calling thread's torch operators on `threads` intra-op threads, leaving the count of
    every other thread as it was (the process's count, which threads started later take, is set
    back from a short-lived thread of its own); returns `threads`."""
    shared = torch.get_num_threads()  # this thread's count so far: the process's, if it is new
    torch.set_num_threads(threads)  # this thread's OpenMP/MKL count, and the process's
    restore = threading.Thread(target=torch.set_num_threads, args=(shared,), name="torch-threads")
    restore.start()
    restore.join()
    return threads
