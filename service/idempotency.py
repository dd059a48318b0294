"""`Idempotency-Key`: the same key and body from the same API key return the same job.

The first request claims `{prefix}:idempotency:{owner}:{sha256(key)}` with SET NX (value:
fingerprint of the body, job id; TTL `idempotency_ttl_s`) *before* it enqueues, so two concurrent
requests with one key can never create two jobs. A later request with the same key gets the claimed
job; with a different body it gets a 422 (the key was reused for another request). A claim whose
request is then refused (queue full) is released so the client can retry with the same key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import redis

from service.errors import ApiError

MAX_KEY_LENGTH = 255


def fingerprint(kind: str, body: dict[str, Any]) -> str:
    """SHA-256 of the route and the body as sent (canonical JSON)."""
    text = json.dumps({"kind": kind, "body": body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"Idempotency-Key must be 1–{MAX_KEY_LENGTH} printable characters",
            "Idempotency-Key",
        )
    return key


class IdempotencyStore:
    def __init__(self, connection: redis.Redis, prefix: str, ttl_s: int) -> None:
        self.connection = connection
        self.prefix = prefix
        self.ttl_s = ttl_s

    def _key(self, owner: str | None, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{self.prefix}:idempotency:{owner or '-'}:{digest}"

    def claim(self, owner: str | None, key: str, body_fingerprint: str, job_id: str) -> str | None:
        """Claim `key` for `job_id`: None if claimed now, else the job id that holds it."""
        redis_key = self._key(owner, key)
        if self.connection.set(redis_key, f"{body_fingerprint}:{job_id}", nx=True, ex=self.ttl_s):
            return None
        raw = self.connection.get(redis_key)
        if raw is None:  # expired between the two calls: claim again
            return self.claim(owner, key, body_fingerprint, job_id)
        held_fingerprint, _, held_job = raw.decode().partition(":")
        if held_fingerprint != body_fingerprint:
            raise ApiError(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different request body",
                "Idempotency-Key",
            )
        return held_job

    def release(self, owner: str | None, key: str, job_id: str) -> None:
        """Drop our claim (only if it is still ours)."""
        redis_key = self._key(owner, key)
        raw = self.connection.get(redis_key)
        if raw is not None and raw.decode().endswith(f":{job_id}"):
            self.connection.delete(redis_key)
