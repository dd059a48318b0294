"""What the sync and async clients share about waiting: deadlines, `Prefer: wait`, job outcomes and
retries of 429/503 answers. No I/O here; the clients do the sleeping and the requests."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ddserve.client.errors import ApiError, JobCanceled, JobFailed, RateLimited, Unavailable
from ddserve.client.types import Job
from ddserve.jobs import JobStatus

MAX_PREFER_WAIT_S = 60  # the contract's ceiling for `Prefer: wait=N`
DEFAULT_RETRY_AFTER_S = 1.0  # when a 429/503 names no Retry-After
MAX_RETRY_SLEEP_S = 30.0


@dataclass(frozen=True)
class Deadline:
    """A point in `time.monotonic()` time, or none (wait for ever)."""

    at: float | None

    @classmethod
    def after(cls, timeout: float | None) -> Deadline:
        return cls(None if timeout is None else time.monotonic() + max(0.0, timeout))

    def remaining(self) -> float | None:
        """Seconds left (≥ 0), None without a deadline."""
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def sleep_for(self, poll_interval: float) -> float:
        """How long to sleep before the next poll: the interval, cut to what is left."""
        left = self.remaining()
        return poll_interval if left is None else min(poll_interval, left)


def prefer_wait(deadline: Deadline) -> int:
    """N of `Prefer: wait=N` for what is left of the deadline: whole seconds in [1, 60]."""
    left = deadline.remaining()
    if left is None:
        return MAX_PREFER_WAIT_S
    return max(1, min(MAX_PREFER_WAIT_S, math.ceil(left)))


def outcome(job: Job, raise_on_failure: bool) -> Job:
    """The finished job, or JobFailed / JobCanceled when asked to raise for them."""
    if raise_on_failure:
        if job.status == JobStatus.CANCELED:
            raise JobCanceled(job)
        if job.status == JobStatus.FAILED:
            raise JobFailed(job)
    return job


def retry_delay(error: ApiError, attempt: int, max_retries: int) -> float | None:
    """Seconds to sleep before retrying after `error` (attempt 0 = the first try), or None when the
    error is final: only 429 and 503 are retried (no job was created), at most `max_retries` times,
    after the server's Retry-After."""
    if attempt >= max_retries or not isinstance(error, RateLimited | Unavailable):
        return None
    delay = error.retry_after if error.retry_after is not None else DEFAULT_RETRY_AFTER_S
    return min(delay, MAX_RETRY_SLEEP_S)
