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
