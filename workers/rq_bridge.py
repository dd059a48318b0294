"""Every call into RQ's semi-private worker internals, in one module (RQ 3.x).

RQ runs one job per `execute_job` call; the batching worker instead takes several jobs, runs them in
one denoising loop and finishes each on its own. To keep results, registries, TTLs, retries,
callbacks and worker statistics exactly as RQ keeps them for a plain job, each job goes through the
same internals a `SimpleWorker` uses:

- start: the writes of `prepare_execution` (an `Execution`, the started-job registry entry, the
  worker's execution index — RQ 3 allows several executions per worker) and of
  `prepare_job_execution` (status `started`, `started_at`, heartbeat, removal from the intermediate
  queue), sent in one transaction instead of two;
- heartbeat: `maintain_heartbeats(job, execution)` (a `SimpleWorker` never refreshes its started
  jobs, so long batches would look abandoned);
- success: `_finalize_success` (result, `Retry` return values, success callback, dependents); for
  the jobs of one step that need none of its extras, `finish_successes` sends the writes of RQ's
  `handle_job_success` for all of them in one transaction (3 round trips for the step instead of
  about 4 per job);
- job.meta: `save_meta` queues RQ's serialized meta on a pipeline (progress of a whole step in one
  round trip);
- failure: the steps of `_finalize_failure` (failure callback, exception handlers), then the writes
  of `handle_job_failure` (status, failed-job registry and failure result, or a retry; counters;
  execution cleanup) in one transaction fenced by the job's attempt (`finish_failure`);
- stop (a canceled running job): RQ's stop-job path — stopped callback, then `handle_job_failure`
  as for a job stopped on request (status `stopped`, never retried), fenced the same way
  (`finish_stopped`).

Fenced finishes (`attempt` given) WATCH the job, check that it is still `started` in that attempt
and write in MULTI/EXEC, so that a recovery sweep or a later attempt that takes the job at any
moment makes the stale finish write nothing (`ddserve.recovery`, fencing).

Every path that ends a job also publishes it (`ddserve.notifications.publish_finished`, waking the
gateways' held `Prefer: wait` requests): inside the transaction that ends it
(`finish_successes`, `finish_failure`, `finish_stopped`), and right after RQ's own success path
(which builds and executes its pipeline itself) for the successes that need it.

These names changed between RQ 2.x and 3.0; `check_rq_internals()` verifies every one of them (and
their parameters, and which calls RQ's failure path makes) and `tests/test_worker_rq_bridge.py`
fails loudly on an RQ upgrade that breaks them — including one that changes what RQ writes when it
starts or finishes a job, which the merged start, `finish_successes` and the failure path reproduce
(the tests compare the Redis state both leave).
"""

from __future__ import annotations

import ast
import inspect
import logging
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import rq
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError, WatchError
from rq import callbacks as rq_callbacks
from rq.exceptions import DequeueTimeout
from rq.executions import Execution
from rq.job import Job, JobStatus, Retry
from rq.job_lifecycle import format_exc_info
from rq.queue import Queue
from rq.utils import now, utcformat, utcparse
from rq.worker import BaseWorker, WorkerStatus

from ddserve import recovery
from ddserve.notifications import prefix_of_queue, publish_finished
from ddserve.recovery import ATTEMPT_FIELD, EXECUTION_FIELD, attempt_of

log = logging.getLogger(__name__)
SUPPORTED_RQ_MAJOR = 3
# RQ statuses in which a job has ended (a retried job is queued or scheduled again instead).
ENDED = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED})

