"""workers.rq_bridge: every RQ internal the batching worker calls exists with the expected
parameters (these tests fail loudly on an RQ upgrade that changes them), and each finisher leaves a
job exactly as RQ's own worker leaves it — several jobs started at once, as a batch is."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from redis import Redis
from rq.job import Job, Retry
from rq.queue import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.utils import now
from rq.worker import BaseWorker, SimpleWorker

from ddserve.jobs import JobStatus, public_status
from ddserve.recovery import ATTEMPT_FIELD, EXECUTION_FIELD
from tests.redis_sandbox import RedisSandbox
from tests.worker_support import simple_worker, start_next
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


def test_batch_of_jobs_started_together_and_finished_one_by_one(box: RedisSandbox) -> None:
    worker = simple_worker(box, "m")
    jobs = [box.enqueue("m", {"i": i}) for i in range(3)]
    taken = [start_next(box, worker, "m") for _ in jobs]
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
    worker = simple_worker(box, "m")
    job = box.enqueue("m", {}, retry=Retry(max=1))
    _, queue, execution = start_next(box, worker, "m")
    rq_bridge.finish_failure(worker, job, queue, execution, RuntimeError("device lost"))
    assert job.get_status(refresh=True) == "queued"  # back in the queue, one retry used
    assert box.queue("m").get_job_ids() == [job.id]
    job, queue, execution = start_next(box, worker, "m")
    rq_bridge.finish_failure(worker, job, queue, execution, RuntimeError("device lost again"))
    job.refresh()
    assert job.get_status() == "failed"
    assert "device lost again" in (job.latest_result().exc_string or "")
    assert FailedJobRegistry(queue=box.queue("m")).get_job_ids() == [job.id]


def test_failure_without_retry_fails_at_once(box: RedisSandbox) -> None:
    worker = simple_worker(box, "m")
    job = box.enqueue("m", {}, retry=Retry(max=3))
    _, queue, execution = start_next(box, worker, "m")
    rq_bridge.finish_failure(worker, job, queue, execution, ValueError("bad"), retry=False)
    assert job.get_status(refresh=True) == "failed"
    assert box.queue("m").count == 0


def test_stop_ends_a_running_job_as_canceled_without_retry(box: RedisSandbox) -> None:
    worker = simple_worker(box, "m")
    job = box.enqueue("m", {}, retry=Retry(max=2))
    _, queue, execution = start_next(box, worker, "m")
    rq_bridge.finish_stopped(worker, job, queue, execution, "Job canceled by request.")
    assert job.get_status(refresh=True) == "stopped"
    assert public_status("stopped") == JobStatus.CANCELED
    assert box.queue("m").count == 0
    assert StartedJobRegistry(queue=box.queue("m")).get_job_ids() == []
    assert worker._stopped_job_id is None  # RQ cleared its single stop marker


# --- the merged start and the batched success write what RQ's own paths write ---------------------
_HEX_ID = re.compile(r"[0-9a-f]{32}")
_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT[\d:.]+Z?|\d+\.\d+(e-?\d+)?)$")


def _state(connection: Redis, job: Job, worker: SimpleWorker, prefix: str) -> dict[str, Any]:
    """Every key that concerns `job` and `worker`, with ids and times masked: two jobs started (or
    finished) the same way by two workers have equal states."""
    names = {job.id: "<job>", worker.name: "<worker>"}

    def norm(raw: bytes | str) -> str:
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        for name, mask in names.items():
            text = text.replace(name, mask)
        text = _HEX_ID.sub("<id>", text)
        return "<time>" if _TIMESTAMP.match(text) else text

    def mine(member: bytes) -> bool:
        return any(name.encode() in member for name in names)

    keys: set[bytes] = set()
    for pattern in (f"*{job.id}*", f"*{worker.name}*", f"*{prefix}*"):
        keys.update(connection.scan_iter(match=pattern, count=1000))
    state: dict[str, Any] = {}
    for key in keys:
        if key.startswith(b"rq:worker:") and worker.name.encode() not in key:
            continue  # another worker's own keys
        kind = connection.type(key).decode()
        if kind == "hash":
            value: Any = {norm(f): norm(v) for f, v in connection.hgetall(key).items()}
            value.pop("created_at", None), value.pop("enqueued_at", None)
        elif kind == "zset":
            value = sorted(norm(m) for m in connection.zrange(key, 0, -1) if mine(m))
        elif kind == "set":
            value = sorted(norm(m) for m in connection.smembers(key) if mine(m))
        elif kind == "list":
            value = [norm(m) for m in connection.lrange(key, 0, -1) if mine(m)]
        elif kind == "stream":
            value = [
                {norm(f): norm(v) for f, v in fields.items()}
                for _, fields in connection.xrange(key)
            ]
        else:
            value = kind
        ttl = connection.ttl(key)
        state[norm(key)] = (kind, value, "persistent" if ttl == -1 else "expiring")
    return state


def _dequeued(box: RedisSandbox, worker: SimpleWorker) -> tuple[Job, Queue]:
    got = rq_bridge.dequeue(worker, [box.queue("m")], None)
    assert got is not None
    return got


def test_the_merged_start_writes_what_rqs_two_calls_write(box: RedisSandbox) -> None:
    rq_worker, our_worker = simple_worker(box, "m", "rq"), simple_worker(box, "m", "ours")
    box.enqueue("m", {"i": 1}, result_ttl=600)
    box.enqueue("m", {"i": 1}, result_ttl=600)
    by_rq, _ = _dequeued(box, rq_worker)
    rq_worker.prepare_execution(by_rq)
    rq_worker.prepare_job_execution(by_rq, remove_from_intermediate_queue=True)
    by_us, _ = _dequeued(box, our_worker)
    execution, attempt = rq_bridge.start_attempt(our_worker, by_us)
    assert rq_bridge.active_executions(our_worker) == {execution.id: execution}
    theirs = _state(box.connection, by_rq, rq_worker, box.prefix)
    ours = _state(box.connection, by_us, our_worker, box.prefix)
    # and two more fields: the job's first attempt and its execution (`ddserve.recovery`, fencing)
    assert attempt == 1 and ours["rq:job:<job>"][1].pop(ATTEMPT_FIELD) == "1"
    assert ours["rq:job:<job>"][1].pop(EXECUTION_FIELD) == "<id>"
    assert ours == theirs
    assert any("execution" in key for key in ours)  # the state compared is not empty


def test_a_batched_success_writes_what_rqs_success_path_writes(box: RedisSandbox) -> None:
    rq_worker, our_worker = simple_worker(box, "m", "rq"), simple_worker(box, "m", "ours")
    for _ in range(2):
        box.enqueue("m", {"i": 1}, result_ttl=600)
    by_rq, queue = _dequeued(box, rq_worker)
    rq_execution = rq_bridge.mark_started(rq_worker, by_rq)
    by_us, _ = _dequeued(box, our_worker)
    our_execution = rq_bridge.mark_started(our_worker, by_us)
    rq_bridge.finish_success(rq_worker, by_rq, queue, rq_execution, {"images": [1]})
    succeeded = rq_bridge.Succeeded(by_us, queue, our_execution, {"images": [1]})
    rq_bridge.finish_successes(our_worker, [succeeded])
    theirs = _state(box.connection, by_rq, rq_worker, box.prefix)
    ours = _state(box.connection, by_us, our_worker, box.prefix)
    assert ours == theirs
    assert by_us.get_status(refresh=True) == "finished"
    assert by_us.return_value(refresh=True) == {"images": [1]}
    assert rq_bridge.active_executions(our_worker) == {}


def test_a_step_of_successes_with_their_meta_costs_three_round_trips(
    box: RedisSandbox, round_trips: list[int]
) -> None:
    worker = simple_worker(box, "m")
    jobs = [box.enqueue("m", {"i": i}) for i in range(4)]
    items = []
    for _ in jobs:
        job, queue, execution = start_next(box, worker, "m")
        job.meta["progress"] = {"step": 5, "total": 5}
        items.append(rq_bridge.Succeeded(job, queue, execution, {"i": job.kwargs["request"]}))

    def meta_and_more(pipe: Any, finished: Any) -> None:
        for item in items:
            rq_bridge.save_meta(item.job, pipe)
        pipe.incr(f"{box.prefix}:finished-steps")

    round_trips[0] = 0
    rq_bridge.finish_successes(worker, items, meta_and_more)
    assert round_trips[0] == 3  # WATCH, the check (dependents sets, attempts), MULTI/EXEC
    for job in jobs:
        assert job.get_status(refresh=True) == "finished"
        assert job.get_meta(refresh=True)["progress"] == {"step": 5, "total": 5}
        assert job.return_value(refresh=True) == {"i": job.kwargs["request"]}
    assert box.connection.get(f"{box.prefix}:finished-steps") == b"1"
    assert int(box.connection.hget(worker.key, "successful_job_count")) == 4
    assert StartedJobRegistry(queue=box.queue("m")).get_job_ids() == []


def remember_success(job: Job, connection: Redis, result: Any) -> None:
    """A success callback (RQ imports it by name)."""
    connection.set(f"{job.origin}:callback:{job.id}", "ran")


def test_dependents_and_callbacks_take_rqs_own_success_path(box: RedisSandbox) -> None:
    from rq import Callback

    worker = simple_worker(box, "m")
    plain = box.enqueue("m", {"i": 0})
    parent = box.enqueue("m", {"i": 1})
    called = box.enqueue("m", {"i": 2}, on_success=Callback(remember_success))
    taken = [start_next(box, worker, "m") for _ in range(3)]
    child = box.enqueue("m", {"i": 3}, depends_on=parent)  # added while its parent runs
    assert child.get_status(refresh=True) == "deferred"
    rq_bridge.finish_successes(
        worker, [rq_bridge.Succeeded(job, queue, ex, "ok") for job, queue, ex in taken]
    )
    for job in (plain, parent, called):
        assert job.get_status(refresh=True) == "finished"
    assert child.get_status(refresh=True) == "queued"  # RQ enqueued the dependent
    assert box.queue("m").get_job_ids() == [child.id]
    assert box.connection.get(f"{called.origin}:callback:{called.id}") == b"ran"


# --- failures and stops: RQ's writes, in one transaction fenced by the job's attempt --------------
def _raised(message: str) -> RuntimeError:
    """An exception with a traceback, to give both failure paths the same exc_string."""
    try:
        raise RuntimeError(message)
    except RuntimeError as error:
        return error


def _rq_ends(
    worker: SimpleWorker, job: Job, queue: Queue, execution: Any, how: str, error: BaseException
) -> None:
    """RQ's own path: `_finalize_failure` for a failure; for a stop, what RQ's stop-job path does
    (the stop marker, then `handle_job_failure`), the job's end time set as ours sets it."""
    if how == "stopped":
        job.ended_at = now()
        worker._stopped_job_id = job.id
        worker.handle_job_failure(job, queue=queue, exc_string=str(error), execution=execution)
    else:
        worker._finalize_failure(job, queue, execution, (type(error), error, error.__traceback__))


