"""HTTP request counts and latencies of every gateway process, summed in Redis.

Each gateway process tallies its requests in memory (`RequestTally.observe`: a dictionary update,
no I/O on the request path) and adds its tally to two Redis hashes with HINCRBY/HINCRBYFLOAT, in one
pipeline, once a second and before it answers a scrape (`write`). Every process's `/metrics` reads
the same hashes, so Prometheus sees one set of totals whichever process answers; another process's
requests show up within a flush interval, and counters never go backwards.

Why Redis and not prometheus_client's multiprocess mode: the job metrics are in Redis already
(`ddserve.job_metrics`: workers count jobs there), and multiprocess mode would add a second
mechanism with its own constraints — an environment variable read at import time (global state),
a shared directory to wipe before each start and per-process files to mark dead, no custom
collectors (which read the job metrics from Redis at scrape time), and it still sums only the
processes of one host, while gateway replicas on several hosts share one Redis. A per-request
HINCRBY would have cost a round trip on routes that make none (health checks, validation errors,
image links); batching costs one round trip per process and second.

Layout: `{prefix}:metrics:requests` fields `<method> <status> <route>` → requests;
`{prefix}:metrics:request-duration` fields `<route> le <bound>` → requests in the bucket (previous
bound, bound] (not cumulative) and `<route> sum` → seconds.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass, field

from redis.client import Pipeline

from ddserve.job_metrics import INF, HistogramCounts, bucket_bound, cumulative

REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 60.0)


def requests_key(prefix: str) -> str:
    return f"{prefix}:metrics:requests"


def durations_key(prefix: str) -> str:
    return f"{prefix}:metrics:request-duration"


@dataclass
class Tally:
    """Requests counted since the last write."""

    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # method, status, route
    buckets: Counter[tuple[str, str]] = field(default_factory=Counter)  # route, bucket bound
    seconds: Counter[str] = field(default_factory=Counter)  # route → summed latency

    def __bool__(self) -> bool:
        return bool(self.counts)

    def merge(self, other: Tally) -> None:
        self.counts.update(other.counts)
        self.buckets.update(other.buckets)
        self.seconds.update(other.seconds)


class RequestTally:
    """This process's requests not yet added to Redis (thread-safe: the event loop observes,
    a worker thread writes)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._tally = Tally()

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        bound = bucket_bound(REQUEST_BUCKETS, seconds)
        with self._lock:
            self._tally.counts[(method, str(status), route)] += 1
            self._tally.buckets[(route, bound)] += 1
            self._tally.seconds[route] += seconds

    def take(self) -> Tally:
        """The tally so far; counting starts again from zero."""
        with self._lock:
            taken, self._tally = self._tally, Tally()
        return taken

    def give_back(self, tally: Tally) -> None:
        """A taken tally whose write failed: it is added again at the next write."""
        with self._lock:
            self._tally.merge(tally)

    def write(self, pipe: Pipeline, tally: Tally) -> None:
        """Add the HINCRBY/HINCRBYFLOAT commands that add `tally` to Redis to `pipe`."""
        counts_key, seconds_key = requests_key(self.prefix), durations_key(self.prefix)
        for (method, status, route), n in tally.counts.items():
            pipe.hincrby(counts_key, f"{method} {status} {route}", n)
        for (route, bound), n in tally.buckets.items():
            pipe.hincrby(seconds_key, f"{route} le {bound}", n)
        for route, seconds in tally.seconds.items():
            pipe.hincrbyfloat(seconds_key, f"{route} sum", seconds)


@dataclass
class RequestTotals:
    """What every gateway process has written: counts by (method, status, route) and latency
    histograms by route."""

    counts: dict[tuple[str, str, str], int]
    durations: dict[str, HistogramCounts]


def read_request_totals(counts: dict[bytes, bytes], durations: dict[bytes, bytes]) -> RequestTotals:
    """The two hashes (HGETALL) → totals with cumulative histogram buckets."""
    totals: dict[tuple[str, str, str], int] = {}
    for raw, value in counts.items():
        method, status, route = raw.decode().split(" ", 2)
        totals[(method, status, route)] = int(value)
    per_bucket: dict[str, dict[float, int]] = {}
    sums: dict[str, float] = {}
    for raw, value in durations.items():
        name = raw.decode()
        if name.endswith(" sum"):
            sums[name[: -len(" sum")]] = float(value)
            continue
        route, _, bound = name.rpartition(" le ")
        upper = math.inf if bound == INF else float(bound)
        per_bucket.setdefault(route, {})[upper] = int(value)
    histograms = {
        route: cumulative(REQUEST_BUCKETS, buckets, sums.get(route, 0.0))
        for route, buckets in per_bucket.items()
    }
    return RequestTotals(totals, histograms)
