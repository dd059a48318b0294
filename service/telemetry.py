"""Prometheus metrics of the whole deployment, read from Redis at scrape time, in the app's own
`CollectorRegistry` (never the global one).

Every number comes from Redis, so every gateway process (`ddserve serve --workers N`, replicas on
several hosts) answers a scrape with the same totals, and no job goes uncounted:

- `ddserve_requests_total{route,method,status}` (counter: Prometheus names counters `*_total`,
  which `promtool check metrics` enforces) and
  `ddserve_request_duration_seconds{route}` (histogram): the HTTP requests of every gateway
  process, which each adds to Redis once a second and before it answers a scrape
  (`service.request_metrics`);
- `ddserve_jobs{status}`, `ddserve_queue_depth{model}`, `ddserve_workers_alive{model}` (gauges):
  the queues, RQ's job registries and worker registrations as they are now; `ddserve_redis_up`;
- `ddserve_queue_duration_seconds{model}` (enqueued → started) and
  `ddserve_compute_duration_seconds{model}` (started → ended) of every attempt that ran,
  `ddserve_images_generated_total{model}`, `ddserve_batch_size{model}` (images per network call)
  and `ddserve_steps_per_second{model}` of succeeded jobs, and
  `ddserve_job_outcomes_total{model,outcome}`: counted by the worker that ended each job, when it
  ended it (`ddserve.job_metrics`), so a job whose record expired before the scrape still counts;
- `ddserve_webhook_deliveries_total{outcome}`: counted by the webhook workers
  (`service.webhooks.delivery`).

When Redis does not answer, the scrape shows `ddserve_redis_up 0` only (and the requests tallied
meanwhile are kept for the next write).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from ddserve.job_metrics import (
    BATCH,
    COMPUTE,
    OUTCOMES,
    QUEUE,
    STEP_RATE,
    HistogramCounts,
    ModelJobMetrics,
    job_metrics_key,
    read_job_metrics,
)
from service.jobstore import JobStore
from service.request_metrics import (
    RequestTally,
    RequestTotals,
    durations_key,
    read_request_totals,
    requests_key,
)
from service.webhooks.keys import counts_key

log = logging.getLogger("ddserve.metrics")

JOB_HISTOGRAMS = {  # ddserve.job_metrics histogram → metric name, help
    QUEUE: (
        "ddserve_queue_duration_seconds",
        "time a job waited in its queue (enqueued → started)",
    ),
    COMPUTE: ("ddserve_compute_duration_seconds", "time a job ran on a worker (started → ended)"),
    BATCH: (
        "ddserve_batch_size",
        "images (network rows) per network call: the largest call each succeeded job ran in",
    ),
    STEP_RATE: (
        "ddserve_steps_per_second",
        "denoising steps per second of run time, per succeeded generate or inpaint job",
    ),
}


def _buckets(histogram: HistogramCounts) -> list[tuple[str, float]]:
    return [
        ("+Inf" if math.isinf(bound) else floatToGoString(bound), count)
        for bound, count in histogram.buckets
    ]


class DeploymentCollector:
    """A prometheus_client collector whose every scrape reads Redis (one MULTI/EXEC that first
    adds this process's request tally, then reads the request and job-metric hashes; then the
    queue counts and worker registrations)."""

    def __init__(self, store: JobStore, tally: RequestTally) -> None:
        self.store = store
        self.tally = tally

    def describe(self) -> list[Metric]:
        return []  # no Redis read when the collector is registered

    def collect(self) -> Iterator[Metric]:
        try:
            requests, jobs, counts, alive = self._read()
        except redis.RedisError as exc:  # down, loading, read-only...: never a 500
            log.warning("metrics: Redis unavailable (%s)", type(exc).__name__)
            yield GaugeMetricFamily("ddserve_redis_up", "1 when Redis answered the scrape", 0)
            return
        yield GaugeMetricFamily("ddserve_redis_up", "1 when Redis answered the scrape", 1)
        yield from self._request_families(requests)
        yield from self._gauge_families(counts, alive)
        yield from self._job_families(jobs)
        try:
            webhooks = self.store.connection.hgetall(counts_key(self.store.prefix))
        except redis.RedisError:
            return
        deliveries = CounterMetricFamily(
            "ddserve_webhook_deliveries",
            "webhook delivery attempts by outcome: delivered, failed_attempts (retried later), "
            "dropped (no retry left within webhook_max_age_s), refused (URL not allowed at "
            "delivery)",
            labels=["outcome"],
        )
        for outcome, count in sorted(webhooks.items()):
            deliveries.add_metric([outcome.decode()], float(count))
        yield deliveries

    def _read(
        self,
    ) -> tuple[
        RequestTotals, dict[str, ModelJobMetrics], dict[str, dict[str, int]], dict[str, int]
    ]:
        store = self.store
        tally = self.tally.take()
        pipe = store.connection.pipeline(transaction=True)
        self.tally.write(pipe, tally)
        written = len(pipe)
        pipe.hgetall(requests_key(store.prefix))
        pipe.hgetall(durations_key(store.prefix))
        for model in store.queues:
            pipe.hgetall(job_metrics_key(store.prefix, model))
        try:
            answers = pipe.execute()[written:]
        except Exception:
            self.tally.give_back(tally)
            raise
        requests = read_request_totals(answers[0], answers[1])
        jobs = {
            model: read_job_metrics(fields)
            for model, fields in zip(store.queues, answers[2:], strict=True)
        }
        return requests, jobs, store.counts(), store.workers_alive()

    @staticmethod
    def _request_families(totals: RequestTotals) -> Iterator[Metric]:
        counts = CounterMetricFamily(
            "ddserve_requests",
            "HTTP requests by route and status",
            labels=["route", "method", "status"],
        )
        for (method, status, route), value in sorted(totals.counts.items()):
            counts.add_metric([route, method, status], value)
        yield counts
        durations = HistogramMetricFamily(
            "ddserve_request_duration_seconds",
            "time the gateway spent answering, by route",
            labels=["route"],
        )
        for route, histogram in sorted(totals.durations.items()):
            durations.add_metric([route], _buckets(histogram), histogram.sum)
        yield durations

    @staticmethod
    def _gauge_families(
        counts: dict[str, dict[str, int]], alive: dict[str, int]
    ) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("ddserve_jobs", "jobs on record by status", labels=["status"])
        depth = GaugeMetricFamily("ddserve_queue_depth", "jobs queued", labels=["model"])
        totals: dict[str, int] = {}
        for model, by_status in counts.items():
            depth.add_metric([model], by_status["queued"])
            for status, value in by_status.items():
                totals[status] = totals.get(status, 0) + value
        for status, value in totals.items():
            jobs.add_metric([status], value)
        workers = GaugeMetricFamily(
            "ddserve_workers_alive", "live workers listening per model", labels=["model"]
        )
        for model, count in alive.items():
            workers.add_metric([model], count)
        yield from (jobs, depth, workers)

    @staticmethod
    def _job_families(jobs: dict[str, ModelJobMetrics]) -> Iterator[Metric]:
        outcomes = CounterMetricFamily(
            "ddserve_job_outcomes",
            "ended job attempts by outcome (succeeded, failed, canceled, retried)",
            labels=["model", "outcome"],
        )
        images = CounterMetricFamily(
            "ddserve_images_generated", "images produced by succeeded jobs", labels=["model"]
        )
        histograms = {
            name: HistogramMetricFamily(metric, text, labels=["model"])
            for name, (metric, text) in JOB_HISTOGRAMS.items()
        }
        for model, metrics in jobs.items():
            for outcome in OUTCOMES:
                outcomes.add_metric([model, outcome], metrics.outcomes.get(outcome, 0))
            images.add_metric([model], metrics.images)
            for name, family in histograms.items():
                histogram = metrics.histograms[name]
                family.add_metric([model], _buckets(histogram), histogram.sum)
        yield from (outcomes, images, *histograms.values())


class Telemetry:
    """The metrics of one gateway app: its request tally and the registry that renders the
    deployment's metrics from Redis."""

    def __init__(self, store: JobStore) -> None:
        self.tally = RequestTally(store.prefix)
        self.store = store
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DeploymentCollector(store, self.tally))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.tally.observe(route, method, status, seconds)

    def flush(self) -> None:
        """Add this process's request tally to Redis (blocking: call it from a thread). On a
        Redis error the tally is kept for the next flush and the error raised."""
        tally = self.tally.take()
        if not tally:
            return
        pipe = self.store.connection.pipeline(transaction=True)
        self.tally.write(pipe, tally)
        try:
            pipe.execute()
        except Exception:
            self.tally.give_back(tally)
            raise

    def render(self) -> bytes:
        """Prometheus text format (blocking: reads Redis); every counter's samples end in
        `_total`, as prometheus_client writes them."""
        return generate_latest(self.registry)
