"""ddserve.job_metrics: what a worker records when it ends a job, read back as Prometheus's
cumulative histograms (fakeredis)."""

from __future__ import annotations

import math

import pytest
from fakeredis import FakeRedis

from ddserve.job_metrics import (
    BATCH,
    COMPUTE,
    QUEUE,
    STEP_RATE,
    JobOutcome,
    bucket_bound,
    job_metrics_key,
    read_job_metrics,
    record_outcome,
)


def _recorded(*outcomes: JobOutcome) -> FakeRedis:
    connection = FakeRedis()
    pipe = connection.pipeline()
    for outcome in outcomes:
        record_outcome(pipe, "p", outcome)
    pipe.execute()
    return connection


def _read(connection: FakeRedis, model: str = "m"):
    return read_job_metrics(connection.hgetall(job_metrics_key("p", model)))


def test_a_value_on_a_bound_falls_in_that_bucket() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert bucket_bound(bounds, 0.0) == "1.0"
    assert bucket_bound(bounds, 2.0) == "2.0"
    assert bucket_bound(bounds, 2.0001) == "4.0"
    assert bucket_bound(bounds, 9.0) == "+Inf"


def test_outcomes_read_back_as_cumulative_histograms() -> None:
    connection = _recorded(
        JobOutcome("m", "succeeded", queue_s=0.5, run_s=2.0, images=4, batch_rows=24, steps=50),
        JobOutcome("m", "succeeded", queue_s=0.02, run_s=0.5, images=1, batch_rows=3, steps=10),
        JobOutcome("m", "failed", queue_s=700.0, run_s=0.1, images=0),
        JobOutcome("m", "retried", queue_s=None, run_s=None),
        JobOutcome("other", "canceled", queue_s=1.0, run_s=1.0),
    )
    metrics = _read(connection)
    assert metrics.outcomes == {"succeeded": 2, "failed": 1, "retried": 1}
    assert metrics.images == 5
    queue = dict(metrics.histograms[QUEUE].buckets)
    assert queue[0.01] == 0 and queue[0.025] == 1 and queue[0.5] == 2 and queue[600.0] == 2
    assert queue[math.inf] == 3 and metrics.histograms[QUEUE].sum == pytest.approx(700.52)
    assert metrics.histograms[COMPUTE].count == 3  # every attempt that ran
    assert metrics.histograms[BATCH].count == 2 and metrics.histograms[BATCH].sum == 27
    assert dict(metrics.histograms[BATCH].buckets)[4.0] == 1  # 3 rows; 24 rows is in (16, 32]
    rates = metrics.histograms[STEP_RATE]
    assert rates.count == 2 and rates.sum == 45.0  # 50 steps / 2 s + 10 steps / 0.5 s
    assert _read(connection, "other").outcomes == {"canceled": 1}


def test_failures_and_codec_jobs_add_no_images_batch_or_step_rate() -> None:
    connection = _recorded(
        JobOutcome("m", "failed", 0.1, 1.0, images=4, batch_rows=8, steps=20),
        JobOutcome("m", "succeeded", 0.1, 0.3, images=2, batch_rows=2, steps=None),  # a codec job
        JobOutcome("m", "succeeded", 0.1, 0.0, images=1, batch_rows=1, steps=20),  # no run time
    )
    metrics = _read(connection)
    assert metrics.images == 3
    assert metrics.histograms[BATCH].count == 2
    assert metrics.histograms[STEP_RATE].count == 0


def test_a_bound_no_longer_listed_counts_under_the_next_listed_one() -> None:
    connection = FakeRedis()
    key = job_metrics_key("p", "m")
    connection.hincrby(key, f"{QUEUE}:le:0.3", 2)  # recorded with an older bucket list
    connection.hincrby(key, f"{QUEUE}:le:+Inf", 1)
    queue = dict(_read(connection).histograms[QUEUE].buckets)
    assert queue[0.25] == 0 and queue[0.5] == 2 and queue[math.inf] == 3