# name → the parameters (after self) it must accept, in order.
REQUIRED_WORKER_METHODS: dict[str, tuple[str, ...]] = {
    "prepare_execution": ("job",),
    "prepare_job_execution": ("job", "remove_from_intermediate_queue"),
    "maintain_heartbeats": ("job", "execution"),
    "_finalize_success": ("job", "queue", "execution", "return_value"),
    "_finalize_failure": ("job", "queue", "execution", "exc_info"),
    "handle_job_failure": ("job", "queue", "started_job_registry", "exc_string", "execution"),
    "set_state": ("state", "pipeline"),
    "heartbeat": ("timeout", "pipeline"),
    "get_heartbeat_ttl": ("job",),
    "increment_successful_job_count": ("pipeline",),
    "increment_failed_job_count": ("pipeline",),
    "handle_exception": ("job", "exc_info"),
    "handle_execution_ended": ("job", "queue", "heartbeat_ttl"),
    "_enqueue_dependents_safely": ("queue", "job"),
    "_release_slot_safely": ("job",),
    "increment_total_working_time": ("job_execution_time", "pipeline"),
    "cleanup_execution": ("job", "pipeline", "execution"),
}
REQUIRED_JOB_METHODS: dict[str, tuple[str, ...]] = {
    "heartbeat": ("timestamp", "ttl", "pipeline"),
    "prepare_for_execution": ("worker_name", "pipeline"),
    "get_result_ttl": ("default_ttl",),
    "_handle_success": (
        "result_ttl",
        "pipeline",
        "worker_name",
        "execution_id",
        "execution_started_at",
        "execution_ended_at",
    ),
    "cleanup": ("ttl", "pipeline", "remove_from_queue"),
    "_serialize_meta": (),
    "set_status": ("status", "pipeline"),
    "_handle_failure": (
        "exc_string",
        "pipeline",
        "worker_name",
        "execution_id",
        "execution_started_at",
        "execution_ended_at",
    ),
    "retry": ("queue", "pipeline"),
    "send_webhooks": ("status", "exc_string"),
}
REQUIRED_EXECUTION_METHODS: dict[str, tuple[str, ...]] = {
    "create": ("job", "ttl", "pipeline", "worker_name"),
}
REQUIRED_CALLBACKS: dict[str, tuple[str, ...]] = {
    "execute_failure_callback": ("job", "death_penalty_class", "exc_info"),
    "execute_stopped_callback": ("job", "death_penalty_class"),
}
# Job attributes that decide whether a success needs RQ's full path (`_needs_rq_success_path`),
# and whether a failure retries (`_failure_writes`).
REQUIRED_JOB_PROPERTIES = (
    "success_callback",
    "has_rate_limit",
    "dependents_key",
    "should_retry",
    "failure_callback_timeout",
)
# The calls (logging aside) each function of RQ's failure path makes, which `finish_failure`,
# `finish_stopped` and `_failure_writes` reproduce step by step: a call added or removed by an RQ
# upgrade (a new write, say) fails loudly, so that the mirror is reviewed, not silently stale.
MIRRORED_FAILURE_PATH: dict[str, frozenset[str]] = {
    "BaseWorker._finalize_failure": frozenset(
        {
            "exc_info",
            "execute_failure_callback",
            "format_exc_info",
            "handle_exception",
            "handle_execution_ended",
            "handle_job_failure",
        }
    ),
    "BaseWorker.handle_execution_ended": frozenset({"heartbeat", "now"}),
    "BaseWorker.handle_job_failure": frozenset(
        {
            "StartedJobRegistry",
            "_enqueue_dependents_safely",
            "_handle_failure",
            "_release_slot_safely",
            "cleanup_execution",
            "execute",
            "increment_failed_job_count",
            "increment_total_working_time",
            "pipeline",
            "retry",
            "send_webhooks",
            "set_status",
        }
    ),
}
_LOGGING = frozenset({"debug", "info", "warning", "error", "exception", "log"})
# What handle_job_failure reads to decide a stop, a retry and the failed-job registry.
MIRRORED_FAILURE_READS = ("_stopped_job_id", "should_retry", "disable_default_exception_handler")
REQUIRED_QUEUE_METHODS: dict[str, tuple[str, ...]] = {
    "dequeue_any": (
        "queues",
        "timeout",
        "connection",
        "job_class",
        "serializer",
        "death_penalty_class",
    ),
}


class UnsupportedRQError(RuntimeError):
    """The installed RQ lacks an internal this module relies on."""


def _name(owner: Any) -> str:
    return owner.__name__.rpartition(".")[2]  # a class, or a module (rq.callbacks → callbacks)


def _parameters(function: Any) -> tuple[str, ...]:
    names = list(inspect.signature(function).parameters)
    return tuple(n for n in names if n not in ("self", "cls"))


