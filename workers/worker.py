"""The batching RQ worker: a `SimpleWorker` (no fork, so models stay warm) whose loop feeds the
continuous-batching engine instead of performing one job at a time.

- Idle, it blocks on its queues (one per model) for at most a second at a time, so that a stop
  request is noticed; busy, it lets the engine read the queues without blocking at every step
  boundary, and only while the running set has room.
- Each dequeued job is marked started, heartbeated and finished through `workers.rq_bridge`, i.e.
  through RQ's own handlers: results, registries, TTLs, callbacks and retries behave as for a plain
  job. A heartbeat thread refreshes every running job's started-registry entry.
- Cancellation (the Redis set `cancel_set_key(prefix)`) and per-job deadlines are checked once per
  step for all held jobs; a canceled running job ends as RQ's stop-job command ends it (`stopped`).
- Warm shutdown (SIGTERM/SIGINT, or `request_shutdown()` from another thread) stops taking jobs and
  finishes the held ones; those still unfinished after `shutdown_grace_s` are handed back to the head
  of their queue (`ddserve.recovery.requeue`, no retry used), and so are they on a second signal
  (cold stop). Signal handlers are installed only in the main thread; in a thread the worker uses
  RQ's timer death penalty for callbacks.
- Recovery (`ddserve.recovery`): the started-registry entry of a running job expires
  `abandoned_after_s` after its last heartbeat, and every worker runs RQ's maintenance (which retries
  or fails the jobs of dead workers) every quarter of that. A job is finished only while this worker
  still owns it (its execution is the job's current one): a worker that was frozen past that time
  and whose job went to another worker drops its copy (the heartbeat notices, and so does the
  finisher). A job queued longer than `job_ttl_s` fails `job_expired` when dequeued.
- Redis outages: while Redis is unreachable the loop keeps its jobs and retries with a backoff;
  finishing a job that fails on a Redis error is retried once Redis answers again (the job stays
  heartbeated meanwhile), so no outcome is lost and no job is left `running`.
- Round trips: the progress writes, successes and job outcome counts (`ddserve.job_metrics`, what
  the gateway's /metrics renders) of the scheduling rounds since the last exchange with Redis are
  sent together (`workers.step_writes`): with the cancel-set read in one transaction, or with
  successes one ownership check and one transaction, instead of a round trip per progress write and
  about four per finished job. They are sent, and the cancel set read, by a second thread while a
  round's network calls run (`run_round`), at most every `redis_interval_ms`, so the stepping
  thread does not wait for Redis at every step; an idle worker sends them at once (`flush_step`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import redis.exceptions
from redis import Redis
from redis.client import Pipeline
from rq.exceptions import StopRequested
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import TimerDeathPenalty
from rq.utils import now
from rq.worker import SimpleWorker

from ddserve import recovery
from ddserve.jobs import (
    JOB_FUNCTION,
    META_BATCH_SIZE,
    META_ERROR,
    META_PROGRESS,
    META_REQUEST_ID,
    JobOutput,
    cancel_set_key,
    queue_name,
)
from ddserve.settings import Settings
from ddserve.storage import Storage, create_storage
from workers import rq_bridge
from workers.engine import BatchingPolicy, Engine
from workers.errors import JobExpired, WorkerStopped, error_meta, is_retryable
from workers.model_pool import ModelPool
from workers.step_writes import Round, StepWrites, Success, job_outcome

log = logging.getLogger(__name__)


def servable_models(pool: ModelPool) -> list[str]:
    """Every zoo model with a task to serve (evaluation classifiers have none)."""
    return sorted(name for name, entry in pool.catalog.items() if entry.tasks)


def worker_stats_key(prefix: str, worker_name: str) -> str:
    return f"{prefix}:worker-stats:{worker_name}"


IDLE_POLL_S = 1  # longest blocking dequeue; bounds how late a stop request is noticed
MAX_BACKOFF_S = 5.0  # longest wait between attempts to reach Redis (bounds recovery after it)
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def maintenance_interval_s(settings: Settings) -> int:
    """How often a worker runs RQ's maintenance (abandoned jobs): a quarter of
    `abandoned_after_s`, so a dead worker's job is retried within 1.25 × abandoned_after_s (plus
    one scheduling round) of its last heartbeat."""
    return max(1, math.ceil(settings.abandoned_after_s / 4))


class RQTicket:
    """A dequeued RQ job as the engine sees it (`workers.engine.Ticket`)."""

    def __init__(
        self, worker: BatchingWorker, job: Job, queue: Queue, execution: Execution
    ) -> None:
        self.worker = worker
        self.job = job
        self.queue = queue
        self.execution = execution
        self.id: str = job.id
        self.request: dict[str, Any] = dict(job.kwargs["request"])
        self.model = worker.model_of(queue)
        self.queue_s = _queue_seconds(job)
        self.arrived_at = job.enqueued_at.timestamp() if job.enqueued_at else time.time()
        limit = float(worker.settings.job_deadline_s)
        if job.timeout is not None and float(job.timeout) > 0:
            limit = min(limit, float(job.timeout))
        self.deadline = time.time() + limit
        # Every log line about this job carries the id of the request that made it.
        self.log_fields = {
            "request_id": job.meta.get(META_REQUEST_ID),
            "job_id": job.id,
            "model": self.request.get("model"),
        }
        log.info("job %s started", self.id, extra=self.log_fields)

    def progress(self, step: int, total: int, batch_rows: int) -> None:
        if self.worker.is_lost(self.id):  # another worker owns the job now: leave its meta alone
            return
        self.job.meta[META_PROGRESS] = {"step": int(step), "total": int(total)}
        self.job.meta[META_BATCH_SIZE] = int(batch_rows)
        self.worker.writes.save_meta(self.job)  # sent when the round ends, with the others

    def succeed(self, output: JobOutput, batch_rows: int) -> None:
        """Recorded when the round ends (`BatchingWorker.flush_step`), with the round's other
        successes; the last progress (step = total) came from the engine just before."""
        self.job.meta[META_BATCH_SIZE] = int(batch_rows)
        self.worker.writes.save_meta(self.job)
        item = rq_bridge.Succeeded(self.job, self.queue, self.execution, output)
        self.worker.writes.succeed(
            Success(item, self.model, self.queue_s, int(batch_rows), self.log_fields)
        )

    def fail(self, error: BaseException) -> None:
        self.worker.writes.discard(self.id)
        if isinstance(error, WorkerStopped):  # not the job's fault: hand it back, keep its retries
            if self.worker.finish_job(self.id, lambda: recovery.requeue(*self._rq())) == "done":
                log.warning("job %s handed back to its queue", self.id, extra=self.log_fields)
            return
        retry = is_retryable(error)
        retried = retry and self.job.should_retry

        def record() -> None:
            if not retried:  # a retried job is queued again, not failed
                self.job.meta[META_ERROR] = error_meta(error)
                self.job.save_meta()
            rq_bridge.finish_failure(*self._rq(), error, retry=retry)
            # Counted once it ended (here, or when a finish deferred by an outage runs).
            outcome = "retried" if retried else "failed"
            self.worker.writes.count(job_outcome(self.job, self.model, outcome, self.queue_s))

        if self.worker.finish_job(self.id, record) == "done":
            log.warning(
                "job %s failed: %s: %s",
                self.id,
                type(error).__name__,
                error,
                extra=self.log_fields,
            )

    def cancel(self) -> None:
        reason = "Job canceled by request."

        def finish() -> None:
            rq_bridge.finish_stopped(*self._rq(), reason)
            self.worker.writes.count(job_outcome(self.job, self.model, "canceled", self.queue_s))

        self.worker.writes.discard(self.id)
        if self.worker.finish_job(self.id, finish) == "done":
            log.info("job %s canceled", self.id, extra=self.log_fields)

    def _rq(self) -> tuple[BatchingWorker, Job, Queue, Execution]:
        return self.worker, self.job, self.queue, self.execution


def _queue_seconds(job: Job) -> float | None:
    """How long a just-started job waited in its queue (enqueued → started)."""
    if job.enqueued_at is None or job.started_at is None:
        return None
    return max(0.0, (job.started_at - job.enqueued_at).total_seconds())


class RQFeed:
    """The engine's job source: non-blocking pops of one model's queue, and the cancel set.

    With `overlap_redis`, the cancel set is read by the worker's Redis exchanges (`run_round`),
    beside a network call and at most every `redis_interval_ms`, for the jobs held then; the
    next round's sweep uses that answer (`deliver`), so the check costs the stepping thread no
    round trip, and the rounds between find nothing new. A job taken since is checked by the next
    exchange. Without `overlap_redis`, every round's sweep reads the cancel set itself."""

    def __init__(self, worker: BatchingWorker) -> None:
        self.worker = worker
        self._cancel_flags: dict[str, bool] | None = None  # the latest exchange's, used once

    def take(self, model: str) -> RQTicket | None:
        if self.worker.stopping:
            return None
        queue = self.worker.queue_for(model)
        if queue is None:
            return None
        while True:
            got = rq_bridge.dequeue(self.worker, [queue], None)
            if got is None:
                return None
            ticket = self.worker.start(*got)
            if ticket is not None:
                return ticket

    def canceled(self, job_ids: list[str]) -> set[str]:
        """Jobs to stop: cancel requests, and jobs this worker no longer owns (declared abandoned
        while it was frozen or cut off; their ticket's cancel then only forgets them)."""
        flags, self._cancel_flags = self._cancel_flags, None
        if not self.worker.settings.overlap_redis:
            flags = self.cancel_requests(job_ids)
        lost = self.worker.lost_jobs()
        return {job_id for job_id in job_ids if (flags and flags.get(job_id)) or job_id in lost}

    def deliver(self, flags: dict[str, bool]) -> None:
        """An exchange's answer from the cancel set, for the next round's sweep."""
        self._cancel_flags = flags

    def cancel_requests(self, job_ids: list[str]) -> dict[str, bool]:
        """Which of `job_ids` are in the cancel set (one round trip)."""
        if not job_ids:
            return {}
        return self.cancel_flags(job_ids, self.read_cancel_set(self.worker.connection, job_ids))

    def read_cancel_set(self, redis: Redis | Pipeline, job_ids: list[str]) -> Any:
        """SMISMEMBER of the cancel set for `job_ids`: the reply, or queued on a pipeline (whose
        reply `cancel_flags` reads the same way)."""
        return redis.smismember(cancel_set_key(self.worker.settings.key_prefix), job_ids)

    @staticmethod
    def cancel_flags(job_ids: list[str], reply: list[Any]) -> dict[str, bool]:
        return {job_id: bool(flag) for job_id, flag in zip(job_ids, reply, strict=True)}


