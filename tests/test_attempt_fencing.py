"""Fencing by attempt (issue #18 item 5), against real Redis, the worker driven by hand: a job the
recovery sweep handed out again while its first worker was still running it has two executions, an
old (stale) attempt and the current one. Only the current attempt may write the job's progress or
finish it; the stale attempt's writes are dropped (never failing the job), and the worker keys its
running set by (job id, attempt), so the stale attempt's cleanup cannot remove the current one —
even when the same worker runs both."""

from __future__ import annotations

import time
from typing import Any

import pytest
from rq.job import Job, Retry
from rq.results import Result

from ddserve import recovery
from ddserve.job_metrics import job_metrics_key, read_job_metrics
from ddserve.jobs import META_ERROR, META_PROGRESS
from tests import specs
from tests.redis_sandbox import RedisSandbox, status
from tests.worker_support import MODEL, hand_worker, tiny_ddpm_pool
from workers import rq_bridge
from workers.errors import WorkerStopped
from workers.model_pool import ModelPool
from workers.rq_adaptor import WorkerJob
from workers.worker import BatchingWorker, worker_stats_key

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> ModelPool:
    return tiny_ddpm_pool(tmp_path_factory.mktemp("zoo"))


def _worker(box: RedisSandbox, pool: ModelPool, name: str = "w") -> BatchingWorker:
    return hand_worker(box, pool, name, recovery_grace_s=0)


def _take(box: RedisSandbox, worker: BatchingWorker) -> WorkerJob:
    got = rq_bridge.dequeue(worker, [box.queue(MODEL)], None)
    assert got is not None
    ticket = worker.jobs.start(*got)
    assert ticket is not None
    return ticket


def _sweep_while_running(box: RedisSandbox, ticket: WorkerJob) -> None:
    """What a long Redis outage did before the grace period: the started-registry entry of a live
    execution is past its expiry, and a recovery sweep hands the job out again (retry)."""
    registry = ticket.queue.started_job_registry
    box.connection.zadd(registry.key, {ticket.execution.composite_key: time.time() - 10})
    recovery.recover_abandoned(ticket.queue)
    assert status(ticket.job) == "queued"


def _redelivered(box: RedisSandbox, worker: BatchingWorker) -> tuple[WorkerJob, WorkerJob]:
    """One job, two executions in the same worker: `stale` (the first) and `current`."""
    box.enqueue(MODEL, specs.generate(MODEL, n=2, num_inference_steps=10), retry=Retry(max=1))
    stale = _take(box, worker)
    _sweep_while_running(box, stale)
    current = _take(box, worker)
    assert current.id == stale.id
    return stale, current


def _output(ticket: WorkerJob) -> dict[str, Any]:
    return {"images": [{"key": f"{ticket.id}/{i}.png", "seed": i} for i in range(2)]}


def _results(job: Job) -> list[Result]:
    return list(job.results())


def test_each_delivery_of_a_job_gets_the_next_attempt(box: RedisSandbox, pool: ModelPool) -> None:
    worker = _worker(box, pool)
    stale, current = _redelivered(box, worker)
    assert (stale.attempt, current.attempt) == (1, 2)
    assert stale.key != current.key
    stored = box.connection.hget(current.job.key, recovery.ATTEMPT_FIELD)
    assert stored == b"2"
    assert {stale.key, current.key} == set(worker.jobs.held)


def test_a_stale_success_neither_finishes_the_job_nor_forgets_the_current_attempt(
    box: RedisSandbox, pool: ModelPool
) -> None:
    worker = _worker(box, pool)
    stale, current = _redelivered(box, worker)
    stale.progress(10, 10, 2)
    stale.succeed(_output(stale), 2)
    worker.flush_step()
    assert status(current.job) == "started"  # not finished by the stale attempt
    assert current in worker.jobs.held.values()  # the stale one's cleanup left it alone
    assert stale not in worker.jobs.held.values()

    current.progress(10, 10, 2)
    current.succeed(_output(current), 2)
    worker.flush_step()
    assert status(current.job) == "finished"
    results = _results(current.job)
    assert [r.type for r in results] == [Result.Type.SUCCESSFUL]
    assert results[0].execution_id == current.execution.id
    assert worker.jobs.held == {}
    worker.publish_stats()
    stats = box.connection.hgetall(worker_stats_key(box.prefix, worker.name))
    assert int(stats[b"stale_finishes_dropped"]) >= 1  # the metrics hook counted it


def test_a_stale_failure_never_fails_the_job(box: RedisSandbox, pool: ModelPool) -> None:
    worker = _worker(box, pool)
    stale, current = _redelivered(box, worker)
    stale.fail(ValueError("the stale attempt's own trouble"))
    assert status(current.job) == "started"
    assert META_ERROR not in current.job.get_meta(refresh=True)
    assert current in worker.jobs.held.values()

    current.progress(10, 10, 2)
    current.succeed(_output(current), 2)
    worker.flush_step()
    assert status(current.job) == "finished"
    assert [r.type for r in _results(current.job)] == [Result.Type.SUCCESSFUL]