def _calls(function: Any) -> frozenset[str]:
    """The names `function`'s source calls (`x.name(...)` or `name(...)`), logging aside."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute):
                names.add(node.func.attr)
            elif isinstance(node.func, ast.Name):
                names.add(node.func.id)
    return frozenset(names - _LOGGING)


def _failure_path_problems() -> list[str]:
    """How RQ's failure path differs from the one `_failure_writes` mirrors (empty: it does not)."""
    problems = []
    for qualname, expected in MIRRORED_FAILURE_PATH.items():
        function = getattr(BaseWorker, qualname.split(".")[1], None)
        if function is None:
            continue  # reported as missing by the signature checks
        found = _calls(function)
        if found != expected:
            added, removed = sorted(found - expected), sorted(expected - found)
            problems.append(f"{qualname} now calls {added} and no longer {removed}")
    source = inspect.getsource(BaseWorker.handle_job_failure)
    for name in MIRRORED_FAILURE_READS:
        if name not in source:
            problems.append(f"BaseWorker.handle_job_failure no longer reads {name}")
    return problems


def check_rq_internals() -> None:
    """Raise UnsupportedRQError unless RQ is 3.x with every internal this module calls."""
    major = int(str(rq.__version__).split(".")[0])
    if major != SUPPORTED_RQ_MAJOR:
        raise UnsupportedRQError(
            f"workers.rq_bridge supports RQ {SUPPORTED_RQ_MAJOR}.x, found {rq.__version__}"
        )
    problems = []
    owners: tuple[tuple[Any, dict[str, tuple[str, ...]]], ...] = (
        (BaseWorker, REQUIRED_WORKER_METHODS),
        (Queue, REQUIRED_QUEUE_METHODS),
        (Job, REQUIRED_JOB_METHODS),
        (Execution, REQUIRED_EXECUTION_METHODS),
        (rq_callbacks, REQUIRED_CALLBACKS),
    )
    for owner, required in owners:
        for name, params in required.items():
            function = getattr(owner, name, None)
            if function is None:
                problems.append(f"{_name(owner)}.{name} is missing")
            elif _parameters(function)[: len(params)] != params:
                problems.append(
                    f"{_name(owner)}.{name}{_parameters(function)} no longer takes {params}"
                )
    problems.extend(_failure_path_problems())
    if "self.disable_default_exception_handler" not in inspect.getsource(BaseWorker.__init__):
        problems.append("BaseWorker no longer has the attribute disable_default_exception_handler")
    for name in REQUIRED_JOB_PROPERTIES:
        if not isinstance(getattr(Job, name, None), property):
            problems.append(f"Job.{name} is no longer a property")
    for name in ("webhooks", "repeats_left"):  # instance attributes, set in Job.__init__
        if f"self.{name}" not in inspect.getsource(Job.__init__):
            problems.append(f"Job no longer has the attribute {name}")
    if not isinstance(getattr(Queue, "intermediate_queue_key", None), property):
        problems.append("Queue.intermediate_queue_key is no longer a property")
    if problems:
        raise UnsupportedRQError("RQ internals changed: " + "; ".join(problems))


def dequeue(
    worker: BaseWorker, queues: list[Queue], timeout: int | None
) -> tuple[Job, Queue] | None:
    """The next job of `queues` (in order): blocks up to `timeout` s (None = do not block)."""
    try:
        return Queue.dequeue_any(
            queues,
            timeout,
            connection=worker.connection,
            job_class=worker.job_class,
            serializer=worker.serializer,
            death_penalty_class=worker.death_penalty_class,
        )
    except DequeueTimeout:
        return None


def mark_started(worker: BaseWorker, job: Job) -> Execution:
    """`start_attempt` for callers that need only the execution."""
    return start_attempt(worker, job)[0]


def start_attempt(worker: BaseWorker, job: Job) -> tuple[Execution, int]:
    """Mark a dequeued job `started` exactly as RQ does before performing it; return its execution
    and the number of this attempt (`ddserve.recovery.ATTEMPT_FIELD`, incremented here: each
    delivery of a job is a new attempt, and only the current one may write or finish it); the
    execution's id is recorded as the job's current one (`EXECUTION_FIELD`, for the sweeps).

    The writes of `prepare_execution` and of `prepare_job_execution(job, True)`, in their order,
    and the attempt's increment, in one transaction (RQ sends two)."""
    ttl = worker.get_heartbeat_ttl(job)
    with worker.connection.pipeline() as pipe:
        # prepare_execution
        execution = Execution.create(job, ttl, pipeline=pipe, worker_name=worker.name)
        worker.set_state(WorkerStatus.BUSY, pipeline=pipe)
        # prepare_job_execution
        worker.heartbeat(ttl, pipeline=pipe)
        job.heartbeat(now(), ttl, pipeline=pipe)
        job.prepare_for_execution(worker.name, pipeline=pipe)
        pipe.persist(job.key)
        # A job popped from one queue with LMOVE sits in that queue's intermediate list until started.
        intermediate = Queue(job.origin, connection=worker.connection).intermediate_queue_key
        pipe.lrem(intermediate, 1, job.id)
        at = len(pipe)
        pipe.hincrby(job.key, ATTEMPT_FIELD, 1)
        pipe.hset(job.key, EXECUTION_FIELD, execution.id)  # what the sweeps fence on
        attempt = int(pipe.execute()[at])
    worker.executions[execution.id] = execution
    return execution, attempt


