"""The batching worker's RQ side: the jobs it took, from their start to their end.

One `WorkerJob` per dequeued RQ job holds everything the worker knows of it — the RQ job, queue
and execution, its attempt, its spec, deadline and log fields, whether another worker (or a later
attempt) owns it now, and a finish Redis refused — and is what the engine sees as that job's
ticket (`workers.engine.Ticket`). They are keyed by (job id, attempt) (`WorkerJob.key`): a job
handed out again by the recovery sweep while this worker still ran it (a long Redis outage) may be
taken by this same worker, and the two executions must not collide — the stale one's end must
never remove, or finish, the current one (`ddserve.recovery`, fencing).
`RQJobs` owns those objects: it starts them (RQ's start writes, the expiry and contract checks),
heartbeats them, finishes them as RQ's own paths do (`workers.rq_bridge`: success, failure,
stop; `ddserve.recovery.requeue`) while this worker still owns them, each finish in a transaction
fenced by the job's attempt, and keeps a finish that hit a Redis error for the loop to retry
(`finish_deferred`), so no outcome is lost and none is recorded twice.

Progress, successes and outcome counts are not written here: they go to the round's buffer
(`workers.step_writes.StepWrites`), which the exchange (`workers.exchange`) sends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import redis.exceptions
from redis import Redis
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.utils import now
from rq.worker import BaseWorker

from ddserve import recovery
from ddserve.job_events import EventKind, Preview
from ddserve.jobs import (
    JOB_FUNCTION,
    META_BATCH_SIZE,
    META_ERROR,
    META_PROGRESS,
    META_REQUEST_ID,
    JobOutput,
)
from ddserve.settings import Settings
from ddserve.spec import JobSpec, parse_job_spec
from workers import rq_bridge
from workers.errors import JobExpired, WorkerStopped, error_meta, is_retryable
from workers.step_writes import StepWrites, Success, job_outcome

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
Finished = Literal["done", "deferred", "lost"]
# A finish of one job: False when it found the job handed out again (it wrote nothing).
Finisher = Callable[[], bool | None]


def queue_seconds(job: Job) -> float | None:
    """How long a just-started job waited in its queue (enqueued → started)."""
    if job.enqueued_at is None or job.started_at is None:
        return None
    return max(0.0, (job.started_at - job.enqueued_at).total_seconds())


def spec_of(job: Job) -> JobSpec:
    """The job's spec (`ddserve.spec`), parsed from the RQ job in exactly this one place: a job of
    another function, or whose spec does not parse (`InvalidJobSpec`, naming the bad fields),
    raises ValueError and fails at once, without retry."""
    if job.func_name != JOB_FUNCTION:
        raise ValueError(f"this worker runs only {JOB_FUNCTION}, not {job.func_name}")
    return parse_job_spec(job.kwargs.get("request"))


@dataclass(eq=False)
class WorkerJob:
    """One RQ job held by this worker, and its ticket for the engine: the engine's calls
    (progress, succeed, fail, cancel) go to the `RQJobs` that started it."""

    jobs: RQJobs
    job: Job
    queue: Queue
    execution: Execution
    model: str
    spec: JobSpec  # parsed once, when the job was taken (`spec_of`)
    queue_s: float | None
    arrived_at: float  # when it was queued (seconds since the epoch)
    deadline: float  # when it fails with JobDeadlineExceeded (seconds since the epoch)
    attempt: int = 0  # this delivery of the job (`ddserve.recovery.ATTEMPT_FIELD`)
    log_fields: dict[str, Any] = field(default_factory=dict)  # every log line about the job
    lost: bool = False  # another worker or attempt owns it now (found by the heartbeat)
    unfinished: Finisher | None = None  # a finish Redis refused, retried by the loop

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def key(self) -> str:
        """This execution of the job: unique among the worker's tickets (job id and attempt)."""
        return f"{self.job.id}#{self.attempt}"

    def progress(
        self, step: int, total: int, batch_rows: int, previews: list[Preview] | None = None
    ) -> None:
        self.jobs.progress(self, step, total, batch_rows, previews)

    def succeed(self, output: JobOutput, batch_rows: int) -> None:
        self.jobs.succeed(self, output, batch_rows)

    def fail(self, error: BaseException) -> None:
        self.jobs.fail(self, error)

    def cancel(self) -> None:
        self.jobs.cancel(self)


