"""The batching worker's exchange with Redis: a round's writes out, the cancel set in.

The engine's rounds leave their progress writes, successes and outcome counts in the round's buffer
(`workers.step_writes.StepWrites`). The exchange sends them together — one pipeline, or, when jobs
succeeded, one ownership check and one transaction (`rq_bridge.finish_successes`) — and reads the
cancel set for the jobs held then, in the same transaction when no success needs its own.

In the loop it runs on a second thread beside a round's network calls (`begin`, then `settle` once
the round's step is done), at most every `redis_interval_ms`: the rounds between merge their
writes (a job's meta is written once, at its latest progress), and the answer from the cancel set
waits for the next round's sweep (`take_cancel_flags`). Why not every round: the exchange runs
Python (redis-py, RQ's serializers) that holds the GIL the network call needs between its
operators, so every exchange slows the step it overlaps by about its own CPU time. An idle worker
sends at once (`flush`).

A round Redis refuses is not lost: its progress and counts go with the next round, and each of its
successes waits as a deferred finish of its job (`RQJobs.defer`, retried by the loop).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq.worker import BaseWorker

from ddserve.jobs import cancel_set_key
from ddserve.settings import Settings
from workers import rq_bridge
from workers.rq_adaptor import REDIS_ERRORS, RQJobs
from workers.step_writes import Round, StepWrites, Success

log = logging.getLogger(__name__)


@dataclass
class RoundSent:
    """What sending a round's writes did (`RedisExchange._send`), settled on the loop's thread."""

    mine: list[Success] = field(default_factory=list)  # recorded
    held: list[Success] = field(default_factory=list)  # to retry one by one if the write failed
    cancel_flags: dict[str, bool] | None = None  # job id → in the cancel set (when it was read)
    write_error: BaseException | None = None
    cancel_error: BaseException | None = None  # the cancel set could not be read (writes went)


@dataclass
class Exchange:
    """An exchange under way on the I/O thread (`RedisExchange.begin`)."""

    taken: Round
    sent: Future[RoundSent]


class RedisExchange:
    """See the module docstring. `writes` is the buffer the jobs write into; `jobs` says which
    jobs this worker still owns, and keeps the finishes Redis refused."""

    def __init__(
        self, worker: BaseWorker, settings: Settings, jobs: RQJobs, writes: StepWrites
    ) -> None:
        self.worker = worker
        self.settings = settings
        self.jobs = jobs
        self.writes = writes
        self.next_at = 0.0  # time.monotonic() before which `begin` sends nothing
        self._cancel_flags: dict[str, bool] | None = None  # the latest exchange's, used once

    @property
    def connection(self) -> Redis:
        return self.worker.connection

    # --- the loop's calls -----------------------------------------------------------------------
    def flush(self) -> None:
        """Send the round's writes now (no cancel-set read). On a Redis error the progress and
        counts go with the next round, each success waits as a deferred finish, and the error is
        raised."""
        taken = self.writes.take()
        if taken:
            self.settle(Exchange(taken, _done(self._send(taken))))

    def begin(self, io: ThreadPoolExecutor, held: list[str]) -> Exchange | None:
        """Start an exchange on `io` — the writes made since the last one, and the cancel set for
        `held` — if the last one began at least `redis_interval_ms` ago and there is anything to
        send or read; `settle` it once the round's step is done."""
        started = time.monotonic()
        if started < self.next_at:
            return None
        taken = self.writes.take()
        if not taken and not held:
            return None
        self.next_at = started + self.settings.redis_interval_ms / 1000.0
        return Exchange(taken, io.submit(self._send_round, taken, held))

    def settle(self, exchange: Exchange) -> None:
        """On the loop's thread: log the recorded successes, or, when the write failed, keep its
        progress and counts for the next round and each success as a deferred finish, and raise
        the error (the loop backs off on a Redis error)."""
        taken, sent = exchange.taken, exchange.sent.result()
        for success in sent.mine:
            _log_success(success)
        error = sent.write_error
        if error is not None:
            if not isinstance(error, REDIS_ERRORS):
                raise error
            with self.jobs.lock:
                self.writes.give_back(taken)
                for success in sent.held:
                    self.jobs.defer(success.held, lambda s=success: self._finish_one(s))
            log.warning(
                "worker %s: Redis unavailable while writing a round (%d successes, %d progress "
                "writes) (%s); retrying when it is back",
                self.worker.name,
                len(sent.held),
                len(taken.metas),
                type(error).__name__,
            )
            raise error
        if sent.cancel_error is not None:
            raise sent.cancel_error
        if sent.cancel_flags is not None:
            self._cancel_flags = sent.cancel_flags

    def take_cancel_flags(self) -> dict[str, bool] | None:
        """The latest exchange's answer from the cancel set, once (None: none since)."""
        flags, self._cancel_flags = self._cancel_flags, None
        return flags

    # --- the cancel set -------------------------------------------------------------------------
    def cancel_requests(self, job_ids: list[str]) -> dict[str, bool]:
        """Which of `job_ids` are in the cancel set (one round trip)."""
        if not job_ids:
            return {}
        return _cancel_flags(job_ids, self._read_cancel_set(self.connection, job_ids))

    def _read_cancel_set(self, redis: Redis | Pipeline, job_ids: list[str]) -> Any:
        """SMISMEMBER of the cancel set for `job_ids`: the reply, or queued on a pipeline."""
        return redis.smismember(cancel_set_key(self.settings.key_prefix), job_ids)

    # --- the I/O thread's part ------------------------------------------------------------------
    def _send_round(self, taken: Round, held: list[str]) -> RoundSent:
        """The writes and the cancel set (never raises: the loop's thread settles errors)."""
        sent = self._send(taken, held) if taken else RoundSent()
        if sent.write_error is None and held and sent.cancel_flags is None:
            try:
                sent.cancel_flags = self.cancel_requests(held)
            except Exception as exc:
                sent.cancel_error = exc
        return sent

    def _send(self, taken: Round, held: list[str] | None = None) -> RoundSent:
        """Write a round, and read the cancel set for `held` in the same transaction when no
        success needs its own; safe off the loop's thread."""
        flags = None
        with self.jobs.lock:
            # A success's meta travels with the success (its transaction, or its deferred finish).
            for key in taken.successes:
                taken.metas.pop(key, None)
            succeeded = [
                s for s in taken.successes.values() if self.jobs.held.get(s.held.key) is s.held
            ]
            try:
                mine = self.jobs.still_owned(succeeded)
                if mine:
                    mine = self._finish(mine, taken)
                else:  # MULTI/EXEC: counts are applied all or not at all, so a retry adds once
                    pipe = self.connection.pipeline(transaction=True)
                    self.writes.queue_writes(pipe, taken, [])
                    if held:
                        self._read_cancel_set(pipe, held)
                    replies = pipe.execute()
                    if held:
                        flags = _cancel_flags(held, replies[-1])
            except Exception as exc:
                return RoundSent(held=succeeded, write_error=exc)
            for success in mine:
                self.jobs.forget(success.held)
        return RoundSent(mine=mine, held=succeeded, cancel_flags=flags)

    def _finish(self, successes: list[Success], taken: Round) -> list[Success]:
        """Record `successes` with the round's writes (`rq_bridge.finish_successes`: one
        transaction, each fenced by its attempt); returns those recorded. A stale one (its job
        handed out again since the ownership check) is dropped, logged and forgotten."""
        items = [s.item for s in successes]
        by_item = dict(zip(map(id, items), successes, strict=True))

        def extra(pipe: Pipeline, finished: list[rq_bridge.Succeeded]) -> None:
            self.writes.queue_writes(pipe, taken, [by_item[id(item)] for item in finished])

        stale = rq_bridge.finish_successes(self.worker, items, extra)
        dropped = {id(by_item[id(item)]) for item in stale}
        for item in stale:
            self.jobs.drop_stale(by_item[id(item)].held)
        return [s for s in successes if id(s) not in dropped]

    def _finish_one(self, success: Success) -> None:
        """A success whose round could not be written, recorded alone (a deferred finish); a
        stale one is dropped (`RQJobs.finish` forgets it)."""
        if self._finish([success], Round()):
            _log_success(success)


def _cancel_flags(job_ids: list[str], reply: list[Any]) -> dict[str, bool]:
    return {job_id: bool(flag) for job_id, flag in zip(job_ids, reply, strict=True)}


def _log_success(success: Success) -> None:
    extra = success.held.log_fields | {"batch_size": success.batch_rows}
    log.info("job %s succeeded", success.job.id, extra=extra)


def _done(sent: RoundSent) -> Future[RoundSent]:
    future: Future[RoundSent] = Future()
    future.set_result(sent)
    return future