def save_meta(job: Job, pipe: Pipeline) -> None:
    """Queue `job.save_meta()`'s write (the serialized `job.meta`) on `pipe`."""
    pipe.hset(job.key, "meta", job._serialize_meta())


def heartbeat(worker: BaseWorker, job: Job, execution: Execution) -> None:
    """Refresh the worker, the execution and the job's started-registry entry."""
    worker.maintain_heartbeats(job, execution)


def finish_success(
    worker: BaseWorker, job: Job, queue: Queue, execution: Execution, value: Any
) -> None:
    """Store `value` as the job's result and run RQ's success path (callbacks, dependents, TTLs)."""
    worker._finalize_success(job, queue, execution, value)
    announce_end(worker, job)


def announce_end(worker: BaseWorker, job: Job) -> None:
    """Publish that the job ended, after one of RQ's own finishing paths wrote it (one PUBLISH:
    those paths execute their pipelines themselves) — unless RQ queued it again for a retry. A
    failed publish is only logged: the gateways' safety poll finds the job ended anyway, and
    raising would make the worker run RQ's finishing path a second time."""
    if job.get_status(refresh=False) not in ENDED:
        return
    try:
        publish_finished(worker.connection, prefix_of_queue(job.origin), job.id)
    except RedisError as exc:
        log.warning("job %s: could not publish its end (%s)", job.id, type(exc).__name__)


@dataclass
class Succeeded:
    """A job that returned `value` in its execution, to be finished by `finish_successes`; with an
    `attempt`, only if that is still the job's current attempt (fenced)."""

    job: Job
    queue: Queue
    execution: Execution
    value: Any
    attempt: int | None = None


# The check `finish_successes` makes after its WATCH, in one round trip: KEYS = the jobs'
# dependents sets, then the jobs' hashes; ARGV = the number of dependents sets, the attempt field.
# Returns how many dependents sets exist, then "attempt|status" of each job.
_SUCCESS_CHECK = """
local n = tonumber(ARGV[1])
local out = {0}
for i = 1, n do
  out[1] = out[1] + redis.call('EXISTS', KEYS[i])
end
for i = n + 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], ARGV[2], 'status')
  out[#out + 1] = (v[1] or '') .. '|' .. (v[2] or '')
end
return out
"""


def _is_current(item: Succeeded, reply: bytes | str | None) -> bool:
    """Whether the job is still `started` in the item's attempt (unfenced items always are), from
    its line of `_SUCCESS_CHECK`'s reply ("attempt|status")."""
    if item.attempt is None:
        return True
    text = (reply.decode() if isinstance(reply, bytes) else reply) or "|"
    attempt, _, status = text.partition("|")
    return status == JobStatus.STARTED.value and attempt_of(attempt or None) == item.attempt


def _current(connection: Redis, item: Succeeded) -> bool:
    """`_is_current`, read now (for the successes that take RQ's own path, one by one)."""
    return item.attempt is None or recovery.is_current(connection, item.job, item.attempt)


def _needs_rq_success_path(worker: BaseWorker, item: Succeeded) -> bool:
    """Whether RQ's success path would do more than write the job's outcome: run a callback, send
    webhooks, retry, repeat, delete the job at once (result TTL 0) or free a rate-limit slot."""
    job = item.job
    return (
        isinstance(item.value, Retry)
        or job.success_callback is not None
        or bool(job.webhooks)
        or bool(job.repeats_left)
        or job.has_rate_limit
        or job.get_result_ttl(worker.default_result_ttl) == 0
    )


