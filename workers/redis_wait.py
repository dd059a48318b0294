"""Waiting for Redis at a worker's start: a worker started before Redis (a host reboot, compose
starting services in parallel, Redis restarting) waits for it instead of crashing in RQ's
registration (which reads the connection's address and raised `ConnectionError` out of
`ddserve worker`). The wait backs off from `FIRST_S` to `MAX_S` and logs at most every `LOG_EVERY_S`;
a SIGTERM during it ends the process as usual (nothing is held yet)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)

FIRST_S = 0.5
MAX_S = 10.0
LOG_EVERY_S = 10.0


def wait_for_redis(
    connection: redis.Redis,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Return once `connection` answers PING; the number of failed attempts before it did."""
    delay, failures, last_log = FIRST_S, 0, float("-inf")
    while True:
        try:
            connection.ping()
            if failures:
                log.info("Redis answers after %d failed attempts; starting", failures)
            return failures
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            failures += 1
            now = clock()
            if now - last_log >= LOG_EVERY_S:
                log.warning("waiting for Redis (%s: %s); retrying", type(exc).__name__, exc)
                last_log = now
            sleep(delay)
            delay = min(delay * 2, MAX_S)
