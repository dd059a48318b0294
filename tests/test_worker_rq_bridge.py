"""workers.rq_bridge: every RQ internal the batching worker calls exists with the expected
parameters (these tests fail loudly on an RQ upgrade that changes them), and each finisher leaves a
job exactly as RQ's own worker leaves it — several jobs started at once, as a batch is."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from rq.executions import Execution
from rq.job import Job, Retry
from rq.queue import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.worker import BaseWorker, SimpleWorker

from ddserve.jobs import JobStatus, public_status
from tests.redis_sandbox import RedisSandbox, sandbox
from workers import rq_bridge

pytestmark = pytest.mark.redis


def test_installed_rq_has_every_internal_we_call() -> None:
    rq_bridge.check_rq_internals()


def test_a_missing_internal_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(BaseWorker, "_finalize_success")
    with pytest.raises(rq_bridge.UnsupportedRQError, match="_finalize_success is missing"):
        rq_bridge.check_rq_internals()


def test_a_changed_signature_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    def finalize_failure(self: BaseWorker, job: object, queue: object, exc_info: object) -> None:
        raise AssertionError("never called")

    monkeypatch.setattr(BaseWorker, "_finalize_failure", finalize_failure)
    with pytest.raises(rq_bridge.UnsupportedRQError, match="_finalize_failure"):
        rq_bridge.check_rq_internals()


def test_another_major_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rq_bridge.rq, "__version__", "4.0.0")
    with pytest.raises(rq_bridge.UnsupportedRQError, match=r"4\.0\.0"):
        rq_bridge.check_rq_internals()


@pytest.fixture
def box() -> Iterator[RedisSandbox]:
    with sandbox() as b:
        yield b


def _worker(box: RedisSandbox) -> SimpleWorker:
    worker = SimpleWorker([box.queue("m")], connection=box.connection, name=f"{box.prefix}-w")
    box.worker_names.append(worker.name)
    return worker


def _take(box: RedisSandbox, worker: SimpleWorker) -> tuple[Job, Queue, Execution]:
    got = rq_bridge.dequeue(worker, [box.queue("m")], None)
    assert got is not None
    job, queue = got
    return job, queue, rq_bridge.mark_started(worker, job)


def test_batch_of_jobs_started_together_and_finished_one_by_one(box: RedisSandbox) -> None:
    worker = _worker(box)
    jobs = [box.enqueue("m", {"i": i}) for i in range(3)]
    taken = [_take(box, worker) for _ in jobs]
    assert rq_bridge.dequeue(worker, [box.queue("m")], None) is None  # non-blocking when empty
    started = StartedJobRegistry(queue=box.queue("m"))
    assert sorted(started.get_job_ids()) == sorted(j.id for j in jobs)
    assert len(rq_bridge.active_executions(worker)) == 3
    for job, _, _ in taken:
        assert public_status(job.get_status(refresh=True)) == JobStatus.RUNNING
        assert job.started_at is not None
        assert box.connection.llen(box.queue("m").intermediate_queue_key) == 0

    before = started.connection.zscore(started.key, taken[0][2].composite_key)
    time.sleep(1.1)
    rq_bridge.heartbeat(worker, taken[0][0], taken[0][2])
    after = started.connection.zscore(started.key, taken[0][2].composite_key)
    assert after > before  # the started-registry entry was refreshed

    for index, (job, queue, execution) in enumerate(taken):
        rq_bridge.finish_success(worker, job, queue, execution, {"value": index})
    for index, job in enumerate(jobs):
        job.refresh()
        assert job.get_status() == "finished"
        assert job.return_value() == {"value": index}
    assert sorted(FinishedJobRegistry(queue=box.queue("m")).get_job_ids()) == sorted(
        j.id for j in jobs
    )
    assert started.get_job_ids() == []
    assert rq_bridge.active_executions(worker) == {}
    assert int(box.connection.hget(worker.key, "successful_job_count")) == 3


def test_failure_is_retried_as_rq_retries(box: RedisSandbox) -> None:
    worker = _worker(box)
    job = box.enqueue("m", {}, retry=Retry(max=1))
    _, queue, execution = _take(box, worker)
    rq_bridge.finish_failure(worker, job, queue, execution, RuntimeError("device lost"))
    assert job.get_status(refresh=True) == "queued"  # back in the queue, one retry used
    assert box.queue("m").get_job_ids() == [job.id]
    job, queue, execution = _take(box, worker)
    rq_bridge.finish_failure(worker, job, queue, execution, RuntimeError("device lost again"))
    job.refresh()
    assert job.get_status() == "failed"
    assert "device lost again" in (job.latest_result().exc_string or "")
    assert FailedJobRegistry(queue=box.queue("m")).get_job_ids() == [job.id]


def test_failure_without_retry_fails_at_once(box: RedisSandbox) -> None:
    worker = _worker(box)
    job = box.enqueue("m", {}, retry=Retry(max=3))
    _, queue, execution = _take(box, worker)
    rq_bridge.finish_failure(worker, job, queue, execution, ValueError("bad"), retry=False)
    assert job.get_status(refresh=True) == "failed"
    assert box.queue("m").count == 0


def test_stop_ends_a_running_job_as_canceled_without_retry(box: RedisSandbox) -> None:
    worker = _worker(box)
    job = box.enqueue("m", {}, retry=Retry(max=2))
    _, queue, execution = _take(box, worker)
    rq_bridge.finish_stopped(worker, job, queue, execution, "Job canceled by request.")
    assert job.get_status(refresh=True) == "stopped"
    assert public_status("stopped") == JobStatus.CANCELED
    assert box.queue("m").count == 0
    assert StartedJobRegistry(queue=box.queue("m")).get_job_ids() == []
    assert worker._stopped_job_id is None  # RQ cleared its single stop marker