def _success_writes(worker: BaseWorker, item: Succeeded, pipe: Pipeline) -> None:
    """What `_finalize_success` → `handle_job_success` writes for a job without dependents."""
    job, execution = item.job, item.execution
    # handle_execution_ended (the heartbeat's TTL argument is unused by RQ 3)
    job.ended_at = now()
    job.heartbeat(now(), job.success_callback_timeout, pipeline=pipe)
    job._result = item.value
    job._status = JobStatus.FINISHED
    # handle_job_success
    worker.increment_successful_job_count(pipeline=pipe)
    worker.increment_total_working_time(job.ended_at - job.started_at, pipe)
    result_ttl = job.get_result_ttl(worker.default_result_ttl)
    job._handle_success(
        result_ttl,
        pipeline=pipe,
        worker_name=worker.name,
        execution_id=execution.id,
        execution_started_at=execution.created_at,
        execution_ended_at=job.ended_at,
    )
    job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
    job._status = JobStatus.FINISHED
    worker.cleanup_execution(job, pipeline=pipe, execution=execution)


def finish_successes(
    worker: BaseWorker,
    items: list[Succeeded],
    extra: Callable[[Pipeline, list[Succeeded]], None] | None = None,
) -> list[Succeeded]:
    """Finish jobs that returned as `_finalize_success` finishes each — result, finished registry,
    TTLs, execution cleanup, worker counters — with their writes and `extra`'s (say, their meta and
    metrics) in one transaction: WATCH the jobs' dependents sets and the jobs themselves, check
    (one script) that no dependents set exists and that each job is still `started` in the
    item's attempt, MULTI/EXEC (a dependent added or a job touched meanwhile aborts the EXEC, and
    the check runs again, as in RQ's own `handle_job_success`). Jobs with dependents, or needing
    more of RQ's success path (`_needs_rq_success_path`), are finished by `_finalize_success`
    itself, one by one, after the transaction (their attempt checked just before).

    `extra(pipe, finished)` must only queue writes (it may be called again after an abort);
    `finished` are the items this transaction finishes. Returns the items dropped because
    their attempt is no longer the job's current one (stale: the job was handed out again)."""
    if not items:
        return []
    fast = [item for item in items if not _needs_rq_success_path(worker, item)]
    stale: list[Succeeded] = []
    with worker.connection.pipeline() as pipe:
        while True:
            kept = list(fast)
            stale = []
            try:
                if fast:
                    keys = [item.job.dependents_key for item in fast]
                    jobs = [item.job.key for item in fast]
                    pipe.watch(*keys, *jobs)
                    reply = pipe.eval(
                        _SUCCESS_CHECK,
                        len(keys) + len(jobs),
                        *keys,
                        *jobs,
                        len(keys),
                        ATTEMPT_FIELD,
                    )
                    checks = dict(zip(map(id, fast), reply[1:], strict=True))
                    stale = [item for item in fast if not _is_current(item, checks[id(item)])]
                    kept = [item for item in fast if _is_current(item, checks[id(item)])]
                    if int(reply[0]):  # rare: let RQ move the dependents, job by job
                        pipe.reset()
                        kept = []
                pipe.multi()
                for item in kept:
                    _success_writes(worker, item, pipe)
                    publish_finished(pipe, prefix_of_queue(item.job.origin), item.job.id)
                if extra is not None:
                    extra(pipe, kept)
                pipe.execute()
                break
            except WatchError:
                continue
    done = {id(item) for item in kept} | {id(item) for item in stale}
    for item in items:
        if id(item) in done:
            continue
        if not _current(worker.connection, item):
            stale.append(item)
            continue
        finish_success(worker, item.job, item.queue, item.execution, item.value)
    return stale


def finish_failure(
    worker: BaseWorker,
    job: Job,
    queue: Queue,
    execution: Execution,
    error: BaseException,
    retry: bool = True,
    attempt: int | None = None,
    extra: Callable[[Pipeline], None] | None = None,
) -> bool:
    """RQ's failure path for `error` (`_finalize_failure`): failure callback, exception handlers,
    then — in one transaction, fenced by `attempt` when given (`_finish_failed`) — a retry (when
    `retry` and the job has retries left) or the failed-job registry, with `extra`'s writes.
    Returns False when the job is no longer `started` in `attempt` (nothing was written)."""
    if not retry:
        job.retries_left = 0  # handle_job_failure retries only while retries_left > 0
    exc_info: Any = (type(error), error, error.__traceback__)
    if error.__traceback__ is None:  # an exception never raised: give RQ a traceback to record
        try:
            raise error
        except BaseException:
            exc_info = sys.exc_info()
    # _finalize_failure, up to handle_job_failure: what does not write the job's outcome
    job._status = JobStatus.FAILED
    job.ended_at = now()  # handle_execution_ended (its heartbeat is written with the failure)
    try:
        rq_callbacks.execute_failure_callback(job, worker.death_penalty_class, *exc_info)
    except Exception:  # RQ: a failing callback replaces the job's exception as its failure
        exc_info = sys.exc_info()
    worker.handle_exception(job, *exc_info)
    return _finish_failed(
        worker, job, queue, execution, format_exc_info(exc_info), False, attempt, extra
    )


