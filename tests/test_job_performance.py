"""service.job_performance: images per network call and denoising steps per second of finished
jobs, from the job records the worker leaves (RQ jobs on fakeredis)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fakeredis import FakeRedis
from prometheus_client import CollectorRegistry
from rq.job import Job

from ddserve.jobs import JOB_FUNCTION, META_BATCH_SIZE, META_PROGRESS
from service.job_performance import JobPerformance, denoising_steps


def _job(request: dict[str, Any], meta: dict[str, Any], run_s: float | None = 2.0) -> Job:
    job = Job.create(JOB_FUNCTION, kwargs={"request": request}, connection=FakeRedis())
    job.meta.update(meta)
    if run_s is not None:
        job.started_at = datetime(2026, 1, 1, tzinfo=UTC)
        job.ended_at = job.started_at + timedelta(seconds=run_s)
    return job


def _value(registry: CollectorRegistry, name: str, model: str = "m") -> float | None:
    return registry.get_sample_value(name, {"model": model})


def test_generate_job_gives_batch_size_and_step_rate() -> None:
    registry = CollectorRegistry()
    performance = JobPerformance(registry)
    request = {"kind": "generate", "model": "m", "n": 4, "num_inference_steps": 50}
    meta = {META_BATCH_SIZE: 24, META_PROGRESS: {"step": 50, "total": 50}}
    performance.observe("m", _job(request, meta, run_s=2.0))
    assert _value(registry, "ddserve_batch_size_count") == 1
    assert _value(registry, "ddserve_batch_size_sum") == 24
    assert _value(registry, "ddserve_steps_per_second_sum") == 25.0  # 50 steps in 2 s


def test_step_count_prefers_the_workers_total_over_the_request() -> None:
    # RePaint's jumps make more transitions than num_inference_steps: the worker's total counts.
    request = {"kind": "inpaint", "model": "m", "num_inference_steps": 20}
    assert denoising_steps(_job(request, {META_PROGRESS: {"step": 3, "total": 57}})) == 57
    assert denoising_steps(_job(request, {META_PROGRESS: None})) == 20
    assert denoising_steps(_job({"kind": "encode", "model": "m"}, {})) is None


def test_codec_jobs_and_unfinished_records_add_no_step_rate() -> None:
    registry = CollectorRegistry()
    performance = JobPerformance(registry)
    performance.observe("m", _job({"kind": "reconstruct", "model": "m"}, {META_BATCH_SIZE: 3}))
    performance.observe("m", _job({"kind": "generate", "num_inference_steps": 5}, {}, run_s=None))
    assert _value(registry, "ddserve_batch_size_count") == 1
    assert _value(registry, "ddserve_steps_per_second_count") is None