@dataclass
class _Running:
    job: Job
    execution: Execution


@dataclass
class RoundSent:
    """What sending a round's writes did (`BatchingWorker._send`), settled by the loop's thread."""

    mine: list[Success] = field(default_factory=list)  # recorded
    held: list[Success] = field(default_factory=list)  # to retry one by one if the write failed
    cancel_flags: dict[str, bool] | None = None  # job id → in the cancel set (when it was read)
    write_error: BaseException | None = None
    cancel_error: BaseException | None = None  # the cancel set could not be read (writes went)


class BatchingWorker(SimpleWorker):
    """See the module docstring. `work()` runs the loop; `request_shutdown()` ends it warmly."""

    def __init__(
        self,
        settings: Settings,
        connection: Redis,
        *,
        models: list[str] | None = None,
        pool: ModelPool | None = None,
        storage: Storage | None = None,
        name: str | None = None,
    ) -> None:
        rq_bridge.check_rq_internals()
        self.settings = settings
        self.pool = pool or ModelPool(settings)
        self.models = models or settings.model_names() or servable_models(self.pool)
        if not self.models:
            raise ValueError(f"no models to serve: the zoo at {settings.zoo_dir} is empty")
        if threading.current_thread() is not threading.main_thread():
            self.death_penalty_class = TimerDeathPenalty  # SIGALRM only works in the main thread
        self._queues_by_model = {m: queue_name(settings.key_prefix, m) for m in self.models}
        super().__init__(
            list(self._queues_by_model.values()),
            name=name,
            connection=connection,
            default_result_ttl=settings.result_ttl_s,
            maintenance_interval=maintenance_interval_s(settings),
        )
        self._model_of_queue = {q: m for m, q in self._queues_by_model.items()}
        self.pool.warm(self.models)
        self.storage = storage or create_storage(settings)
        self.feed = RQFeed(self)
        self.engine = Engine(
            self.pool,
            self.models,
            self.feed,
            self.storage,
            BatchingPolicy.from_settings(settings),
            store_threads=settings.store_threads,
        )
        self._running: dict[str, _Running] = {}
        self.writes = StepWrites(settings.key_prefix)  # the current round's writes
        # Finishes that hit a Redis error, retried by the loop: job id → the finishing action.
        self._unfinished: dict[str, Callable[[], None]] = {}
        self._lost: set[str] = set()  # held jobs another worker owns now (seen by the heartbeat)
        self._lock = threading.RLock()  # RQ bookkeeping: main loop vs heartbeat thread
        self._stop = threading.Event()
        self._stop_requested_at: float | None = None
        self._loop_done = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._next_exchange_at = 0.0  # time.monotonic() before which run_round sends nothing

    # --- queues and jobs ------------------------------------------------------------------------
    def queue_for(self, model: str) -> Queue | None:
        name = self._queues_by_model.get(model)
        return next((q for q in self.queues if q.name == name), None)

    def model_of(self, queue: Queue) -> str:
        return self._model_of_queue.get(queue.name, queue.name)

    def start(self, job: Job, queue: Queue) -> RQTicket | None:
        """Mark a dequeued job started; a job this worker cannot run, or one that waited in its
        queue longer than `job_ttl_s`, fails at once (None)."""
        with self._lock:
            execution = rq_bridge.mark_started(self, job)
            self._running[job.id] = _Running(job, execution)
            self._lost.discard(job.id)
        try:
            waited = (now() - job.enqueued_at).total_seconds() if job.enqueued_at else 0.0
            if waited > self.settings.job_ttl_s:
                raise JobExpired(waited, self.settings.job_ttl_s)
            if job.func_name != JOB_FUNCTION:
                raise ValueError(f"this worker runs only {JOB_FUNCTION}, not {job.func_name}")
            if not isinstance(job.kwargs.get("request"), dict):
                raise ValueError("the job has no request")
            return RQTicket(self, job, queue, execution)
        except Exception as exc:
            job.meta[META_ERROR] = error_meta(exc)
            job.save_meta()

            def finish(error: Exception = exc) -> None:
                rq_bridge.finish_failure(self, job, queue, execution, error, retry=False)
                model = self.model_of(queue)
                self.writes.count(job_outcome(job, model, "failed", _queue_seconds(job)))

            self.finish_job(job.id, finish)
            return None

    def finish_job(
        self, job_id: str, action: Callable[[], None]
    ) -> Literal["done", "deferred", "lost"]:
        """Run one of the finishers under the bookkeeping lock, if this worker still owns the job.

        - "done": the job ended here; the worker forgets it;
        - "lost": the job was declared abandoned (this worker was frozen or cut off) and belongs to
          the queue or another worker now: its outcome here is dropped, so it is never finished
          twice;
        - "deferred": Redis did not answer; the finisher is kept and retried by the loop, and the
          job stays held (heartbeated) until then."""
        with self._lock:
            running = self._running.get(job_id)
            if running is None:
                return "lost"
            try:
                if not recovery.owned(
                    self.connection, self.name, [(running.job, running.execution)]
                )[0]:
                    log.warning(
                        "job %s: no longer owned by worker %s (declared abandoned while it was "
                        "frozen or cut off from Redis); its outcome here is dropped",
                        job_id,
                        self.name,
                    )
                    self._forget(job_id)
                    return "lost"
                action()
            except REDIS_ERRORS as exc:
                self._unfinished[job_id] = action
                log.warning(
                    "job %s: Redis unavailable while finishing it (%s); retrying when it is back",
                    job_id,
                    type(exc).__name__,
                )
                return "deferred"
            except BaseException:
                self._forget(job_id)
                raise
            self._forget(job_id)
            return "done"

    def flush_step(self) -> None:
        """Send the round's writes (`workers.step_writes`) now: its progress and outcome counts in
        one pipeline, or, when jobs succeeded, with those successes this worker still owns in one
        transaction (`rq_bridge.finish_successes`). On a Redis error the progress and counts go
        with the next round, each success waits as a deferred finish (retried by the loop, meta
        and count included), and the error is raised."""
        taken = self.writes.take()
        if taken:
            self._settle(taken, self._send(taken))

    def run_round(self, io: ThreadPoolExecutor) -> None:
        """One scheduling round whose Redis traffic overlaps its network calls.

        The engine admits (cancellations as last read, queue reads), then steps. When the last
        exchange with Redis began at least `redis_interval_ms` ago, `io` runs the next one while
        the engine steps: it sends the writes made since (progress, successes, cancellations) and
        reads the cancel set for the jobs held now, in one transaction when no job succeeded. A
        Redis round trip is then hidden behind the network instead of added to every step.

        Why not every round: the exchange runs Python (redis-py, RQ's serializers) that holds the
        GIL while the network runs, and a network call waits for the GIL between its operators,
        so every exchange slows the step it overlaps by about its own CPU time, whichever CPU
        the I/O thread runs on (the README's paired benchmark compares it with an exchange every
        round). Merging rounds also merges their writes: a job's progress is written once per
        exchange, at its latest step.

        The exchange is settled at the end of the round, so a failed write is handled exactly as
        `flush_step` handles it."""
        self.engine.admit()
        exchange = None
        started = time.monotonic()
        if started >= self._next_exchange_at:
            held = self.engine.held_job_ids()
            taken = self.writes.take()
            if taken or held:
                self._next_exchange_at = started + self.settings.redis_interval_ms / 1000.0
                exchange = (taken, io.submit(self._send_round, taken, held))
        try:
            self.engine.step()
        except BaseException:
            if exchange is not None:
                sent = exchange[1].result()
                with contextlib.suppress(Exception):
                    self._settle(exchange[0], sent)
            raise
        if exchange is not None:
            self._settle(exchange[0], exchange[1].result())

    def _send_round(self, taken: Round, held: list[str]) -> RoundSent:
        """The Redis I/O thread's part: the writes and the cancel set (never raises)."""
        sent = self._send(taken, held) if taken else RoundSent()
        if sent.write_error is None and held and sent.cancel_flags is None:
            try:
                sent.cancel_flags = self.feed.cancel_requests(held)
            except Exception as exc:
                sent.cancel_error = exc
        return sent

    def _send(self, taken: Round, held: list[str] | None = None) -> RoundSent:
        """Write a round (see `flush_step`), and read the cancel set for `held` in the same
        transaction when no success needs its own; safe off the loop's thread, which settles
        it."""
        flags = None
        with self._lock:
            # A success's meta travels with the success (its transaction, or its deferred finish).
            for job_id in taken.successes:
                taken.metas.pop(job_id, None)
            succeeded = [s for s in taken.successes.values() if s.job.id in self._running]
            try:
                mine = self._still_owned(succeeded)
                if mine:
                    rq_bridge.finish_successes(
                        self,
                        [success.item for success in mine],
                        lambda pipe: self.writes.queue_writes(pipe, taken, mine),
                    )
                else:  # MULTI/EXEC: counts are applied all or not at all, so a retry adds once
                    pipe = self.connection.pipeline(transaction=True)
                    self.writes.queue_writes(pipe, taken, [])
                    if held:
                        self.feed.read_cancel_set(pipe, held)
                    replies = pipe.execute()
                    if held:
                        flags = self.feed.cancel_flags(held, replies[-1])
            except Exception as exc:
                return RoundSent(held=succeeded, write_error=exc)
            for success in mine:
                self._forget(success.job.id)
        return RoundSent(mine=mine, held=succeeded, cancel_flags=flags)

    def _settle(self, taken: Round, sent: RoundSent) -> None:
        """On the loop's thread: log the recorded successes, or, when the write failed, keep its
        progress and counts for the next round and each success as a deferred finish, and raise
        the error (the loop backs off on a Redis error)."""
        for success in sent.mine:
            self._log_success(success)
        error = sent.write_error
        if error is not None:
            if not isinstance(error, REDIS_ERRORS):
                raise error
            with self._lock:
                self.writes.give_back(taken)
                for success in sent.held:
                    if success.job.id in self._running:
                        self._unfinished[success.job.id] = lambda s=success: self._finish_one(s)
            log.warning(
                "worker %s: Redis unavailable while writing a round (%d successes, %d progress "
                "writes) (%s); retrying when it is back",
                self.name,
                len(sent.held),
                len(taken.metas),
                type(error).__name__,
            )
            raise error
        if sent.cancel_error is not None:
            raise sent.cancel_error
        if sent.cancel_flags is not None:
            self.feed.deliver(sent.cancel_flags)

    def _still_owned(self, successes: list[Success]) -> list[Success]:
        """The successes of jobs this worker still owns (one round trip); the others are dropped."""
        if not successes:
            return []
        pairs = [(success.job, success.item.execution) for success in successes]
        mine = []
        for success, owned in zip(
            successes, recovery.owned(self.connection, self.name, pairs), strict=True
        ):
            if owned:
                mine.append(success)
                continue
            log.warning(
                "job %s: no longer owned by worker %s (declared abandoned while it was frozen or "
                "cut off from Redis); its outcome here is dropped",
                success.job.id,
                self.name,
            )
            self._forget(success.job.id)
        return mine

    def _finish_one(self, success: Success) -> None:
        """A success whose round could not be written, recorded alone (a deferred finish)."""
        rq_bridge.finish_successes(
            self,
            [success.item],
            lambda pipe: self.writes.queue_writes(pipe, Round(), [success]),
        )
        self._log_success(success)

    @staticmethod
    def _log_success(success: Success) -> None:
        extra = success.log_fields | {"batch_size": success.batch_rows}
        log.info("job %s succeeded", success.job.id, extra=extra)

    def _forget(self, job_id: str) -> None:
        running = self._running.pop(job_id, None)
        self._unfinished.pop(job_id, None)
        self._lost.discard(job_id)
        if running is not None:
            self.executions.pop(running.execution.id, None)

    def _finish_deferred(self) -> None:
        """Retry the finishers that Redis refused (raises a Redis error while it still refuses)."""
        for job_id, action in list(self._unfinished.items()):
            self.finish_job(job_id, action)
            if job_id in self._unfinished:  # still refused: Redis is down, try again later
                raise redis.exceptions.ConnectionError("Redis still unavailable")

    def is_lost(self, job_id: str) -> bool:
        """Whether another worker owns this held job now (found by the heartbeat); no Redis call."""
        return job_id in self._lost

    def lost_jobs(self) -> set[str]:
        """Held jobs that another worker owns now (found by the heartbeat)."""
        with self._lock:
            return set(self._lost)

    def clean_registries(self) -> None:
        """RQ's maintenance of each queue (abandoned jobs retried or failed, dead workers and stuck
        dequeues cleaned), under RQ's cleaning lock held for one interval at most."""
        for queue in self.queues:
            with recovery.maintenance_lock(queue, self.maintenance_interval) as got:
                if got:
                    recovery.clean_queue(self, queue)
        self.last_cleaned_at = now()

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Started-registry TTL of a running job: a dead worker's jobs count as abandoned (and
        are retried) after `abandoned_after_s`, while the heartbeat thread keeps live ones."""
        return int(max(self.settings.abandoned_after_s, 3 * self.settings.heartbeat_s))

    # --- stopping -------------------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self._stop.is_set() or self._stop_requested

    def request_shutdown(self) -> None:
        """Warm shutdown from any thread: take no new job, finish the held ones (handing back
        those still unfinished after `shutdown_grace_s`), then return."""
        self._stop_requested = True  # also ends RQ's suspension wait
        self._stop_requested_at = self._stop_requested_at or time.monotonic()
        self._stop.set()

    def request_stop(self, signum: Any, frame: Any) -> None:
        """First SIGINT/SIGTERM: warm shutdown (RQ's handler would raise while we hold jobs)."""
        import signal

        self._shutdown_requested_date = now()
        self._stop_requested_at = self._stop_requested_at or time.monotonic()
        signal.signal(signal.SIGINT, self.request_force_stop)
        signal.signal(signal.SIGTERM, self.request_force_stop)
        log.info(
            "worker %s: warm shutdown requested; finishing %d held jobs (at most %g s)",
            self.name,
            len(self.engine.held_job_ids()),
            self.settings.shutdown_grace_s,
        )
        self._stop.set()

    def _grace_over(self) -> bool:
        """A stop was requested longer than `shutdown_grace_s` ago."""
        started = self._stop_requested_at
        return started is not None and time.monotonic() - started > self.settings.shutdown_grace_s

    # --- the loop -------------------------------------------------------------------------------
    def work(  # type: ignore[override]
        self,
        burst: bool = False,
        logging_level: str | None = None,
        **_: Any,
    ) -> bool:
        """Run until stopped (or, with `burst`, until the queues are empty). True if it ran jobs."""
        self.bootstrap(logging_level or self.settings.log_level)
        if threading.current_thread() is threading.main_thread():
            self._install_signal_handlers()
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat_loop, name=f"heartbeat-{self.name}", daemon=True
        )
        self._heartbeat_thread.start()
        # One thread for each round's Redis writes and cancel-set read (`run_round`).
        io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"round-io-{self.name}")
        worked = False
        backoff = 0.5
        try:
            while True:
                if self.stopping and self._grace_over() and not self.engine.idle:
                    log.warning(
                        "worker %s: %d jobs unfinished after the %g s shutdown grace; handing "
                        "them back to their queues",
                        self.name,
                        len(self.engine.held_job_ids()),
                        self.settings.shutdown_grace_s,
                    )
                    self.engine.abort(WorkerStopped("the worker stopped before the job finished"))
                try:
                    if self._unfinished:
                        self._finish_deferred()
                    if self.should_run_maintenance_tasks:
                        self.run_maintenance_tasks()
                    if self.engine.idle:
                        self.flush_step()  # no round to carry the last one's writes
                        rq_bridge.set_idle(self)
                        if self.stopping:
                            break
                        self.check_for_suspension(burst)
                        got = rq_bridge.dequeue(
                            self, self._ordered_queues, None if burst else IDLE_POLL_S
                        )
                        if got is None:
                            if burst:
                                break
                            continue
                        ticket = self.start(*got)
                        if ticket is None:
                            continue
                        self.engine.offer(self._model_of_queue[got[1].name], ticket)
                    if self.settings.overlap_redis:
                        self.run_round(io)
                    else:
                        self.flush_step()
                        self.engine.run_once()
                    worked = True
                    backoff = 0.5
                except REDIS_ERRORS as exc:
                    # Nothing is lost: held jobs stay held (and unfinished finishes kept) until
                    # Redis answers again; a stop request past its grace leaves them to recovery.
                    if self.stopping and self._grace_over():
                        log.warning(
                            "worker %s: Redis unavailable while stopping; leaving %d jobs to "
                            "recovery (abandoned after %g s)",
                            self.name,
                            len(self._running),
                            self.settings.abandoned_after_s,
                        )
                        break
                    log.warning(
                        "worker %s: Redis unavailable (%s); holding %d jobs, retrying in %.1f s",
                        self.name,
                        type(exc).__name__,
                        len(self._running),
                        backoff,
                    )
                    time.sleep(backoff)
                    backoff = min(2 * backoff, MAX_BACKOFF_S)
        except StopRequested:
            pass
        except BaseException:
            log.exception("worker %s: stopping cold; failing held jobs", self.name)
            self.engine.abort()
            raise
        finally:
            io.shutdown(wait=True)
            self.engine.close()
            with contextlib.suppress(Exception):
                self.flush_step()
            self._stop.set()
            self._loop_done.set()
            with contextlib.suppress(Exception):
                self.publish_stats()
            if self._heartbeat_thread is not None:
                self._heartbeat_thread.join(timeout=2 * self.settings.heartbeat_s + 1)
            try:
                self.teardown()
            except REDIS_ERRORS:
                log.warning("worker %s: Redis unavailable; could not record its exit", self.name)
        return worked

    def _heartbeat_loop(self) -> None:
        while not self._loop_done.wait(self.settings.heartbeat_s):
            try:
                with self._lock:
                    running = [
                        item for job_id, item in self._running.items() if job_id not in self._lost
                    ]
                    for item in running:
                        rq_bridge.heartbeat(self, item.job, item.execution)
                    if not running:
                        self.heartbeat()
                    pairs = [(item.job, item.execution) for item in running]
                    for item, mine in zip(
                        running, recovery.owned(self.connection, self.name, pairs), strict=True
                    ):
                        if not mine and item.job.id not in self._lost:
                            log.warning(
                                "job %s: another worker owns it now; worker %s drops it",
                                item.job.id,
                                self.name,
                            )
                            self._lost.add(item.job.id)
                self.publish_stats()
            except REDIS_ERRORS as exc:
                log.warning("worker %s: heartbeat failed: Redis unavailable (%s)", self.name, exc)
            except Exception:
                log.exception("worker %s: heartbeat failed", self.name)

    def publish_stats(self) -> None:
        """The engine's counters in the hash `worker_stats_key(prefix, name)` (for the benchmark
        and dashboards: mean occupancy = rows_total / (network_calls · max_batch))."""
        key = worker_stats_key(self.settings.key_prefix, self.name)
        fields: dict[str, Any] = {
            **self.engine.stats.as_dict(),
            "max_batch": self.engine.policy.max_batch,
            "mode": self.engine.policy.mode,
            "time": time.time(),
        }
        pipe = self.connection.pipeline()
        pipe.hset(key, mapping=fields)
        pipe.expire(key, max(60, int(10 * self.settings.heartbeat_s)))
        pipe.execute()