def finish_stopped(
    worker: BaseWorker,
    job: Job,
    queue: Queue,
    execution: Execution,
    reason: str,
    attempt: int | None = None,
    extra: Callable[[Pipeline], None] | None = None,
) -> bool:
    """End a running job on a cancel request as RQ's stop-job path does (`_handle_stopped_job`):
    stopped callback, then status `stopped`, failed-job registry, no retry — in one transaction,
    fenced by `attempt` when given. Returns False when the job is no longer `started` in
    `attempt` (nothing was written)."""
    job.ended_at = now()
    try:
        rq_callbacks.execute_stopped_callback(job, worker.death_penalty_class)
    except Exception:
        worker.log.exception("stopped callback of job %s raised", job.id)
    return _finish_failed(worker, job, queue, execution, reason, True, attempt, extra)


def _finish_failed(
    worker: BaseWorker,
    job: Job,
    queue: Queue,
    execution: Execution,
    exc_string: str,
    stopped: bool,
    attempt: int | None,
    extra: Callable[[Pipeline], None] | None,
) -> bool:
    """`handle_job_failure`, fenced: WATCH the job, check that it is still `started` in `attempt`
    (else write nothing and return False), then `extra`'s writes, the failure's
    (`_failure_writes`) and the job's end published, in MULTI/EXEC — a sweep or a later attempt
    touching the job meanwhile aborts the EXEC, and the check runs again. RQ's steps after its
    commit (webhooks, dependents, the rate-limit slot) follow a committed transaction only.

    Unlike RQ's, a Redis error is raised, not logged: the caller keeps the finish and retries it
    (`workers.rq_adaptor.RQJobs.finish`), the job's state in memory as it was before."""
    saved = _failure_state(worker, job, execution)
    with worker.connection.pipeline() as pipe:
        while True:
            try:
                if attempt is not None:
                    pipe.watch(job.key)
                    if not recovery.is_current(pipe, job, attempt):
                        pipe.reset()
                        return False
                pipe.multi()
                if extra is not None:
                    extra(pipe)
                retried = _failure_writes(worker, job, queue, execution, exc_string, stopped, pipe)
                if not retried:
                    publish_finished(pipe, prefix_of_queue(job.origin), job.id)
                pipe.execute()
                break
            except WatchError:
                _restore_failure_state(worker, job, execution, saved)
            except BaseException:
                _restore_failure_state(worker, job, execution, saved)
                raise
    # handle_job_failure, once the failure is persisted (these never raise)
    if not retried and not stopped:
        job.send_webhooks(JobStatus.FAILED, exc_string=exc_string)
    if not retried:
        worker._enqueue_dependents_safely(queue, job)
    worker._release_slot_safely(job)
    return True


def _failure_state(worker: BaseWorker, job: Job, execution: Execution) -> dict[str, Any]:
    """What `_failure_writes` changes in memory (the job; the worker's executions, which
    `cleanup_execution` leaves), to undo it when its EXEC aborts."""
    saved = {name: getattr(job, name) for name in _FAILURE_STATE}
    saved["execution_held"] = execution.id in worker.executions
    return saved


def _restore_failure_state(
    worker: BaseWorker, job: Job, execution: Execution, saved: dict[str, Any]
) -> None:
    for name in _FAILURE_STATE:
        setattr(job, name, saved[name])
    if saved["execution_held"]:
        worker.executions[execution.id] = execution


# Set by set_status, handle_execution_ended's heartbeat, _handle_failure and retry (_enqueue_job or
# schedule_job): what a repeated `_failure_writes` must find as the first one did.
_FAILURE_STATE = (
    "_status",
    "last_heartbeat",
    "_exc_info",
    "retries_left",
    "origin",
    "enqueued_at",
    "timeout",
    "redis_server_version",
)