class RQJobs:
    """The jobs this worker holds (see the module docstring). Thread-safe where the heartbeat
    thread and the exchange's I/O thread meet the loop: under `lock`."""

    def __init__(
        self,
        worker: BaseWorker,
        settings: Settings,
        writes: StepWrites,
        model_of_queue: dict[str, str],
    ) -> None:
        self.worker = worker
        self.settings = settings
        self.writes = writes
        self.model_of_queue = model_of_queue
        self.lock = threading.RLock()
        self.held: dict[str, WorkerJob] = {}  # WorkerJob.key → it, until it ends here
        self.stale_finishes_dropped = 0  # outcomes of stale attempts dropped (in worker stats)

    @property
    def connection(self) -> Redis:
        return self.worker.connection

    def model_of(self, queue: Queue) -> str:
        return self.model_of_queue.get(queue.name, queue.name)

    # --- starting -------------------------------------------------------------------------------
    def start(self, job: Job, queue: Queue) -> WorkerJob | None:
        """Mark a dequeued job started; a job this worker cannot run, or one that waited in its
        queue longer than `job_ttl_s`, fails at once (None)."""
        with self.lock:
            execution, attempt = rq_bridge.start_attempt(self.worker, job)
        model = self.model_of(queue)
        try:
            waited = (now() - job.enqueued_at).total_seconds() if job.enqueued_at else 0.0
            if waited > self.settings.job_ttl_s:
                raise JobExpired(waited, self.settings.job_ttl_s)
            spec = spec_of(job)
        except Exception as exc:
            self._refuse(job, queue, execution, attempt, model, exc)
            return None
        limit = float(self.settings.job_deadline_s)
        if job.timeout is not None and float(job.timeout) > 0:
            limit = min(limit, float(job.timeout))
        held = WorkerJob(
            self,
            job,
            queue,
            execution,
            model,
            spec,
            queue_s=queue_seconds(job),
            arrived_at=job.enqueued_at.timestamp() if job.enqueued_at else time.time(),
            deadline=time.time() + limit,
            attempt=attempt,
            log_fields={
                "request_id": job.meta.get(META_REQUEST_ID),
                "job_id": job.id,
                "model": model,
            },
        )
        with self.lock:
            self.held[held.key] = held
        self.writes.event(job.id, EventKind.STARTED, {})  # its event stream, with the round
        log.info("job %s started (attempt %d)", job.id, attempt, extra=held.log_fields)
        return held

    def _refuse(
        self,
        job: Job,
        queue: Queue,
        execution: Execution,
        attempt: int,
        model: str,
        error: Exception,
    ) -> None:
        """A started job that cannot run here: failed at once, without retry."""
        held = WorkerJob(
            self, job, queue, execution, model, None, queue_seconds(job), 0.0, 0.0, attempt
        )
        with self.lock:
            self.held[held.key] = held
        job.meta[META_ERROR] = error_meta(error)

        def finish() -> bool:
            ended = rq_bridge.finish_failure(
                self.worker,
                job,
                queue,
                execution,
                error,
                retry=False,
                attempt=attempt,
                extra=lambda pipe: rq_bridge.save_meta(job, pipe),
            )
            if ended:
                self.writes.count(job_outcome(job, model, "failed", held.queue_s))
            return ended

        self.finish(held, finish)

    # --- the engine's calls (WorkerJob's ticket methods) -----------------------------------------
    def progress(
        self,
        held: WorkerJob,
        step: int,
        total: int,
        batch_rows: int,
        previews: list[Preview] | None = None,
    ) -> None:
        """The job's progress in its meta (GET /jobs) and, with its previews, on its event
        stream (GET /jobs/{id}/events); both sent with the round's other writes, the meta fenced
        by attempt."""
        if held.lost:  # another worker or attempt owns the job now: leave its meta alone
            return
        held.job.meta[META_PROGRESS] = {"step": int(step), "total": int(total)}
        held.job.meta[META_BATCH_SIZE] = int(batch_rows)
        self.writes.save_meta(held)
        event: dict[str, Any] = {"step": int(step), "of": int(total)}
        if previews:
            event["previews"] = previews
        self.writes.event(held.id, EventKind.PROGRESS, event)

    def succeed(self, held: WorkerJob, output: JobOutput, batch_rows: int) -> None:
        """Recorded by the exchange with the round's other successes; the last progress (step =
        total) came from the engine just before."""
        held.job.meta[META_BATCH_SIZE] = int(batch_rows)
        self.writes.save_meta(held)
        self.writes.succeed(Success(held, output, int(batch_rows)))

    def fail(self, held: WorkerJob, error: BaseException) -> None:
        self.writes.discard(held.key, held.id)
        job = held.job
        if isinstance(error, WorkerStopped):  # not the job's fault: hand it back, keep its retries

            def requeue() -> bool:
                return recovery.requeue(
                    self.worker, job, held.queue, held.execution, attempt=held.attempt
                )

            if self.finish(held, requeue) == "done":
                log.warning("job %s handed back to its queue", held.id, extra=held.log_fields)
            return
        retry = is_retryable(error)
        retried = retry and job.should_retry

        def record() -> bool:
            if not retried:  # a retried job is queued again, not failed
                job.meta[META_ERROR] = error_meta(error)
            ended = rq_bridge.finish_failure(
                self.worker,
                job,
                held.queue,
                held.execution,
                error,
                retry=retry,
                attempt=held.attempt,
                extra=None if retried else lambda pipe: rq_bridge.save_meta(job, pipe),
            )
            if ended:  # counted once it ended (here, or when a finish deferred by an outage runs)
                outcome = "retried" if retried else "failed"
                self.writes.count(job_outcome(job, held.model, outcome, held.queue_s))
            return ended

        if self.finish(held, record) == "done":
            log.warning(
                "job %s failed: %s: %s",
                held.id,
                type(error).__name__,
                error,
                extra=held.log_fields,
            )

    def cancel(self, held: WorkerJob) -> None:
        def stop() -> bool:
            reason = "Job canceled by request."
            ended = rq_bridge.finish_stopped(
                self.worker, held.job, held.queue, held.execution, reason, attempt=held.attempt
            )
            if ended:
                self.writes.count(job_outcome(held.job, held.model, "canceled", held.queue_s))
            return ended

        self.writes.discard(held.key, held.id)
        if self.finish(held, stop) == "done":
            log.info("job %s canceled", held.id, extra=held.log_fields)

    # --- finishing ------------------------------------------------------------------------------
    def finish(self, held: WorkerJob, action: Finisher) -> Finished:
        """Run one of the finishers under the lock, if this execution is still the job's current
        one (`owned`: this worker, this attempt).

        - "done": the job ended here; the worker forgets this execution;
        - "lost": the job was declared abandoned (this worker was frozen or cut off) and belongs to
          the queue, another worker or a later attempt now: its outcome here is dropped, so it is
          never finished twice (nor failed by a stale attempt);
        - "deferred": Redis did not answer; the finisher is kept and retried by the loop, and the
          job stays held (heartbeated) until then.

        The check here spares a stale execution the finisher's callbacks; the fence itself is in
        the finisher's transaction (`workers.rq_bridge` for successes, failures and cancels,
        `ddserve.recovery.requeue` for a hand-back: each WATCHes the job, checks its attempt
        (`ddserve.recovery.is_current`) and writes in one MULTI/EXEC), so a sweep or a later
        attempt that takes the job between this check and the write still makes the stale
        finish write nothing: the finisher then returns False, and the outcome is "lost" too."""
        with self.lock:
            if self.held.get(held.key) is not held:
                return "lost"
            try:
                if not self.owned([held])[0] or action() is False:
                    self._log_not_owned(held)
                    self.forget(held)
                    return "lost"
            except REDIS_ERRORS as exc:
                held.unfinished = action
                log.warning(
                    "job %s: Redis unavailable while finishing it (%s); retrying when it is back",
                    held.id,
                    type(exc).__name__,
                )
                return "deferred"
            except BaseException:
                self.forget(held)
                raise
            self.forget(held)
            return "done"

    def defer(self, held: WorkerJob, action: Finisher) -> None:
        """A finish that could not be sent (Redis refused a round), for the loop to retry."""
        with self.lock:
            if self.held.get(held.key) is held:
                held.unfinished = action

    @property
    def has_deferred(self) -> bool:
        with self.lock:
            return any(held.unfinished is not None for held in self.held.values())

    def finish_deferred(self) -> None:
        """Retry the finishers that Redis refused (raises a Redis error while it still refuses)."""
        with self.lock:
            deferred = [h for h in self.held.values() if h.unfinished is not None]
        for held in deferred:
            action = held.unfinished
            assert action is not None
            self.finish(held, action)
            if self.held.get(held.key) is held:  # still refused: Redis is down, try again later
                raise redis.exceptions.ConnectionError("Redis still unavailable")

    def forget(self, held: WorkerJob) -> None:
        with self.lock:
            if self.held.get(held.key) is held:
                del self.held[held.key]
                held.unfinished = None
                self.worker.executions.pop(held.execution.id, None)

    # --- ownership ------------------------------------------------------------------------------
    def owned(self, held: list[WorkerJob]) -> list[bool]:
        """Whether this worker still owns each job, in that attempt (one round trip)."""
        running = [(h.job, h.execution, h.attempt) for h in held]
        return recovery.owned(self.connection, self.worker.name, running)

    def still_owned(self, successes: list[Success]) -> list[Success]:
        """The successes of jobs this worker still owns (one round trip); the others are dropped."""
        if not successes:
            return []
        mine = []
        for success, owned in zip(successes, self.owned([s.held for s in successes]), strict=True):
            if owned:
                mine.append(success)
            else:
                self.drop_stale(success.held)
        return mine

    def drop_stale(self, held: WorkerJob) -> None:
        """A write of an execution that is no longer the job's current one was dropped."""
        self._log_not_owned(held)
        self.forget(held)

    def _log_not_owned(self, held: WorkerJob) -> None:
        self.stale_finishes_dropped += 1
        log.warning(
            "job %s: attempt %d is no longer owned by worker %s (declared abandoned while it was "
            "frozen or cut off from Redis, and handed out again); its outcome here is dropped",
            held.id,
            held.attempt,
            self.worker.name,
            extra=held.log_fields,
        )

    def lost_keys(self) -> set[str]:
        """Held executions another worker or attempt owns now (found by the heartbeat); no Redis
        call."""
        with self.lock:
            return {key for key, held in self.held.items() if held.lost}

    def heartbeat(self) -> None:
        """Refresh every held job's started-registry entry (or the worker's own heartbeat when it
        holds none), and mark the executions another worker or attempt owns now as lost."""
        with self.lock:
            running = [held for held in self.held.values() if not held.lost]
            for held in running:
                rq_bridge.heartbeat(self.worker, held.job, held.execution)
            if not running:
                self.worker.heartbeat()
            for held, mine in zip(running, self.owned(running), strict=True):
                if not mine:
                    log.warning(
                        "job %s: another worker owns it now (or a later attempt); worker %s "
                        "drops attempt %d",
                        held.id,
                        self.worker.name,
                        held.attempt,
                    )
                    held.lost = True
