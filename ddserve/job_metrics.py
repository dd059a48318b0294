"""Job outcome metrics: counted in Redis by the worker that ends each job, read by every gateway.

The worker that ends a job knows everything the metrics need (queue time, run time, images, the
rows of the network calls it ran in, the denoising steps), so it records the job then, in the same
pipeline that finishes it: no job is missed because its record expired before a scrape, and every
gateway process renders the same totals because they all read them from Redis.

Layout: one hash per model, `job_metrics_key(prefix, model)`, whose fields are counters:

| field | counts |
|---|---|
| `outcome:<outcome>` | attempts that ended so (`OUTCOMES`: a retried attempt is `retried`) |
| `images` | images produced by succeeded jobs |
| `<histogram>:le:<bound>` | observations in the bucket (previous bound, bound] — not cumulative, so one HINCRBY records one observation; `+Inf` above the last bound |
| `<histogram>:sum` | the sum of the observations (HINCRBYFLOAT) |

The histograms (`HISTOGRAMS`): `queue` (enqueued → started, s) and `compute` (started → ended, s)
for every attempt that ran; for succeeded jobs also `batch` (network rows of the largest call the
job ran in: images per network call, as Triton's `nv_inference_count / nv_inference_exec_count`)
and `steps_rate` (denoising steps per image over run time, generate and inpaint only).
`read_job_metrics` turns a hash back into Prometheus's cumulative buckets: a bound that left the
bucket list counts under the next listed bound above it, so changing buckets loses no observation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Outcome = Literal["succeeded", "failed", "canceled", "retried"]
OUTCOMES: tuple[Outcome, ...] = ("succeeded", "failed", "canceled", "retried")

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
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
STEP_RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)

QUEUE, COMPUTE, BATCH, STEP_RATE = "queue", "compute", "batch", "steps_rate"
HISTOGRAMS: dict[str, tuple[float, ...]] = {
    QUEUE: DURATION_BUCKETS,
    COMPUTE: DURATION_BUCKETS,
    BATCH: BATCH_BUCKETS,
    STEP_RATE: STEP_RATE_BUCKETS,
}
IMAGES = "images"
INF = "+Inf"


class HashIncrements(Protocol):
    """What recording needs of a redis-py pipeline (or client)."""

    def hincrby(self, name: str, key: str, amount: int = 1) -> Any: ...

    def hincrbyfloat(self, name: str, key: str, amount: float = 1.0) -> Any: ...


def job_metrics_key(prefix: str, model: str) -> str:
    return f"{prefix}:metrics:jobs:{model}"


def bucket_bound(bounds: tuple[float, ...], value: float) -> str:
    """The field suffix of the bucket `value` falls in: the first bound ≥ value, else +Inf."""
    for bound in bounds:
        if value <= bound:
            return repr(float(bound))
    return INF


@dataclass(frozen=True)
class JobOutcome:
    """One ended attempt of a job, as its worker saw it."""

    model: str
    outcome: Outcome
    queue_s: float | None  # enqueued → started; None if unknown
    run_s: float | None  # started → ended; None if it never started
    images: int = 0
    batch_rows: int | None = None
    steps: int | None = None  # denoising steps per image (generate, inpaint)

    @property
    def steps_per_second(self) -> float | None:
        if not self.steps or not self.run_s or self.run_s <= 0:
            return None
        return self.steps / self.run_s


def _observe(pipe: HashIncrements, key: str, histogram: str, value: float) -> None:
    bound = bucket_bound(HISTOGRAMS[histogram], value)
    pipe.hincrby(key, f"{histogram}:le:{bound}", 1)
    pipe.hincrbyfloat(key, f"{histogram}:sum", value)


def record_outcome(pipe: HashIncrements, prefix: str, outcome: JobOutcome) -> None:
    """Add the HINCRBY/HINCRBYFLOAT commands that count `outcome` to `pipe` (executed by the
    caller, with the job's other writes)."""
    key = job_metrics_key(prefix, outcome.model)
    pipe.hincrby(key, f"outcome:{outcome.outcome}", 1)
    if outcome.queue_s is not None:
        _observe(pipe, key, QUEUE, max(0.0, outcome.queue_s))
    if outcome.run_s is not None:
        _observe(pipe, key, COMPUTE, max(0.0, outcome.run_s))
    if outcome.outcome != "succeeded":
        return
    if outcome.images:
        pipe.hincrby(key, IMAGES, int(outcome.images))
    if outcome.batch_rows:
        _observe(pipe, key, BATCH, float(outcome.batch_rows))
    rate = outcome.steps_per_second
    if rate is not None:
        _observe(pipe, key, STEP_RATE, rate)


@dataclass
class HistogramCounts:
    """A histogram as Prometheus exposes it: cumulative counts per upper bound (+Inf last)."""

    buckets: list[tuple[float, int]]
    sum: float

    @property
    def count(self) -> int:
        return self.buckets[-1][1]


@dataclass
class ModelJobMetrics:
    """Everything recorded for one model."""

    outcomes: dict[str, int] = field(default_factory=dict)
    images: int = 0
    histograms: dict[str, HistogramCounts] = field(default_factory=dict)


def cumulative(
    bounds: tuple[float, ...], counts: dict[float, int], total: float
) -> HistogramCounts:
    """Per-bucket counts (by stored upper bound) → cumulative counts at `bounds` and +Inf."""
    buckets = [(b, sum(n for stored, n in counts.items() if stored <= b)) for b in bounds]
    buckets.append((math.inf, sum(counts.values())))
    return HistogramCounts(buckets, total)


def read_job_metrics(fields: dict[bytes, bytes]) -> ModelJobMetrics:
    """One model's hash (HGETALL) → its counters and cumulative histograms."""
    metrics = ModelJobMetrics()
    per_bucket: dict[str, dict[float, int]] = {name: {} for name in HISTOGRAMS}
    sums: dict[str, float] = dict.fromkeys(HISTOGRAMS, 0.0)
    for raw_name, raw_value in fields.items():
        name, value = raw_name.decode(), raw_value.decode()
        head, _, rest = name.partition(":")
        if name == IMAGES:
            metrics.images = int(value)
        elif head == "outcome":
            metrics.outcomes[rest] = int(value)
        elif head in HISTOGRAMS and rest == "sum":
            sums[head] = float(value)
        elif head in HISTOGRAMS and rest.startswith("le:"):
            bound = math.inf if rest[3:] == INF else float(rest[3:])
            per_bucket[head][bound] = per_bucket[head].get(bound, 0) + int(value)
    for name, bounds in HISTOGRAMS.items():
        metrics.histograms[name] = cumulative(bounds, per_bucket[name], sums[name])
    return metrics