def _failure_writes(
    worker: BaseWorker,
    job: Job,
    queue: Queue,
    execution: Execution,
    exc_string: str,
    stopped: bool,
    pipe: Pipeline,
) -> bool:
    """What `handle_job_failure` (and, for a failure, `handle_execution_ended`'s heartbeat) writes,
    queued on `pipe` in RQ's order; returns whether the job is retried (queued again, not ended).

    A job stopped on request is marked `stopped` and never retried; a failed job retries while it
    has retries left (`Job.retry`: queued again, or scheduled after its retry interval), else it is
    marked `failed`; either way the execution is cleaned up and the worker's counters updated."""
    if not stopped:  # handle_execution_ended (the heartbeat's TTL argument is unused by RQ 3)
        job.heartbeat(now(), job.failure_callback_timeout, pipeline=pipe)
    retry = job.should_retry and not stopped
    if stopped:
        job.set_status(JobStatus.STOPPED, pipeline=pipe)
    elif not retry:  # a retried job gets its status from job.retry() below
        job.set_status(JobStatus.FAILED, pipeline=pipe)
    execution_ended_at = job.ended_at
    worker.cleanup_execution(job, pipeline=pipe, execution=execution)
    if not worker.disable_default_exception_handler and not retry:
        job._handle_failure(
            exc_string,
            pipeline=pipe,
            worker_name=worker.name,
            execution_id=execution.id,
            execution_started_at=execution.created_at,
            execution_ended_at=execution_ended_at,
        )
    worker.increment_failed_job_count(pipe)
    if job.started_at and job.ended_at:
        worker.increment_total_working_time(job.ended_at - job.started_at, pipe)
    if retry:
        _retry(job, queue, pipe)
    return retry


def _retry(job: Job, queue: Queue, pipe: Pipeline) -> None:
    """`job.retry(queue, pipe)` with every write in the transaction: RQ's writes the `scheduled`
    status of a retry with an interval once more on the job's own connection, which would touch
    the WATCHed job and abort every EXEC; here that write is queued on `pipe` too."""
    connection = job.connection
    job.connection = pipe
    try:
        job.retry(queue, pipe)
    finally:
        job.connection = connection


def set_idle(worker: BaseWorker) -> None:
    """The worker state dashboards show once no job is running."""
    worker.set_state(WorkerStatus.IDLE)


def active_executions(worker: BaseWorker) -> dict[str, Execution]:
    """The worker's executions now in progress, by execution id (RQ 3 keeps several)."""
    return dict(worker.executions)


class WorkerNameTaken(RuntimeError):
    """A live worker (recent heartbeat) is registered under this worker's name."""


def clear_stale_registration(worker: BaseWorker, stale_after_s: float) -> bool:
    """Before `register_birth`: a registration of this worker's name that never registered its death
    (the process was killed: OOM, SIGKILL, a node lost) blocks RQ's `register_birth` until its key
    expires (worker_ttl + 60 s, ~8 minutes), so a Kubernetes pod restarted under `$(POD_NAME)`
    crash-looped meanwhile. A registration whose last heartbeat is older than `stale_after_s` is
    marked dead here (the recovery sweep deals with the jobs it held) and True is returned; one
    with a recent heartbeat is a live worker of the same name: `WorkerNameTaken`."""
    key = worker.key
    fields = worker.connection.hmget(key, ["death", "last_heartbeat", "birth"])
    death, last_heartbeat, birth = fields
    if not worker.connection.exists(key) or death is not None:
        return False
    stamp = last_heartbeat or birth
    age = None if stamp is None else (now() - utcparse(stamp.decode())).total_seconds()
    if age is not None and age < stale_after_s:
        raise WorkerNameTaken(
            f"a worker named {worker.name!r} heartbeated {age:.0f} s ago and is still registered: "
            "worker names must be unique (Kubernetes: one pod name each); a killed worker's name "
            f"is free again {stale_after_s:.0f} s after its last heartbeat"
        )
    worker.connection.hset(key, "death", utcformat(now()))
    log.warning(
        "worker %s: took over the registration of a dead worker of the same name (last heartbeat "
        "%s s ago)",
        worker.name,
        "?" if age is None else f"{age:.0f}",
    )
    return True