def _our_end(
    worker: SimpleWorker,
    job: Job,
    queue: Queue,
    execution: Any,
    how: str,
    error: BaseException,
    attempt: int | None,
    extra: Any = None,
) -> bool:
    if how == "stopped":
        return rq_bridge.finish_stopped(
            worker, job, queue, execution, str(error), attempt=attempt, extra=extra
        )
    return rq_bridge.finish_failure(
        worker, job, queue, execution, error, attempt=attempt, extra=extra
    )


_RETRIES = {"failed": None, "retried": Retry(max=2), "scheduled": Retry(max=1, interval=600)}


@pytest.mark.parametrize("how", ["failed", "retried", "scheduled", "stopped"])
def test_a_fenced_failure_writes_what_rqs_failure_path_writes(box: RedisSandbox, how: str) -> None:
    """Status, failed-job registry, failure result (exc_string), retry (queued again, or scheduled
    after its interval), worker counters and the execution's cleanup: the same keys, the same
    values, as RQ's own path leaves on a twin job."""
    rq_worker, our_worker = simple_worker(box, "m", "rq"), simple_worker(box, "m", "ours")
    for _ in range(2):
        box.enqueue("m", {"i": 1}, result_ttl=600, retry=_RETRIES.get(how, Retry(max=2)))
    by_rq, queue = _dequeued(box, rq_worker)
    rq_execution = rq_bridge.mark_started(rq_worker, by_rq)
    by_us, _ = _dequeued(box, our_worker)
    our_execution, attempt = rq_bridge.start_attempt(our_worker, by_us)
    error = _raised("device lost")
    _rq_ends(rq_worker, by_rq, queue, rq_execution, how, error)
    assert _our_end(our_worker, by_us, queue, our_execution, how, error, attempt)
    theirs = _state(box.connection, by_rq, rq_worker, box.prefix)
    ours = _state(box.connection, by_us, our_worker, box.prefix)
    assert ours == theirs
    expected = {"failed": "failed", "retried": "queued", "scheduled": "scheduled"}
    assert by_us.get_status(refresh=True) == expected.get(how, how)
    assert by_rq.get_status(refresh=True) == expected.get(how, how)
    assert rq_bridge.active_executions(our_worker) == {}
    assert ours["rq:worker:<worker>"][1]["failed_job_count"] == "1"
    ended = how in ("failed", "stopped")
    assert (by_us.id in FailedJobRegistry(queue=queue).get_job_ids()) == ended
    if ended:
        assert "device lost" in (by_us.latest_result().exc_string or "")
    assert box.queue("m").get_job_ids() == (
        [] if ended or how == "scheduled" else [by_rq.id, by_us.id]
    )