def test_a_stale_cancel_leaves_the_current_attempt_running(
    box: RedisSandbox, pool: ModelPool
) -> None:
    worker = _worker(box, pool)
    stale, current = _redelivered(box, worker)
    stale.cancel()
    assert status(current.job) == "started"
    assert current in worker.jobs.held.values()


def test_a_stale_progress_write_does_not_overwrite_the_current_attempts(
    box: RedisSandbox, pool: ModelPool
) -> None:
    worker = _worker(box, pool)
    stale, current = _redelivered(box, worker)
    current.progress(3, 10, 2)
    stale.progress(9, 10, 2)  # the same round: both wait in the round's buffer
    worker.flush_step()
    meta = Job.fetch(current.id, connection=box.connection).meta
    assert meta[META_PROGRESS] == {"step": 3, "total": 10}
    stale.progress(10, 10, 2)  # a round of its own
    worker.flush_step()
    meta = Job.fetch(current.id, connection=box.connection).meta
    assert meta[META_PROGRESS] == {"step": 3, "total": 10}


def test_the_heartbeat_marks_only_the_stale_attempt_lost(
    box: RedisSandbox, pool: ModelPool
) -> None:
    worker = _worker(box, pool)
    stale, current = _redelivered(box, worker)
    worker.jobs.heartbeat()
    assert stale.lost and not current.lost
    assert worker.feed.canceled([stale, current]) == {stale.key}


def test_a_redelivery_to_another_worker_fences_the_first(
    box: RedisSandbox, pool: ModelPool
) -> None:
    first, second = _worker(box, pool, "a"), _worker(box, pool, "b")
    box.enqueue(MODEL, specs.generate(MODEL, n=2, num_inference_steps=10), retry=Retry(max=1))
    stale = _take(box, first)
    _sweep_while_running(box, stale)
    current = _take(box, second)
    stale.progress(10, 10, 2)
    stale.succeed(_output(stale), 2)
    first.flush_step()
    assert status(current.job) == "started"
    current.progress(10, 10, 2)
    current.succeed(_output(current), 2)
    second.flush_step()
    results = _results(current.job)
    assert [r.worker_name for r in results] == [second.name]


def test_a_workers_maintenance_sweeps_nothing_within_the_recovery_grace(
    box: RedisSandbox, pool: ModelPool
) -> None:
    worker = _worker(box, pool)
    clock = [0.0]
    worker.recovery_grace = recovery.RecoveryGrace(3.0, clock=lambda: clock[0])
    box.enqueue(MODEL, specs.generate(MODEL, n=2, num_inference_steps=10), retry=Retry(max=1))
    ticket = _take(box, worker)
    registry = ticket.queue.started_job_registry
    box.connection.zadd(registry.key, {ticket.execution.composite_key: time.time() - 10})
    worker.clean_registries()  # Redis never seen answering yet (no heartbeat): no sweep
    assert status(ticket.job) == "started"
    worker.recovery_grace.reachable()
    clock[0] = 2.9
    worker.clean_registries()
    assert status(ticket.job) == "started"
    clock[0] = 3.0  # answered for the whole grace, and the entry is still expired: abandoned
    worker.clean_registries()
    assert status(ticket.job) == "queued"


def test_a_stale_executions_leftover_entry_never_ends_the_current_attempt(
    box: RedisSandbox, pool: ModelPool
) -> None:
    """RQ's sweep reads the expired entries, then retries their jobs and removes the entries
    still expired: a heartbeat landing in between (a live worker just back from an outage) keeps
    the old execution's entry, refreshed. Once that worker drops its stale copy the entry expires,
    and the next sweep, keyed by job id, ended the job's current attempt (failed worker_lost: the
    chaos benchmark with --recovery-grace 0 saw it). A sweep drops an expired entry of an
    execution that is not the job's current one, and leaves the job alone."""
    worker = _worker(box, pool)
    stale, current = _redelivered(box, worker)  # retried: no retry left
    registry = stale.queue.started_job_registry
    # The heartbeat of the race kept the stale execution's entry; then it stopped (dropped copy).
    box.connection.zadd(registry.key, {stale.execution.composite_key: time.time() - 10})
    recovery.recover_abandoned(current.queue)
    assert status(current.job) == "started"  # the current attempt runs on
    assert box.connection.zscore(registry.key, stale.execution.composite_key) is None
    assert box.connection.zscore(registry.key, current.execution.composite_key) is not None
    worker.clean_registries()  # a worker's maintenance too
    assert status(current.job) == "started"

    current.progress(10, 10, 2)
    current.succeed(_output(current), 2)
    worker.flush_step()
    assert status(current.job) == "finished"
    assert [r.type for r in _results(current.job)] == [Result.Type.SUCCESSFUL]


