"""A worker started before Redis waits for it (`workers.redis_wait`) instead of crashing in RQ's
registration: PING with backoff until it answers, logging without flooding."""

from __future__ import annotations

import logging

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from workers.redis_wait import MAX_S, wait_for_redis


class FlakyRedis:
    """A connection that refuses `down` PINGs, then answers."""

    def __init__(self, down: int) -> None:
        self.down = down
        self.pings = 0

    def ping(self) -> bool:
        self.pings += 1
        if self.pings <= self.down:
            raise redis.ConnectionError("Error 111 connecting to redis:6379. Connection refused.")
        return True


def test_the_worker_waits_with_backoff_until_redis_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    connection = FlakyRedis(down=8)
    slept: list[float] = []
    now = [0.0]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    caplog.set_level(logging.INFO, logger="workers.redis_wait")
    failures = wait_for_redis(connection, sleep=sleep, clock=lambda: now[0])  # type: ignore[arg-type]
    assert failures == 8 and connection.pings == 9
    assert slept == [0.5, 1.0, 2.0, 4.0, 8.0, MAX_S, MAX_S, MAX_S]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert 1 < len(warnings) < 8  # at most one line per LOG_EVERY_S of waiting
    assert "answers after 8 failed attempts" in caplog.text


def test_a_reachable_redis_costs_one_ping() -> None:
    connection = FlakyRedis(down=0)
    assert wait_for_redis(connection, sleep=lambda s: None) == 0  # type: ignore[arg-type]
    assert connection.pings == 1


def test_a_real_connection_to_a_closed_port_keeps_waiting() -> None:
    """The error a worker got (a refused connection) is one it waits through. redis-py's own
    retries are off: by default each PING retries 10 times with backoff (~4.6 s here) before the
    same ConnectionError reaches the wait."""
    connection = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    attempts: list[float] = []

    def sleep(seconds: float) -> None:
        attempts.append(seconds)
        if len(attempts) == 3:
            raise KeyboardInterrupt  # the test's way out of the wait (as a SIGTERM would be)

    with pytest.raises(KeyboardInterrupt):
        wait_for_redis(connection, sleep=sleep)
    assert attempts == [0.5, 1.0, 2.0]
