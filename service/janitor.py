"""Periodic cleanup the gateway runs: expired images and stale job bookkeeping.

Finished job records expire through RQ's TTLs (`result_ttl_s`, `failure_ttl_s`). What RQ leaves
behind, and what only we know about, is handled here.

Every `abandoned_after_s / 4` (as often as a worker's maintenance, so that a dead worker's job ends
within about 1.25 × abandoned_after_s — 75 s with the defaults — even when no worker is left):
- jobs queued longer than `job_ttl_s` end `failed` (`job_expired`) — for models no worker serves;
  workers fail the ones they dequeue late themselves (`ddserve.recovery`);
- running jobs whose worker died are retried or failed (`worker_lost`) — normally the surviving or
  restarted workers of that model do it; this covers a model left with no worker at all. Only
  once this process has seen Redis answer for `recovery_grace_s` without a break (each round
  starts with a PING; `ddserve.recovery.RecoveryGrace`): after an outage longer than
  `abandoned_after_s` every running job's registry entry looks expired until its live worker
  heartbeats again, and sweeping before that would run those jobs twice or fail them.

Every `cleanup_interval_s`:
- images older than `image_ttl_s` in the storage backend;
- registry entries (finished / failed / canceled) past their expiry;
- cancel requests (the `{prefix}:canceled` set) for jobs that are gone or already finished.
A Redis lock (SET NX EX) lets one gateway process of many do a given cleanup round; the queues' own
maintenance lock (shared with the workers) keeps two processes from recovering the same job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.job import Job
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry

from ddserve.jobs import TERMINAL, public_status
from ddserve.recovery import RecoveryGrace, fail_expired, maintenance_lock, recover_abandoned
from ddserve.storage import Storage
from service.jobstore import JobStore

log = logging.getLogger("ddserve.janitor")


@dataclass
class CleanupReport:
    images_deleted: int = 0
    cancels_pruned: int = 0
    jobs_expired: int = 0
    recovered: bool = True  # the abandoned-job sweep ran (not within the recovery grace)
    ran: bool = True  # the cleanup part ran (recovery runs every round)


class Janitor:
    def __init__(
        self,
        store: JobStore,
        storage: Storage,
        image_ttl_s: float,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.storage = storage
        self.image_ttl_s = image_ttl_s
        self.cleanup_interval_s = interval_s
        self.recovery_interval_s = max(1.0, store.settings.abandoned_after_s / 4)
        self.interval_s = min(self.cleanup_interval_s, self.recovery_interval_s)  # between rounds
        self.lock_key = f"{store.prefix}:janitor:lock"
        self.grace = RecoveryGrace(store.settings.recovery_grace(), clock)

    def run_once(self, force: bool = False) -> CleanupReport:
        """One round: recovery of abandoned (`recovered` False within the recovery grace) and
        expired jobs, then the cleanup (skipped, `ran` False, if another process holds this
        cleanup interval's lock)."""
        conn = self.store.connection
        settings = self.store.settings
        report = CleanupReport()
        try:
            conn.ping()
        except (RedisConnectionError, RedisTimeoutError):
            self.grace.unreachable()
            raise
        self.grace.reachable()
        report.recovered = self.grace.open()
        for queue in self.store.queues.values():
            with maintenance_lock(queue, self.recovery_interval_s * 0.9) as got:
                if got:
                    if report.recovered:
                        recover_abandoned(queue)
                    report.jobs_expired += len(
                        fail_expired(queue, settings.job_ttl_s, settings.max_queue_length)
                    )
        lock_s = max(1, int(self.cleanup_interval_s * 0.9))
        if not force and not conn.set(self.lock_key, 1, nx=True, ex=lock_s):
            report.ran = False
            return report
        report.images_deleted = self.storage.delete_expired(self.image_ttl_s)
        for queue in self.store.queues.values():
            for registry in (
                FinishedJobRegistry(queue=queue),
                FailedJobRegistry(queue=queue),
                CanceledJobRegistry(queue=queue),
            ):
                registry.cleanup()
        report.cancels_pruned = self._prune_cancels()
        if report.images_deleted or report.cancels_pruned or report.jobs_expired:
            log.info(
                "cleanup: %d queued jobs expired, %d expired images deleted, %d stale cancel "
                "requests pruned",
                report.jobs_expired,
                report.images_deleted,
                report.cancels_pruned,
            )
        return report

    def _prune_cancels(self) -> int:
        conn = self.store.connection
        ids = [raw.decode() for raw in conn.smembers(self.store.cancel_key)]
        if not ids:
            return 0
        pipe = conn.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(Job.key_for(job_id), "status")
        stale = [
            job_id
            for job_id, status in zip(ids, pipe.execute(), strict=True)
            if status is None or public_status(status.decode()) in TERMINAL
        ]
        if stale:
            conn.srem(self.store.cancel_key, *stale)
        return len(stale)