# --- failures and cancels are fenced in their transaction, not only by the check before it --------
def _sweep_after_the_check(
    box: RedisSandbox, worker: BatchingWorker, ticket: WorkerJob, moment: str, monkeypatch: Any
) -> None:
    """Make a recovery sweep hand the job out again right after the worker found it still owned
    (`moment` = "owned": between `RQJobs.owned` and the finisher; "watched": between the
    finisher's own check, after its WATCH, and its EXEC)."""
    swept = []

    def sweep() -> None:
        if not swept:
            swept.append(1)
            _sweep_while_running(box, ticket)

    if moment == "owned":
        real_owned = worker.jobs.owned

        def owned_then_swept(held: list[WorkerJob]) -> list[bool]:
            answer = real_owned(held)
            sweep()
            return answer

        monkeypatch.setattr(worker.jobs, "owned", owned_then_swept)
    else:
        real_check = recovery.is_current

        def checked_then_swept(connection: Any, job: Job, attempt: int) -> bool:
            answer = real_check(connection, job, attempt)
            sweep()
            return answer

        monkeypatch.setattr(recovery, "is_current", checked_then_swept)


@pytest.mark.parametrize("moment", ["owned", "watched"])
@pytest.mark.parametrize("how", ["fail", "cancel", "hand back"])
def test_a_failure_or_cancel_raced_by_a_sweep_writes_nothing(
    box: RedisSandbox, pool: ModelPool, monkeypatch: pytest.MonkeyPatch, how: str, moment: str
) -> None:
    """The gap the check before RQ's failure path left: a sweep that retries the job between that
    check and the write. The stale failure (it still had a retry, in its copy of the job), cancel
    or hand-back (a stopping worker's) writes nothing — status, failed-job registry, meta, a second
    copy in the queue, the worker's counters, the outcome counts — and the job's next attempt ends
    normally."""
    worker = _worker(box, pool)
    box.enqueue(MODEL, specs.generate(MODEL, n=2, num_inference_steps=10), retry=Retry(max=1))
    stale = _take(box, worker)
    _sweep_after_the_check(box, worker, stale, moment, monkeypatch)
    if how == "fail":
        stale.fail(RuntimeError("the stale attempt's own trouble"))  # retryable, one retry left
    elif how == "cancel":
        stale.cancel()
    else:
        stale.fail(WorkerStopped())
    job = Job.fetch(stale.id, connection=box.connection)
    assert job.get_status() == "queued"  # as the sweep left it
    assert box.queue(MODEL).get_job_ids() == [job.id]  # once: no retry of the stale failure
    assert job.retries_left == 0  # the sweep's retry used it, the stale failure none
    assert META_ERROR not in job.meta
    assert stale.queue.failed_job_registry.get_job_ids() == []
    assert [r.type for r in _results(job)] == []
    assert box.connection.hget(worker.key, "failed_job_count") is None
    assert worker.jobs.held == {} and worker.jobs.stale_finishes_dropped == 1
    monkeypatch.undo()
    worker.flush_step()
    assert box.connection.hgetall(job_metrics_key(box.prefix, MODEL)) == {}  # nothing counted

    current = _take(box, worker)
    assert current.attempt == 2
    assert box.queue(MODEL).get_job_ids() == []  # the only copy was taken
    if how == "fail":
        current.fail(RuntimeError("the current attempt's trouble"))  # no retry left: failed
    else:
        current.cancel()
    job = Job.fetch(current.id, connection=box.connection)
    assert job.get_status() == ("failed" if how == "fail" else "stopped")
    assert current.queue.failed_job_registry.get_job_ids() == [job.id]
    assert [r.type for r in _results(job)] == [Result.Type.FAILED]
    assert _results(job)[0].execution_id == current.execution.id
    assert (META_ERROR in job.meta) == (how == "fail")
    assert box.queue(MODEL).get_job_ids() == []
    assert int(box.connection.hget(worker.key, "failed_job_count")) == 1
    worker.flush_step()
    outcomes = read_job_metrics(box.connection.hgetall(job_metrics_key(box.prefix, MODEL)))
    assert outcomes.outcomes == {"failed" if how == "fail" else "canceled": 1}


def test_a_failure_with_retries_left_is_queued_again_exactly_once(
    box: RedisSandbox, pool: ModelPool
) -> None:
    worker = _worker(box, pool)
    box.enqueue(MODEL, specs.generate(MODEL, n=2, num_inference_steps=10), retry=Retry(max=2))
    for attempt, left in ((1, 1), (2, 0)):
        ticket = _take(box, worker)
        assert ticket.attempt == attempt
        ticket.fail(RuntimeError("device lost"))
        job = Job.fetch(ticket.id, connection=box.connection)
        assert job.get_status() == "queued"
        assert box.queue(MODEL).get_job_ids() == [job.id]
        assert job.retries_left == left
        assert META_ERROR not in job.meta
        assert ticket.queue.failed_job_registry.get_job_ids() == []
    assert worker.jobs.held == {} and worker.jobs.stale_finishes_dropped == 0
    worker.flush_step()
    metrics = read_job_metrics(box.connection.hgetall(job_metrics_key(box.prefix, MODEL)))
    assert metrics.outcomes == {"retried": 2}
