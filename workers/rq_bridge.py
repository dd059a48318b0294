"""Every call into RQ's semi-private worker internals, in one module (RQ 3.x).

RQ runs one job per `execute_job` call; the batching worker instead takes several jobs, runs them in
one denoising loop and finishes each on its own. To keep results, registries, TTLs, retries,
callbacks and worker statistics exactly as RQ keeps them for a plain job, each job goes through the
same internals a `SimpleWorker` uses:

- start: `prepare_execution` (an `Execution`, the started-job registry entry, the worker's execution
  index — RQ 3 allows several executions per worker) then `prepare_job_execution` (status `started`,
  `started_at`, heartbeat, removal from the intermediate queue);
- heartbeat: `maintain_heartbeats(job, execution)` (a `SimpleWorker` never refreshes its started
  jobs, so long batches would look abandoned);
- success: `_finalize_success` (result, `Retry` return values, success callback, dependents);
- failure: `_finalize_failure` (failure callback, exception handlers, retry or failed registry);
- stop (a canceled running job): RQ's own stop-job path — `_stopped_job_id` then
  `handle_job_failure`, which marks it `stopped` and never retries it.

These names changed between RQ 2.x and 3.0; `check_rq_internals()` verifies every one of them (and
their parameters) and `tests/test_worker_rq_bridge.py` fails loudly on an RQ upgrade that breaks them.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import rq
from rq.exceptions import DequeueTimeout
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.worker import BaseWorker, WorkerStatus

SUPPORTED_RQ_MAJOR = 3

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
}
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


def _parameters(function: Any) -> tuple[str, ...]:
    names = list(inspect.signature(function).parameters)
    return tuple(n for n in names if n not in ("self", "cls"))


def check_rq_internals() -> None:
    """Raise UnsupportedRQError unless RQ is 3.x with every internal this module calls."""
    major = int(str(rq.__version__).split(".")[0])
    if major != SUPPORTED_RQ_MAJOR:
        raise UnsupportedRQError(
            f"workers.rq_bridge supports RQ {SUPPORTED_RQ_MAJOR}.x, found {rq.__version__}"
        )
    problems = []
    for owner, required in ((BaseWorker, REQUIRED_WORKER_METHODS), (Queue, REQUIRED_QUEUE_METHODS)):
        for name, params in required.items():
            function = getattr(owner, name, None)
            if function is None:
                problems.append(f"{owner.__name__}.{name} is missing")
            elif _parameters(function)[: len(params)] != params:
                problems.append(
                    f"{owner.__name__}.{name}{_parameters(function)} no longer takes {params}"
                )
    # The stop-job marker is an instance attribute that handle_job_failure reads.
    if "_stopped_job_id" not in inspect.getsource(BaseWorker.handle_job_failure):
        problems.append("BaseWorker.handle_job_failure no longer reads _stopped_job_id")
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
    """Mark a dequeued job `started` exactly as RQ does before performing it; return its execution."""
    execution = worker.prepare_execution(job)
    # A job popped from one queue with LMOVE sits in that queue's intermediate list until started.
    worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
    return execution


def heartbeat(worker: BaseWorker, job: Job, execution: Execution) -> None:
    """Refresh the worker, the execution and the job's started-registry entry."""
    worker.maintain_heartbeats(job, execution)


def finish_success(
    worker: BaseWorker, job: Job, queue: Queue, execution: Execution, value: Any
) -> None:
    """Store `value` as the job's result and run RQ's success path (callbacks, dependents, TTLs)."""
    worker._finalize_success(job, queue, execution, value)


def finish_failure(
    worker: BaseWorker,
    job: Job,
    queue: Queue,
    execution: Execution,
    error: BaseException,
    retry: bool = True,
) -> None:
    """RQ's failure path for `error`: failure callback, handlers, then retry (when `retry` and the
    job has retries left) or the failed-job registry."""
    if not retry:
        job.retries_left = 0  # handle_job_failure retries only while retries_left > 0
    exc_info = (type(error), error, error.__traceback__)
    if error.__traceback__ is None:  # an exception never raised: give RQ a traceback to record
        try:
            raise error
        except BaseException:
            exc_info = sys.exc_info()
    worker._finalize_failure(job, queue, execution, exc_info)


def finish_stopped(
    worker: BaseWorker, job: Job, queue: Queue, execution: Execution, reason: str
) -> None:
    """End a running job on a cancel request as RQ's stop-job command does: status `stopped`,
    failed-job registry, no retry."""
    from rq.callbacks import execute_stopped_callback
    from rq.utils import now

    job.ended_at = now()
    try:
        execute_stopped_callback(job, worker.death_penalty_class)
    except Exception:
        worker.log.exception("stopped callback of job %s raised", job.id)
    worker._stopped_job_id = job.id
    worker.handle_job_failure(job, queue=queue, exc_string=reason, execution=execution)


def set_idle(worker: BaseWorker) -> None:
    """The worker state dashboards show once no job is running."""
    worker.set_state(WorkerStatus.IDLE)


def active_executions(worker: BaseWorker) -> dict[str, Execution]:
    """The worker's executions now in progress, by execution id (RQ 3 keeps several)."""
    return dict(worker.executions)
