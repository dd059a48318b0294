"""How fast the workers ran each finished job, read from the job's record (no worker endpoint):

- `ddserve_batch_size{model}` (histogram): images per network call — the largest number of network
  rows (images, guided ones counted twice) in any call the job ran in, `job.meta["batch_size"]`,
  written by the worker. Triton reports the same as `nv_inference_count / nv_inference_exec_count`.
- `ddserve_steps_per_second{model}` (histogram): denoising steps per second of run time of a
  generate or inpaint job: its step count (`job.meta["progress"]["total"]`, else the request's
  `num_inference_steps`) over `ended_at − started_at`.

`service.telemetry.Telemetry` observes each finished job once (its completion sweep); this module
only turns one job into observations, so it can be tested on its own.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from rq.job import Job

from ddserve.jobs import META_BATCH_SIZE, META_PROGRESS, JobKind

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STEP_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
_DENOISING_KINDS = frozenset({JobKind.GENERATE, JobKind.INPAINT})


def denoising_steps(job: Job) -> int | None:
    """Steps the job's samples took, for a generate or inpaint job; None for other kinds."""
    request: dict[str, Any] = job.kwargs.get("request") or {}
    if request.get("kind") not in _DENOISING_KINDS:
        return None
    progress = job.meta.get(META_PROGRESS) or {}
    steps = progress.get("total") or request.get("num_inference_steps")
    return int(steps) if steps else None


class JobPerformance:
    """The two histograms, registered in the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch_size = Histogram(
            "ddserve_batch_size",
            "images (network rows) per network call: the largest call each finished job ran in",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.steps_per_second = Histogram(
            "ddserve_steps_per_second",
            "denoising steps per second of run time, per finished generate or inpaint job",
            ["model"],
            buckets=STEP_RATE_BUCKETS,
            registry=registry,
        )

    def observe(self, model: str, job: Job) -> None:
        """One finished (succeeded) job."""
        rows = job.meta.get(META_BATCH_SIZE)
        if rows:
            self.batch_size.labels(model).observe(int(rows))
        steps = denoising_steps(job)
        if steps and job.started_at and job.ended_at:
            seconds = (job.ended_at - job.started_at).total_seconds()
            if seconds > 0:
                self.steps_per_second.labels(model).observe(steps / seconds)
