"""Per-API-key request rate limit, counted in Redis so that every gateway process shares it.

A fixed one-minute window: key `{prefix}:ratelimit:{owner}:{minute}` is INCR'd (and given a TTL) in
one pipelined round trip; above `rate_limit_per_minute` the request gets a 429 whose Retry-After is
the time left in the window. It applies to job-creating requests of authenticated keys.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import redis


class RateLimiter:
    def __init__(
        self,
        connection: redis.Redis,
        prefix: str,
        per_minute: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.connection = connection
        self.prefix = prefix
        self.per_minute = per_minute
        self._clock = clock

    def hit(self, owner: str | None) -> int | None:
        """Count one request of `owner`; the Retry-After seconds if it is over the limit, else None."""
        if self.per_minute <= 0 or owner is None:
            return None
        now = self._clock()
        window = int(now // 60)
        key = f"{self.prefix}:ratelimit:{owner}:{window}"
        pipe = self.connection.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, 120)
        count, _ = pipe.execute()
        if int(count) > self.per_minute:
            return max(1, math.ceil(60 - now % 60))
        return None
