"""Prometheus metrics of one gateway app, in its own `CollectorRegistry` (never the global one).

Names follow Triton's style (`nv_inference_request_success` → `ddserve_request_count`):
- `ddserve_request_count{route,method,status}` (counter) and
  `ddserve_request_duration_seconds{route}` (histogram): every HTTP request, by route template;
- `ddserve_jobs{status}`, `ddserve_queue_depth{model}`, `ddserve_workers_alive{model}`,
  `ddserve_redis_up` (gauges, read from Redis at scrape time);
- `ddserve_queue_duration_seconds{model}` (enqueued → started) and
  `ddserve_compute_duration_seconds{model}` (started → completed) histograms and
  `ddserve_images_generated_total{model}`, with `ddserve_batch_size{model}` and
  `ddserve_steps_per_second{model}` (service.job_performance): observed once per finished job.
  At scrape time each gateway process reads the finished/failed registries from where it left
  off (their scores, whole seconds, grow with completion time; the cursor's own second is re-read)
  and claims each job with a SET NX marker, so that every job is counted once, by exactly one
  gateway process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry

from ddserve.jobs import JobKind
from service.job_performance import JobPerformance
from service.jobstore import JobStore

DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 60.0)
SWEEP_LIMIT = 5000  # jobs read per registry per scrape


class RequestCounter(Collector):
    """`ddserve_request_count`: a counter exposed under exactly that name, as Triton names its
    counters (prometheus_client's Counter would add `_total` to the samples)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str, str], int] = {}

    def inc(self, route: str, method: str, status: int) -> None:
        key = (route, method, str(status))
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        metric = Metric("ddserve_request_count", "HTTP requests by route and status", "counter")
        with self._lock:
            items = sorted(self._counts.items())
        for (route, method, status), value in items:
            metric.add_sample(
                "ddserve_request_count",
                {"route": route, "method": method, "status": status},
                value,
            )
        yield metric


class Telemetry:
    """The metric objects of one app and the scrape-time refresh from Redis."""

    def __init__(self, models: list[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = RequestCounter()
        self.registry.register(self.requests)
        r = self.registry
        self.request_duration = Histogram(
            "ddserve_request_duration_seconds",
            "time the gateway spent answering, by route",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.jobs = Gauge("ddserve_jobs", "jobs on record by status", ["status"], registry=r)
        self.queue_depth = Gauge("ddserve_queue_depth", "jobs queued", ["model"], registry=r)
        self.workers_alive = Gauge(
            "ddserve_workers_alive", "live workers listening per model", ["model"], registry=r
        )
        self.redis_up = Gauge("ddserve_redis_up", "1 when Redis answered the scrape", registry=r)
        self.queue_duration = Histogram(
            "ddserve_queue_duration_seconds",
            "time a job waited in its queue (enqueued → started)",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "ddserve_compute_duration_seconds",
            "time a job ran on a worker (started → completed)",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "ddserve_images_generated",
            "images produced by finished jobs",
            ["model"],
            registry=r,
        )
        self.performance = JobPerformance(r)  # ddserve_batch_size, ddserve_steps_per_second
        self.models = models
        self._cursors: dict[str, float] = {}
        self._sweep_lock = threading.Lock()

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.inc(route, method, status)
        self.request_duration.labels(route).observe(seconds)

    def render(self) -> bytes:
        """Prometheus text format. prometheus_client names every counter family `<name>_total`;
        Triton-style `ddserve_request_count` keeps its name, so its HELP/TYPE lines are renamed to
        match its samples."""
        text = generate_latest(self.registry)
        return text.replace(b" ddserve_request_count_total ", b" ddserve_request_count ")

    # --- scrape-time refresh (runs in a worker thread) ---

    def refresh(self, store: JobStore) -> None:
        """Gauges from Redis, then the completion sweep; Redis down → ddserve_redis_up 0."""
        try:
            counts = store.counts()
            alive = store.workers_alive()
            self._sweep(store)
        except Exception:
            self.redis_up.set(0)
            raise
        self.redis_up.set(1)
        totals: dict[str, int] = {}
        for model, by_status in counts.items():
            self.queue_depth.labels(model).set(by_status["queued"])
            for status, value in by_status.items():
                totals[status] = totals.get(status, 0) + value
        for status, value in totals.items():
            self.jobs.labels(status).set(value)
        for model, count in alive.items():
            self.workers_alive.labels(model).set(count)

    def _sweep(self, store: JobStore) -> None:
        with self._sweep_lock:
            conn = store.connection
            ttl = max(store.settings.result_ttl_s, store.settings.failure_ttl_s, 60)
            for model, queue in store.queues.items():
                registries = (
                    (FinishedJobRegistry(queue=queue), True),
                    (FailedJobRegistry(queue=queue), False),
                )
                for registry, succeeded in registries:
                    cursor = self._cursors.get(registry.key, 0.0)
                    entries = conn.zrangebyscore(
                        registry.key,
                        cursor,
                        "+inf",
                        start=0,
                        num=SWEEP_LIMIT,
                        withscores=True,
                    )
                    if not entries:
                        continue
                    self._cursors[registry.key] = max(score for _, score in entries)
                    ids = [member.decode().split(":", 1)[0] for member, _ in entries]
                    pipe = conn.pipeline(transaction=False)
                    for job_id in ids:
                        pipe.set(f"{store.prefix}:metrics:seen:{job_id}", 1, nx=True, ex=ttl)
                    mine = [job_id for job_id, new in zip(ids, pipe.execute(), strict=True) if new]
                    for job in Job.fetch_many(mine, connection=conn):
                        if job is not None:
                            self._observe(model, job, succeeded)

    def _observe(self, model: str, job: Job, succeeded: bool) -> None:
        if job.enqueued_at and job.started_at:
            self.queue_duration.labels(model).observe(
                max(0.0, (job.started_at - job.enqueued_at).total_seconds())
            )
        if job.started_at and job.ended_at:
            self.compute_duration.labels(model).observe(
                max(0.0, (job.ended_at - job.started_at).total_seconds())
            )
        if succeeded:
            self.performance.observe(model, job)
            count = _image_count(job)
            if count:
                self.images.labels(model).inc(count)


def _image_count(job: Job) -> int:
    """Images a finished job produced, from its request (no result read needed)."""
    try:
        request: dict[str, Any] = job.kwargs.get("request") or {}
    except Exception:
        return 0
    kind = request.get("kind")
    if kind in (JobKind.GENERATE, JobKind.INPAINT):
        return int(request.get("n") or 0)
    if kind == JobKind.RECONSTRUCT:
        return len(request.get("images") or [])
    if kind == JobKind.DECODE:
        return len(request.get("latents") or request.get("codes") or [])
    return 0