@pytest.mark.parametrize("how", ["failed", "stopped"])
def test_a_failure_whose_job_is_taken_after_its_check_writes_nothing(
    box: RedisSandbox, how: str
) -> None:
    """The race the fence closes: the job is checked (still `started` in this attempt), then a
    recovery sweep retries it before the failure's EXEC. The EXEC aborts, the check runs again
    and finds the job handed out again: the stale failure writes nothing — no status, no
    failed-job registry, no retry (a duplicate in the queue), no counter."""
    worker = simple_worker(box, "m")
    job = box.enqueue("m", {"i": 1}, retry=Retry(max=2))
    _, queue, execution = start_next(box, worker, "m")
    attempt = int(box.connection.hget(job.key, ATTEMPT_FIELD))
    calls = []

    def sweep_meanwhile(pipe: Any) -> None:  # runs inside MULTI, after the WATCH and the check
        calls.append(1)
        if len(calls) == 1:
            box.connection.hset(job.key, "status", "queued")  # what the sweep's retry writes
            box.connection.rpush(queue.key, job.id)

    assert not _our_end(worker, job, queue, execution, how, _raised("x"), attempt, sweep_meanwhile)
    assert len(calls) == 1  # the second check found it stale: no second write attempted
    assert job.get_status(refresh=True) == "queued"
    assert box.queue("m").get_job_ids() == [job.id]  # queued once: the sweep's, no retry of ours
    assert FailedJobRegistry(queue=queue).get_job_ids() == []
    assert list(job.results()) == []
    assert box.connection.hget(worker.key, "failed_job_count") is None
    assert int(box.connection.hget(job.key, "retries_left")) == 2
    assert job.retries_left == 2 or how == "stopped"  # memory as before the aborted EXEC


