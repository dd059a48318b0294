"""A private corner of the real Redis at 127.0.0.1:6379 for worker tests: its own key prefix, and a
cleanup that deletes every key the test's queues, jobs and workers created (RQ's job keys are not
prefixed, so jobs are tracked by id)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from redis import Redis
from rq.job import Job
from rq.queue import Queue

from ddserve.jobs import JOB_FUNCTION, queue_name

REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_or_skip() -> Redis:
    connection = Redis.from_url(REDIS_URL)
    try:
        connection.ping()
    except Exception as exc:  # pragma: no cover - only without a Redis server
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    return connection


class RedisSandbox:
    def __init__(self, connection: Redis) -> None:
        self.connection = connection
        self.prefix = f"ddtest-{uuid.uuid4().hex[:10]}"
        self.job_ids: list[str] = []
        self.worker_names: list[str] = []

    def queue(self, model: str) -> Queue:
        return Queue(queue_name(self.prefix, model), connection=self.connection)

    def enqueue(self, model: str, request: dict[str, Any], **options: Any) -> Job:
        """As the gateway enqueues: the job function with one keyword argument, `request`."""
        job = self.queue(model).enqueue_call(JOB_FUNCTION, kwargs={"request": request}, **options)
        self.job_ids.append(job.id)
        return job

    def track(self, job: Job) -> Job:
        self.job_ids.append(job.id)
        return job

    def cleanup(self) -> None:
        patterns = [f"*{self.prefix}*"]
        for job_id in self.job_ids:
            patterns += [f"rq:job:{job_id}*", f"rq:results:{job_id}*", f"rq:execution*{job_id}*"]
        for name in self.worker_names:
            patterns += [f"rq:worker:{name}*"]
            self.connection.srem("rq:workers", f"rq:worker:{name}")
        for pattern in patterns:
            keys = list(self.connection.scan_iter(match=pattern, count=1000))
            if keys:
                self.connection.delete(*keys)


@contextmanager
def sandbox() -> Iterator[RedisSandbox]:
    box = RedisSandbox(redis_or_skip())
    try:
        yield box
    finally:
        box.cleanup()


def wait_until(
    predicate: Callable[[], bool],
    timeout: float = 20.0,
    interval: float = 0.02,
    what: str = "condition",
) -> float:
    """Seconds until `predicate()` holds; AssertionError naming `what` after `timeout` seconds."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - started


def status(job: Job) -> str:
    """RQ's status string ("queued", "started", "finished", "failed", "stopped", "canceled")."""
    value = job.get_status(refresh=True)
    return str(getattr(value, "value", value))


def wait_terminal(jobs: list[Job], timeout: float = 30.0) -> None:
    terminal = {"finished", "failed", "stopped", "canceled"}
    wait_until(lambda: all(status(j) in terminal for j in jobs), timeout)
