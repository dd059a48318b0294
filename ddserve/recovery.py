"""How every accepted job still ends when nobody finishes it: the recovery paths of the job queue.

A job normally ends in the worker that runs it (succeeded, failed, canceled). These are the ways it
ends otherwise — torch-free, so that both the gateway's janitor and the workers use them:

- **expired**: a job still queued `job_ttl_s` after it was enqueued ends `failed` with code
  `job_expired` — the worker checks when it dequeues it, the gateway's janitor sweeps the queues for
  the ones no worker takes (`fail_expired`). RQ's own queue `ttl` is not used: it deletes the job's
  record, and the job would then answer 404 instead of ending.
- **abandoned**: a running job's entry in RQ's started-job registry is refreshed by its worker's
  heartbeat; a worker killed with SIGKILL stops refreshing it, and once the entry is older than
  `abandoned_after_s` the next maintenance pass (`recover_abandoned`) retries the job if it has
  retries left, else fails it with code `worker_lost` (`record_abandoned`). Maintenance takes RQ's
  per-queue cleaning lock with a short expiry (`maintenance_lock`), so a worker killed while holding
  it delays the next pass by one interval, not by RQ's 15 minutes.
- **fencing**: a worker that was only frozen (stopped, swapped out, cut off from Redis) may find
  that its job was declared abandoned and handed out again meanwhile — to another worker, or to
  itself. Each delivery of a job is an **attempt**: the worker that takes a job increments the
  job's attempt counter (`ATTEMPT_FIELD` of its hash, in the transaction that marks it started)
  and runs it as that attempt. Only the current attempt of a `started` job may write its progress
  (`fenced_meta_write`: one Lua script, check and write at once) or finish it (WATCH on the job,
  the check, then MULTI/EXEC: successes in `workers.rq_bridge.finish_successes`, failures and
  cancels in `finish_failure` / `finish_stopped`, which mirror RQ's failure path's writes in that
  transaction). `owned` tells a worker whether an execution
  is still the job's current one (its registry entry exists, the job is `started` by this worker,
  in this attempt); a stale attempt's writes are dropped and logged, never failing the job, so no
  job is finished twice. The sweeps are fenced too (`drop_stale_entries`): RQ's sweep works by
  job id, so an expired registry entry left by an old execution (a heartbeat that refreshed it
  while a sweep retried the job) would make it retry or fail the job's current attempt; an
  expired entry of an execution that is not the job's current one (`EXECUTION_FIELD`) is removed
  instead, the job left alone.
- **grace after an outage**: while Redis is unreachable nobody heartbeats, so every running job's
  registry entry can expire during an outage longer than `abandoned_after_s` although its worker
  is alive. A sweep right after Redis returns would hand all of them out again (run twice) or fail
  them `worker_lost`. Every sweeper (the workers' maintenance, the gateway's janitor) therefore
  sweeps only once Redis has been reachable, as it observes it, for `recovery_grace_s`
  continuously (`RecoveryGrace`): long enough for every live worker to heartbeat again (≥ 2
  heartbeats), after which only dead workers' entries are still expired.
- **handed back**: a worker stopping before it could finish a job puts it back at the head of its
  queue (`requeue`), without using one of the job's retries — fenced like a finish, so a job the
  sweep already handed out again is not queued a second time.

A job failed here is also published as finished (`ddserve.notifications`), so that a gateway
holding a request on it answers at once: an expired job in the transaction that fails it, an
abandoned one (failed inside RQ's registry cleanup) right after that cleanup committed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError, WatchError
from rq.exceptions import AbandonedJobError, NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.queue import Queue
from rq.registry import StartedJobRegistry
from rq.registry import clean_registries as rq_clean_registries
from rq.timeouts import TimerDeathPenalty
from rq.utils import now, utcparse
from rq.worker_registration import clean_worker_registry

from ddserve.jobs import META_ERROR
from ddserve.notifications import prefix_of_queue, publish_finished

log = logging.getLogger("ddserve.recovery")

ATTEMPT_FIELD = "ddserve_attempt"  # job hash field: the number of its current attempt (1, 2, ...)
EXECUTION_FIELD = "ddserve_execution"  # job hash field: the id of its current attempt's execution
EXPIRED_CODE = "job_expired"
WORKER_LOST_CODE = "worker_lost"
ExceptionHandler = Callable[..., Any]


def expired_error(waited_s: float, ttl_s: float) -> dict[str, str]:
    """`job.meta["error"]` of a job that waited in its queue longer than `job_ttl_s`."""
    return {
        "type": "timeout_error",
        "code": EXPIRED_CODE,
        "message": f"the job waited {waited_s:.0f} s in its queue without a worker taking it "
        f"(job_ttl_s = {ttl_s:g}); submit it again",
    }


def worker_lost_error() -> dict[str, str]:
    """`job.meta["error"]` of a job whose worker died while running it, with no retry left."""
    return {
        "type": "server_error",
        "code": WORKER_LOST_CODE,
        "message": "the worker running this job died (no heartbeat) and the job has no retries "
        "left; submit it again",
    }


def record_abandoned(job: Job, exc_type: type, exc_value: BaseException, traceback: Any) -> None:
    """RQ exception handler: a job abandoned by a dead worker, about to be failed (no retries
    left), gets a clear error in its meta. Other exceptions pass through untouched."""
    if not (isinstance(exc_type, type) and issubclass(exc_type, AbandonedJobError)):
        return None
    log.warning(
        "job %s: its worker died while running it; %s",
        job.id,
        f"retrying ({job.retries_left} left)" if job.retries_left else "failing it (no retries)",
    )
    if not job.retries_left:
        job.meta[META_ERROR] = worker_lost_error()
        job.save_meta()
    return None


class RecoveryGrace:
    """Whether a sweeper may recover abandoned jobs now: only once Redis has been reachable,
    continuously as this process observed it, for `grace_s` seconds — so that, after an outage,
    live workers heartbeat their jobs again before anything is declared abandoned. A new process
    waits `grace_s` from its first successful contact too (it cannot know what came before).

    The sweeper reports what it sees: `reachable()` after a Redis call answered,
    `unreachable()` after one failed on a connection error; `clock` is injectable for tests.
    Thread-safe (a worker's heartbeat thread and loop both report)."""

    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s = float(grace_s)
        self.clock = clock
        self._since: float | None = None  # when Redis was last seen to answer after a failure
        self._lock = threading.Lock()

    def reachable(self) -> None:
        with self._lock:
            if self._since is None:
                self._since = self.clock()

    def unreachable(self) -> None:
        with self._lock:
            self._since = None

    def remaining_s(self) -> float | None:
        """Seconds until sweeping is allowed (0: now; None: Redis is not known to be reachable)."""
        with self._lock:
            since = self._since
        if since is None:
            return None
        return max(0.0, self.grace_s - (self.clock() - since))

    def open(self) -> bool:
        return self.remaining_s() == 0.0


def attempt_of(reply: bytes | str | None) -> int:
    """The attempt number stored in a job's hash (0 when it was never taken)."""
    if reply is None:
        return 0
    return int(reply.decode() if isinstance(reply, bytes) else reply)


# KEYS[1] = job hash; ARGV = attempt field, the writer's attempt, field to write, its value.
# The write happens only while the job is `started` in the writer's attempt (else 0 is returned).
_FENCED_HSET = """
local current = redis.call('HMGET', KEYS[1], ARGV[1], 'status')
if current[1] ~= ARGV[2] or current[2] ~= 'started' then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
return 1
"""


def fenced_meta_write(pipe: Redis | Pipeline, job: Job, attempt: int) -> Any:
    """Queue (or run) the write of `job.meta`, done only if the job is still `started` in
    `attempt` (one EVAL, atomic in Redis; its reply is 1 if written, 0 if dropped as stale)."""
    return pipe.eval(
        _FENCED_HSET, 1, job.key, ATTEMPT_FIELD, str(attempt), "meta", job._serialize_meta()
    )


# KEYS[1] = a started registry; ARGV = now, the job key prefix, the execution field. Removes the
# expired entries ("<job id>:<execution id>") of executions that are not their job's current one.
_DROP_STALE_ENTRIES = """
local dropped = 0
for _, entry in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], 0, ARGV[1])) do
  local job_id, execution_id = string.match(entry, '^(.*):([^:]*)$')
  if job_id then
    local current = redis.call('HGET', ARGV[2] .. job_id, ARGV[3])
    if current and current ~= execution_id then
      redis.call('ZREM', KEYS[1], entry)
      dropped = dropped + 1
    end
  end
end
return dropped
"""


def drop_stale_entries(queue: Queue) -> int:
    """Before a sweep of the queue's started registry: remove the expired entries of executions
    that are no longer their job's current one, in one script (atomic), so that RQ's sweep — by
    job id — cannot retry or fail the current attempt for them. Jobs started by a plain RQ worker
    (no `EXECUTION_FIELD`) are left to RQ. Returns how many were removed."""
    registry = StartedJobRegistry(queue=queue)
    dropped = int(
        queue.connection.eval(
            _DROP_STALE_ENTRIES,
            1,
            registry.key,
            int(time.time()),
            Job.redis_job_namespace_prefix,
            EXECUTION_FIELD,
        )
    )
    if dropped:
        log.warning(
            "queue %s: %d expired registry entries of stale executions removed (their jobs run "
            "on in a later attempt)",
            queue.name,
            dropped,
        )
    return dropped


@contextlib.contextmanager
def maintenance_lock(queue: Queue, lock_s: float) -> Iterator[bool]:
    """RQ's per-queue cleaning lock (the key RQ's workers use), held at most `lock_s` seconds.
    Yields whether this process got it; releases it afterwards."""
    got = bool(
        queue.connection.set(queue.registry_cleaning_key, 1, nx=True, ex=max(1, int(lock_s)))
    )
    try:
        yield got
    finally:
        if got:
            queue.connection.delete(queue.registry_cleaning_key)


class AbandonedFailures:
    """An RQ exception handler that notes the abandoned jobs RQ's registry cleanup is about to fail
    (no retries left; it calls its handlers before queuing the failure), so that they can be
    published as finished once the cleanup's pipeline has run (`publish`)."""

    def __init__(self) -> None:
        self.job_ids: list[str] = []

    def __call__(self, job: Job, exc_type: type, exc_value: BaseException, traceback: Any) -> None:
        abandoned = isinstance(exc_type, type) and issubclass(exc_type, AbandonedJobError)
        if abandoned and not job.retries_left:  # what cleanup checks before failing it
            self.job_ids.append(job.id)
        return None

    def publish(self, queue: Queue) -> None:
        """One pipeline for all of them. A Redis error is only logged: the failures are written,
        and the gateways' safety poll finds them without the message."""
        if not self.job_ids:
            return
        prefix = prefix_of_queue(queue.name)
        pipe = queue.connection.pipeline(transaction=False)
        for job_id in self.job_ids:
            publish_finished(pipe, prefix, job_id)
        try:
            pipe.execute()
        except RedisError as exc:
            log.warning(
                "could not publish %d lost jobs (%s)", len(self.job_ids), type(exc).__name__
            )
        self.job_ids.clear()


def recover_abandoned(queue: Queue, handlers: list[ExceptionHandler] | None = None) -> None:
    """Retry or fail the queue's jobs whose started-registry entry expired (their worker died).
    Call it holding `maintenance_lock`. The timer death penalty lets it run in any thread."""
    drop_stale_entries(queue)
    registry = StartedJobRegistry(queue=queue, death_penalty_class=TimerDeathPenalty)
    failed = AbandonedFailures()
    handlers = handlers if handlers is not None else [record_abandoned]
    registry.cleanup(exception_handlers=[*handlers, failed])
    failed.publish(queue)


def clean_queue(worker: Any, queue: Queue) -> None:
    """A worker's maintenance of one queue, as RQ's `clean_registries` does it (call it holding
    `maintenance_lock`): expired registry entries — abandoned jobs retried or failed with a clear
    error —, dead workers' registrations, and jobs stuck between dequeue and start."""
    failed = AbandonedFailures()
    drop_stale_entries(queue)
    rq_clean_registries(queue, [record_abandoned, failed])
    failed.publish(queue)
    clean_worker_registry(queue)
    queue.intermediate_queue.cleanup(worker, queue)


def fail_expired(queue: Queue, ttl_s: float, limit: int = 10_000) -> list[str]:
    """Fail (code `job_expired`) the first `limit` jobs of the queue that were enqueued more than
    `ttl_s` seconds ago. A job is taken out of the queue with LREM first, so a worker dequeuing it
    at the same moment either gets it or not — never both. Returns the failed job ids."""
    connection: Redis = queue.connection
    job_ids = [raw.decode() for raw in connection.lrange(queue.key, 0, limit - 1)]
    if not job_ids:
        return []
    pipe = connection.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hget(Job.key_for(job_id), "enqueued_at")
    stamps = pipe.execute()
    current = time.time()
    failed = []
    for job_id, stamp in zip(job_ids, stamps, strict=True):
        if stamp is None:
            continue
        waited = current - _timestamp(stamp.decode())
        if waited <= ttl_s or not connection.lrem(queue.key, 0, job_id):
            continue
        try:
            job = Job.fetch(job_id, connection=connection)
        except NoSuchJobError:
            continue
        job.meta[META_ERROR] = expired_error(waited, ttl_s)
        job.save_meta()
        job.ended_at = now()  # saved with the job by the failed-job registry
        with connection.pipeline() as pipeline:
            record_job_failure(job, f"expired after {waited:.0f} s in the queue", pipeline)
            publish_finished(pipeline, prefix_of_queue(queue.name), job_id)
            pipeline.execute()
        failed.append(job_id)
        log.warning("job %s: expired after %.0f s in queue %s", job_id, waited, queue.name)
    return failed


def _timestamp(text: str) -> float:
    return utcparse(text).timestamp()


def owned(
    connection: Redis, worker_name: str, running: list[tuple[Job, Execution, int]]
) -> list[bool]:
    """For each (job, execution, attempt) a worker holds: is the execution still the job's current
    one? It is unless the job was declared abandoned meanwhile (its started-registry entry is
    gone, its status is no longer `started`) or taken again since — by another worker or by this
    one (a later attempt). One pipelined round trip for all of them."""
    if not running:
        return []
    pipe = connection.pipeline(transaction=False)
    for job, execution, _ in running:
        pipe.zscore(
            StartedJobRegistry(job.origin, connection=connection).key, execution.composite_key
        )
        pipe.hmget(job.key, "status", "worker_name", ATTEMPT_FIELD)
    answers = pipe.execute()
    out = []
    for i, (_, _, attempt) in enumerate(running):
        score, (status, name, current) = answers[2 * i], answers[2 * i + 1]
        out.append(
            score is not None
            and status is not None
            and status.decode() == JobStatus.STARTED.value
            and name is not None
            and name.decode() == worker_name
            and attempt_of(current) == attempt
        )
    return out


def is_current(connection: Redis | Pipeline, job: Job, attempt: int) -> bool:
    """Whether `job` is still `started` in `attempt`, read now (on a pipeline after its WATCH: at
    once) — the check of every fenced finish, between its WATCH and its MULTI/EXEC."""
    current, status = connection.hmget(job.key, [ATTEMPT_FIELD, "status"])
    started = status is not None and status.decode() == JobStatus.STARTED.value
    return started and attempt_of(current) == attempt


def requeue(
    worker: Any, job: Job, queue: Queue, execution: Execution, attempt: int | None = None
) -> bool:
    """Hand a started job back: end this execution and put the job at the head of its queue
    (status `queued` again, retries untouched), in one transaction — fenced by `attempt` when
    given (WATCH the job, `is_current`, MULTI/EXEC: a sweep that handed the job out meanwhile
    makes it write nothing, and False is returned, instead of queuing the job a second time)."""
    with worker.connection.pipeline() as pipeline:
        while True:
            try:
                if attempt is not None:
                    pipeline.watch(job.key)
                    if not is_current(pipeline, job, attempt):
                        return False
                pipeline.multi()  # explicit, as RQ expects of a caller's pipeline
                execution.delete(job=job, pipeline=pipeline)
                queue.enqueue_job(job, pipeline=pipeline, at_front=True)
                pipeline.execute()
                break
            except WatchError:
                continue
    worker.executions.pop(execution.id, None)
    return True