def test_a_retry_repeated_after_an_aborted_exec_is_queued_once(box: RedisSandbox) -> None:
    """A write that touches the job between the check and the EXEC (not a new attempt: a progress
    write, say) aborts the EXEC; the failure is written again, from the job as it was: one retry
    used, the job queued once."""
    worker = simple_worker(box, "m")
    job = box.enqueue("m", {"i": 1}, retry=Retry(max=2))
    _, queue, execution = start_next(box, worker, "m")
    attempt = int(box.connection.hget(job.key, ATTEMPT_FIELD))
    calls = []

    def touch_meanwhile(pipe: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            box.connection.hset(job.key, "unrelated", "1")

    assert rq_bridge.finish_failure(
        worker, job, queue, execution, _raised("x"), attempt=attempt, extra=touch_meanwhile
    )
    assert len(calls) == 2
    assert job.get_status(refresh=True) == "queued"
    assert box.queue("m").get_job_ids() == [job.id]
    assert int(box.connection.hget(job.key, "retries_left")) == 1 == job.retries_left
    assert int(box.connection.hget(worker.key, "failed_job_count")) == 1


def test_a_failure_of_a_later_attempt_writes_nothing(box: RedisSandbox) -> None:
    """The job was handed out again and started by another worker: the first attempt's failure
    finds another attempt at its check."""
    first, second = simple_worker(box, "m", "a"), simple_worker(box, "m", "b")
    job = box.enqueue("m", {"i": 1}, retry=Retry(max=2))
    _, queue, stale = start_next(box, first, "m")
    box.connection.hset(job.key, "status", "queued")  # the sweep's retry, in short
    box.connection.rpush(queue.key, job.id)
    current_job, _, current = start_next(box, second, "m")
    assert not rq_bridge.finish_failure(first, job, queue, stale, _raised("x"), attempt=1)
    assert not rq_bridge.finish_stopped(first, job, queue, stale, "stop", attempt=1)
    assert current_job.get_status(refresh=True) == "started"
    assert FailedJobRegistry(queue=queue).get_job_ids() == []
    assert rq_bridge.finish_failure(second, current_job, queue, current, _raised("y"), attempt=2)
    assert current_job.get_status(refresh=True) == "queued"  # its own retry: one of two used
    assert box.queue("m").get_job_ids() == [job.id]


def test_a_failure_enqueues_the_dependents_rq_enqueues(box: RedisSandbox) -> None:
    """After the failure commits, RQ's `_enqueue_dependents_safely`: a dependent that allows its
    dependency to fail is queued, one that does not stays deferred; a stopped job's dependents
    all stay deferred (RQ treats a stop as a cancel)."""
    from rq.job import Dependency

    worker = simple_worker(box, "m")
    parents = [box.enqueue("m", {"i": i}) for i in range(2)]
    (failed, queue, execution), (stopped, _, stopped_execution) = [
        start_next(box, worker, "m") for _ in parents
    ]
    children = {}
    for parent in parents:
        tolerant = box.enqueue("m", {"c": 1}, depends_on=Dependency([parent], allow_failure=True))
        strict = box.enqueue("m", {"c": 2}, depends_on=parent)
        children[parent.id] = (tolerant, strict)
    assert rq_bridge.finish_failure(worker, failed, queue, execution, _raised("x"), attempt=1)
    assert rq_bridge.finish_stopped(worker, stopped, queue, stopped_execution, "stop", attempt=1)
    statuses = {
        parent: [child.get_status(refresh=True) for child in pair]
        for parent, pair in children.items()
    }
    assert statuses == {failed.id: ["queued", "deferred"], stopped.id: ["deferred", "deferred"]}
    assert box.queue("m").get_job_ids() == [children[failed.id][0].id]


def handle_job_failure_that_saves_more(self: BaseWorker, job: Job, queue: Queue) -> None:
    """An RQ whose failure path writes one more thing."""
    with self.connection.pipeline() as pipeline:
        job.set_status("failed", pipeline=pipeline)
        job.save(pipeline=pipeline)
        pipeline.execute()


def test_a_changed_failure_path_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BaseWorker, "handle_job_failure", handle_job_failure_that_saves_more)
    with pytest.raises(
        rq_bridge.UnsupportedRQError, match=r"handle_job_failure now calls \['save'\]"
    ):
        rq_bridge.check_rq_internals()


def test_the_fence_costs_one_round_trip_more_than_rqs_failure_path(
    box: RedisSandbox, round_trips: list[int]
) -> None:
    """WATCH and the check add two round trips; the failure's heartbeat, which RQ sends on its
    own, rides in the transaction (one less)."""
    costs = {}
    for path in ("rq", "ours"):
        worker = simple_worker(box, "m", path)
        box.enqueue("m", {"i": 0})
        job, queue, execution = start_next(box, worker, "m")
        error = _raised("x")
        round_trips[0] = 0
        if path == "rq":
            worker._finalize_failure(
                job, queue, execution, (type(error), error, error.__traceback__)
            )
        else:
            rq_bridge.finish_failure(worker, job, queue, execution, error, attempt=1)
        costs[path] = round_trips[0]
        assert job.get_status(refresh=True) == "failed"
    assert costs["ours"] == costs["rq"] + 1, costs
