"""The batching RQ worker: a `SimpleWorker` (no fork, so models stay warm) whose loop feeds the
continuous-batching engine instead of performing one job at a time.

- Idle, it blocks on its queues (one per model) for at most a second at a time, so that a stop
  request is noticed; busy, it lets the engine read the queues without blocking at every step
  boundary, and only while the running set has room.
- Each dequeued job becomes one `workers.rq_adaptor.WorkerJob` (its ticket for the engine), which
  `RQJobs` marks started, heartbeats and finishes through `workers.rq_bridge`, i.e. through RQ's
  own handlers: results, registries, TTLs, callbacks and retries behave as for a plain job. A
  heartbeat thread refreshes every running job's started-registry entry.
- Cancellation (the Redis set `cancel_set_key(prefix)`) and per-job deadlines are checked once per
  step for all held jobs; a canceled running job ends as RQ's stop-job command ends it (`stopped`).
- Warm shutdown (SIGTERM/SIGINT, or `request_shutdown()` from another thread) stops taking jobs and
  finishes the held ones; those still unfinished after `shutdown_grace_s` are handed back to the head
  of their queue (`ddserve.recovery.requeue`, no retry used), and so are they on a second signal
  (cold stop). Signal handlers are installed only in the main thread; in a thread the worker uses
  RQ's timer death penalty for callbacks.
- Recovery (`ddserve.recovery`): the started-registry entry of a running job expires
  `abandoned_after_s` after its last heartbeat, and every worker runs RQ's maintenance (which retries
  or fails the jobs of dead workers) every quarter of that — once Redis has answered its heartbeats
  for `recovery_grace_s` without a break (`RecoveryGrace`), so that after an outage the live
  workers heartbeat again before any sweep. Each delivery of a job is an attempt; a job is finished
  only while this worker still owns it in that attempt (its execution is the job's current one): a
  worker that was frozen past that time and whose job was handed out again — to another worker or
  to itself — drops its stale copy (the heartbeat notices, and so does the finisher). A job queued
  longer than `job_ttl_s` fails `job_expired` when dequeued.
- Redis outages: while Redis is unreachable the loop keeps its jobs and retries with a backoff;
  finishing a job that fails on a Redis error is retried once Redis answers again (the job stays
  heartbeated meanwhile), so no outcome is lost and no job is left `running`.
- Round trips: the progress writes, successes and job outcome counts (`ddserve.job_metrics`, what
  the gateway's /metrics renders) of the scheduling rounds since the last exchange with Redis are
  sent together (`workers.step_writes`): with the cancel-set read in one transaction, or with
  successes one ownership check and one transaction, instead of a round trip per progress write and
  about four per finished job. They are sent, and the cancel set read, by a second thread while a
  round's network calls run (`run_round`, `workers.exchange`), at most every `redis_interval_ms`,
  so the stepping thread does not wait for Redis at every step; an idle worker sends them at once
  (`flush_step`).

Who does what: this module is the loop (idle dequeue, rounds, backoff, stopping, heartbeat
thread, maintenance); `workers.rq_adaptor` the jobs' RQ side (start, heartbeat, finish, requeue);
`workers.exchange` the Redis I/O of the rounds; `workers.engine` the batching, with admission
decided by `workers.admission`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from redis import Redis
from rq.exceptions import StopRequested
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import TimerDeathPenalty
from rq.utils import now
from rq.worker import SimpleWorker

from ddserve import recovery
from ddserve.job_events import retention_s
from ddserve.jobs import queue_name
from ddserve.settings import Settings
from ddserve.storage import Storage, create_storage
from workers import rq_bridge
from workers.engine import BatchingPolicy, Engine, Ticket
from workers.errors import WorkerStopped
from workers.exchange import RedisExchange
from workers.model_pool import ModelPool
from workers.rq_adaptor import REDIS_ERRORS, RQJobs, WorkerJob
from workers.step_writes import StepWrites

log = logging.getLogger(__name__)


def servable_models(pool: ModelPool) -> list[str]:
    """Every zoo model with a task to serve (evaluation classifiers have none)."""
    return sorted(name for name, entry in pool.catalog.items() if entry.tasks)


def worker_stats_key(prefix: str, worker_name: str) -> str:
    return f"{prefix}:worker-stats:{worker_name}"


IDLE_POLL_S = 1  # longest blocking dequeue; bounds how late a stop request is noticed
MAX_BACKOFF_S = 5.0  # longest wait between attempts to reach Redis (bounds recovery after it)


def maintenance_interval_s(settings: Settings) -> int:
    """How often a worker runs RQ's maintenance (abandoned jobs): a quarter of
    `abandoned_after_s`, so a dead worker's job is retried within 1.25 × abandoned_after_s (plus
    one scheduling round) of its last heartbeat."""
    return max(1, math.ceil(settings.abandoned_after_s / 4))


class RQFeed:
    """The engine's job source (`workers.engine.JobFeed`): non-blocking pops of one model's queue,
    and the jobs to stop.

    With `overlap_redis`, the cancel set is read by the worker's exchanges with Redis
    (`workers.exchange`), beside a network call and at most every `redis_interval_ms`, for the
    jobs held then; the next round's sweep uses that answer, so the check costs the stepping
    thread no round trip, and the rounds between find nothing new. A job taken since is checked by
    the next exchange. Without `overlap_redis`, every round's sweep reads the cancel set itself."""

    def __init__(self, worker: BatchingWorker) -> None:
        self.worker = worker

    def take(self, model: str) -> WorkerJob | None:
        if self.worker.stopping:
            return None
        queue = self.worker.queue_for(model)
        if queue is None:
            return None
        while True:
            got = rq_bridge.dequeue(self.worker, [queue], None)
            if got is None:
                return None
            held = self.worker.jobs.start(*got)
            if held is not None:
                return held

    def canceled(self, tickets: list[Ticket]) -> set[str]:
        """Executions to stop (their keys): cancel requests for their job, and executions this
        worker no longer owns (declared abandoned while it was frozen or cut off, or superseded by
        a later attempt; their ticket's cancel then only forgets them)."""
        flags = self.worker.exchange.take_cancel_flags()
        if not self.worker.settings.overlap_redis:
            job_ids = list(dict.fromkeys(ticket.id for ticket in tickets))
            flags = self.worker.exchange.cancel_requests(job_ids)
        lost = self.worker.jobs.lost_keys()
        return {
            ticket.key
            for ticket in tickets
            if (flags and flags.get(ticket.id)) or ticket.key in lost
        }


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
            folders = ", ".join(map(str, settings.model_repository()))
            raise ValueError(f"no models to serve: the model repository ({folders}) is empty")
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
        self.pool.warm(self.models)
        self.storage = storage or create_storage(settings)
        events_ttl_s = retention_s(
            settings.result_ttl_s,
            settings.failure_ttl_s,
            settings.job_ttl_s,
            settings.job_deadline_s,
        )
        # the current round's writes
        writes = StepWrites(settings.key_prefix, events_ttl_s, settings.job_events)
        model_of_queue = {q: m for m, q in self._queues_by_model.items()}
        self.jobs = RQJobs(self, settings, writes, model_of_queue)
        self.exchange = RedisExchange(self, settings, self.jobs, writes)
        self.feed = RQFeed(self)
        self.engine = Engine(
            self.pool,
            self.models,
            self.feed,
            self.storage,
            BatchingPolicy.from_settings(settings),
            store_threads=settings.store_threads,
            prepare_thread=settings.prepare_thread,
        )
        # Sweeps wait until Redis answered for this long without a break (`ddserve.recovery`).
        self.recovery_grace = recovery.RecoveryGrace(settings.recovery_grace())
        self._stop = threading.Event()
        self._stop_requested_at: float | None = None
        self._loop_done = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None

    # --- queues and jobs ------------------------------------------------------------------------
    def queue_for(self, model: str) -> Queue | None:
        name = self._queues_by_model.get(model)
        return next((q for q in self.queues if q.name == name), None)

    def flush_step(self) -> None:
        """Send the round's writes now (`RedisExchange.flush`): what an idle loop does, since no
        round follows to carry them."""
        self.exchange.flush()

    def run_round(self, io: ThreadPoolExecutor) -> None:
        """One scheduling round whose Redis traffic overlaps its network calls: the engine admits
        (cancellations as last read, queue reads), then steps while `io` runs the exchange with
        Redis (`RedisExchange.begin`, at most every `redis_interval_ms`); the exchange is settled
        once the step is done, so a failed write is handled as `flush_step` handles it."""
        self.engine.admit()
        exchange = self.exchange.begin(io, self.engine.held_job_ids())
        try:
            self.engine.step()
        except BaseException:
            if exchange is not None:
                with contextlib.suppress(Exception):
                    self.exchange.settle(exchange)
            raise
        if exchange is not None:
            self.exchange.settle(exchange)

    def clean_registries(self) -> None:
        """RQ's maintenance of each queue (abandoned jobs retried or failed, dead workers and stuck
        dequeues cleaned), under RQ's cleaning lock held for one interval at most — skipped until
        Redis has answered for `recovery_grace_s` without a break (the next pass is one interval
        later): right after an outage, live workers' entries are expired until they heartbeat."""
        self.last_cleaned_at = now()
        wait = self.recovery_grace.remaining_s()
        if wait != 0.0:
            log.debug(
                "worker %s: recovery sweep skipped: Redis %s",
                self.name,
                "not reachable yet"
                if wait is None
                else f"reachable again, grace ends in {wait:.1f} s",
            )
            return
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
                    if self.jobs.has_deferred:
                        self.jobs.finish_deferred()
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
                        held = self.jobs.start(*got)
                        if held is None:
                            continue
                        self.engine.offer(held.model, held)
                    if self.settings.overlap_redis:
                        self.run_round(io)
                    else:
                        self.flush_step()
                        self.engine.run_once()
                    worked = True
                    backoff = 0.5
                except REDIS_ERRORS as exc:
                    self.recovery_grace.unreachable()
                    # Nothing is lost: held jobs stay held (and unfinished finishes kept) until
                    # Redis answers again; a stop request past its grace leaves them to recovery.
                    if self.stopping and self._grace_over():
                        log.warning(
                            "worker %s: Redis unavailable while stopping; leaving %d jobs to "
                            "recovery (abandoned after %g s)",
                            self.name,
                            len(self.jobs.held),
                            self.settings.abandoned_after_s,
                        )
                        break
                    log.warning(
                        "worker %s: Redis unavailable (%s); holding %d jobs, retrying in %.1f s",
                        self.name,
                        type(exc).__name__,
                        len(self.jobs.held),
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

    def register_birth(self) -> None:
        """RQ's, after taking over a dead registration of this name (a killed pod restarted under
        its name), instead of refusing to start until it expires."""
        rq_bridge.clear_stale_registration(self, 3 * self.settings.heartbeat_s)
        super().register_birth()

    def _heartbeat_loop(self) -> None:
        while not self._loop_done.wait(self.settings.heartbeat_s):
            try:
                self.jobs.heartbeat()
                self.recovery_grace.reachable()  # this worker's jobs are fresh again
                self.publish_stats()
            except REDIS_ERRORS as exc:
                self.recovery_grace.unreachable()
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
            "stale_finishes_dropped": self.jobs.stale_finishes_dropped,
            "time": time.time(),
        }
        pipe = self.connection.pipeline()
        pipe.hset(key, mapping=fields)
        pipe.expire(key, max(60, int(10 * self.settings.heartbeat_s)))
        pipe.execute()
