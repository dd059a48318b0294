"""Held `Prefer: wait` requests wake on job-finished notifications (`service.waiter`,
`ddserve.notifications`): from a worker's success, failure and stop, the recovery sweeps, and the
gateway's cancel; a lost notification is caught by the safety poll, and the subscription survives
its connection being killed and Redis restarting. Real Redis at 127.0.0.1:6379 under a test prefix
(fakeredis has no CLIENT KILL), a private redis-server for the restart, fakeredis for the embedded
mode.

The safety poll is set to 30 s wherever a test times the answer, so that only a notification can
answer within the 1 s these tests allow."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import SimpleWorker
from rq.job import Job
from rq.registry import StartedJobRegistry

from ddserve import recovery
from ddserve.notifications import JobEvent, channel, decode_message, encode_message
from ddserve.settings import Settings
from service.app import connect, create_app
from tests.gateway_support import make_app, write_config_zoo
from tests.redis_sandbox import REDIS_URL, RedisSandbox, wait_until
from tests.redis_server import RedisServer
from tests.worker_support import MODEL, simple_worker, start_next
from workers import rq_bridge

GEN = {"model": "tiny-ddpm", "class_label": 1, "seed": 1}
ANSWER_WITHIN_S = 1.0


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_zoo(tmp_path_factory.mktemp("zoo"))


@contextmanager
def gateway(box: RedisSandbox, zoo: Path, tmp: Path, poll_s: float = 30.0) -> Iterator[TestClient]:
    """A gateway on the real Redis under the box's prefix, its waiter subscribed."""
    settings = Settings(
        zoo_dir=zoo,
        storage_dir=tmp / "images",
        auth_enabled=False,
        signing_secret="test-secret",
        key_prefix=box.prefix,
        redis_url=REDIS_URL,
        max_retries=0,
        wait_poll_s=poll_s,
    )
    app = create_app(settings, Redis.from_url(REDIS_URL))
    with TestClient(app) as client:
        wait_until(lambda: app.state.ddserve.waiter.subscribed, 10)
        yield client


@dataclass
class Held:
    """A `POST /generate` with `Prefer: wait` running in a thread, and when it was answered."""

    client: TestClient
    wait_s: float = 30.0
    response: Any = None
    answered_at: float | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._post, daemon=True)
        self.thread.start()

    def _post(self) -> None:
        self.response = self.client.post(
            "/generate", json=GEN, headers={"Prefer": f"wait={self.wait_s:g}"}
        )
        self.answered_at = time.monotonic()

    def answer(self, timeout_s: float = 60.0) -> Any:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the held request was never answered"
        return self.response


def hold(client: TestClient, box: RedisSandbox, count: int = 1) -> tuple[list[Held], list[str]]:
    """`count` held requests, each on its own job; returns once the waiter holds all of them."""
    waiter = client.app.state.ddserve.waiter
    queue = box.queue("tiny-ddpm")
    before = waiter.held
    held = [Held(client) for _ in range(count)]
    wait_until(lambda: waiter.held == before + count, 20)
    ids = [raw.decode() for raw in box.connection.lrange(queue.key, 0, -1)]
    assert len(ids) >= count
    box.job_ids.extend(ids)
    return held, ids


def answered_after_finish(held: Held, finish: Callable[[], None]) -> tuple[Any, float]:
    """Run `finish`, then wait for the held request; (its response, seconds from the end of the
    finish to the answer)."""
    finish()
    finished_at = time.monotonic()
    response = held.answer()
    assert held.answered_at is not None
    return response, held.answered_at - finished_at


def answered_after_success(
    box: RedisSandbox, worker: SimpleWorker, held: Held
) -> tuple[Any, float]:
    """`worker` takes the next job and succeeds it as the batching worker does
    (`finish_successes`, whose transaction publishes the finish); then as `answered_after_finish`."""
    job, queue, execution = start_next(box, worker, MODEL)
    item = rq_bridge.Succeeded(job, queue, execution, {"images": []})
    return answered_after_finish(held, lambda: rq_bridge.finish_successes(worker, [item]))


# --- notifications -----------------------------------------------------------------------------


def test_message_format() -> None:
    assert channel("ddserve", JobEvent.FINISHED) == "ddserve:events:finished"
    assert decode_message(encode_message("job-1").encode()).job_id == "job-1"
    message = decode_message(encode_message("job-2", {"step": 3, "total": 10}))
    assert message.job_id == "job-2" and message.data == {"step": 3, "total": 10}


@pytest.mark.redis
@pytest.mark.parametrize("end", ["succeeded", "failed", "canceled"])
def test_a_worker_ending_the_job_answers_the_held_wait(
    box: RedisSandbox, zoo: Path, tmp_path: Path, end: str
) -> None:
    with gateway(box, zoo, tmp_path) as client:
        (held,), _ = hold(client, box)
        worker = simple_worker(box, MODEL)
        job, queue, execution = start_next(box, worker, MODEL)

        def finish() -> None:
            if end == "succeeded":
                item = rq_bridge.Succeeded(job, queue, execution, {"images": []})
                rq_bridge.finish_successes(worker, [item])
            elif end == "failed":
                error = RuntimeError("device lost")
                rq_bridge.finish_failure(worker, job, queue, execution, error, retry=False)
            else:
                rq_bridge.finish_stopped(worker, job, queue, execution, "Job canceled by request.")

        response, delay = answered_after_finish(held, finish)
    assert response.status_code == 200 and response.json()["status"] == end
    assert delay < ANSWER_WITHIN_S


@pytest.mark.redis
def test_a_retried_failure_does_not_wake_the_held_wait(
    box: RedisSandbox, zoo: Path, tmp_path: Path
) -> None:
    """A failure RQ retries queues the job again: no notification, the request stays held."""
    with gateway(box, zoo, tmp_path) as client:
        (held,), (job_id,) = hold(client, box)
        worker = simple_worker(box, MODEL)
        job, queue, execution = start_next(box, worker, MODEL)
        job.retries_left = 1  # as RQ's Retry(max=1) sets it
        rq_bridge.finish_failure(worker, job, queue, execution, RuntimeError("device lost"))
        assert Job.fetch(job_id, connection=box.connection).get_status() == "queued"
        time.sleep(0.5)
        assert held.thread.is_alive()  # still held
        response, delay = answered_after_success(box, worker, held)
    assert response.status_code == 200 and response.json()["status"] == "succeeded"
    assert delay < ANSWER_WITHIN_S


@pytest.mark.redis
@pytest.mark.parametrize("sweep", ["janitor", "worker_maintenance"])
def test_the_recovery_sweep_failing_a_lost_job_answers_the_held_wait(
    box: RedisSandbox, zoo: Path, tmp_path: Path, sweep: str
) -> None:
    with gateway(box, zoo, tmp_path) as client:
        (held,), _ = hold(client, box)
        worker = simple_worker(box, MODEL)
        _, queue, execution = start_next(box, worker, MODEL)
        registry = StartedJobRegistry(queue=queue)  # the worker died: its heartbeat expired
        box.connection.zadd(registry.key, {execution.composite_key: time.time() - 100})

        def finish() -> None:
            if sweep == "janitor":
                recovery.recover_abandoned(queue)
            else:
                recovery.clean_queue(worker, queue)

        response, delay = answered_after_finish(held, finish)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "failed"
    assert body["error"]["code"] == recovery.WORKER_LOST_CODE
    assert delay < ANSWER_WITHIN_S


@pytest.mark.redis
def test_an_expired_job_answers_the_held_wait(box: RedisSandbox, zoo: Path, tmp_path: Path) -> None:
    with gateway(box, zoo, tmp_path) as client:
        (held,), _ = hold(client, box)
        queue = box.queue("tiny-ddpm")
        time.sleep(0.05)
        response, delay = answered_after_finish(held, lambda: recovery.fail_expired(queue, 0.01))
    body = response.json()
    assert response.status_code == 200 and body["status"] == "failed"
    assert body["error"]["code"] == recovery.EXPIRED_CODE
    assert delay < ANSWER_WITHIN_S


@pytest.mark.redis
def test_cancel_of_a_queued_job_answers_the_held_wait(
    box: RedisSandbox, zoo: Path, tmp_path: Path
) -> None:
    with gateway(box, zoo, tmp_path) as client:
        (held,), (job_id,) = hold(client, box)
        response, delay = answered_after_finish(
            held, lambda: client.post(f"/jobs/{job_id}/cancel").raise_for_status()
        )
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    assert delay < ANSWER_WITHIN_S


def test_embedded_mode_notifications_on_fakeredis(zoo: Path, tmp_path: Path) -> None:
    """The embedded mode's fakeredis server carries the notifications too (FakeAsyncRedis)."""
    app, _ = make_app(zoo, tmp_path, wait_poll_s=30.0)
    waiter = app.state.ddserve.waiter
    with TestClient(app) as client:
        wait_until(lambda: waiter.subscribed, 10)
        held = Held(client)
        wait_until(lambda: waiter.held == 1, 10)
        conn = app.state.ddserve.connection
        job_id = conn.lindex("rq:queue:gwtest:tiny-ddpm", 0).decode()
        response, delay = answered_after_finish(
            held, lambda: client.post(f"/jobs/{job_id}/cancel").raise_for_status()
        )
    assert response.json()["status"] == "canceled" and delay < ANSWER_WITHIN_S


# --- without notifications ---------------------------------------------------------------------


def test_the_safety_poll_reads_many_statuses_at_once() -> None:
    """`JobStore.statuses`: one round trip of Lua chunks, in order, None for a missing job."""
    import fakeredis

    from service.jobstore import STATUS_CHUNK, JobStore

    connection = fakeredis.FakeRedis()
    store = JobStore(connection, Settings(redis_url=None), [])
    ids = [f"job-{i}" for i in range(2 * STATUS_CHUNK + 5)]
    written = {1: "finished", STATUS_CHUNK: "started", 2 * STATUS_CHUNK + 4: "stopped"}
    for index, status in written.items():
        connection.hset(Job.key_for(ids[index]), "status", status)
    got = store.statuses(ids)
    assert len(got) == len(ids) and store.statuses([]) == []
    assert {i: s for i, s in enumerate(got) if s is not None} == {
        1: "succeeded",
        STATUS_CHUNK: "running",
        2 * STATUS_CHUNK + 4: "canceled",
    }


@pytest.mark.redis
def test_held_waits_cost_no_polling_until_the_safety_poll(
    box: RedisSandbox, zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue #18, item 6): the old waiter read every held job's status every 10 ms,
    so 3,000 held requests kept the gateway busy. Now held requests cost no Redis read until the
    safety poll; a job that ends without a notification waits for it."""
    with gateway(box, zoo, tmp_path, poll_s=30.0) as client:
        store = client.app.state.ddserve.store
        reads: list[int] = []
        statuses = store.statuses

        def counted(job_ids: list[str]) -> list[Any]:
            reads.append(len(job_ids))
            return statuses(job_ids)

        monkeypatch.setattr(store, "statuses", counted)
        held, ids = hold(client, box, count=20)
        reads.clear()  # the one read of each newly held id is done
        for job_id in ids:  # ended behind the waiter's back: no notification
            Job.fetch(job_id, connection=box.connection).set_status("finished")
        time.sleep(1.5)
        assert reads == [] and all(h.thread.is_alive() for h in held)
        client.portal.call(client.app.state.ddserve.waiter.recheck)  # as after a resubscription
        for h in held:
            assert h.answer().json()["status"] == "succeeded"
        assert reads == [20]  # all of them in one read


@pytest.mark.redis
def test_a_job_that_ended_before_its_wait_began_is_read_at_once(
    box: RedisSandbox, zoo: Path, tmp_path: Path
) -> None:
    """The race between a submission and its registration: a job that ended (its message sent
    before anyone held it) is found by the read of newly held ids, not 30 s later."""
    with gateway(box, zoo, tmp_path, poll_s=30.0) as client:
        job_id = client.post("/generate", json=GEN).json()["id"]
        box.job_ids.append(job_id)
        Job.fetch(job_id, connection=box.connection).set_status("finished")
        waiter = client.app.state.ddserve.waiter
        started = time.monotonic()
        assert client.portal.call(waiter.wait, job_id, 10.0) is True
        assert time.monotonic() - started < ANSWER_WITHIN_S
        missing = time.monotonic()  # a job that does not exist (any more) ends the wait too
        assert client.portal.call(waiter.wait, "no-such-job", 10.0) is True
        assert time.monotonic() - missing < ANSWER_WITHIN_S
        assert waiter.held == 0


@pytest.mark.redis
def test_a_lost_notification_is_caught_by_the_safety_poll(
    box: RedisSandbox, zoo: Path, tmp_path: Path
) -> None:
    with gateway(box, zoo, tmp_path, poll_s=0.5) as client:
        (held,), (job_id,) = hold(client, box)
        job = Job.fetch(job_id, connection=box.connection)
        response, delay = answered_after_finish(held, lambda: job.set_status("finished"))
    assert response.status_code == 200 and response.json()["status"] == "succeeded"
    assert delay < 0.5 + ANSWER_WITHIN_S


# --- reconnecting ------------------------------------------------------------------------------


def _waiter_client_id(connection: Redis, name: str) -> int | None:
    for client in connection.client_list(_type="pubsub"):
        if client.get("name") == name:
            return int(client["id"])
    return None


@pytest.mark.redis
def test_the_subscription_survives_a_killed_connection(
    box: RedisSandbox, zoo: Path, tmp_path: Path
) -> None:
    with gateway(box, zoo, tmp_path) as client:
        waiter = client.app.state.ddserve.waiter
        first = _waiter_client_id(box.connection, waiter.client_name)
        assert first is not None

        # A job that ends while the subscription is down: its message is lost, and the read of
        # every held job after resubscribing finds it.
        (held,), _ = hold(client, box)
        worker = simple_worker(box, MODEL)
        job, queue, execution = start_next(box, worker, MODEL)
        item = rq_bridge.Succeeded(job, queue, execution, {"images": []})

        def kill_then_finish() -> None:
            box.connection.client_kill_filter(_id=first)
            rq_bridge.finish_successes(worker, [item])

        response, delay = answered_after_finish(held, kill_then_finish)
        assert response.json()["status"] == "succeeded"
        assert delay < ANSWER_WITHIN_S

        again = _waiter_client_id(box.connection, waiter.client_name)
        assert again is not None and again != first
        wait_until(lambda: waiter.subscribed, 10)
        (held,), _ = hold(client, box)  # and notifications arrive again
        response, delay = answered_after_success(box, worker, held)
    assert response.json()["status"] == "succeeded" and delay < ANSWER_WITHIN_S


def test_the_subscription_comes_back_after_a_redis_restart(
    zoo: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A private redis-server crashes (SIGKILL) with a request held, and comes back: the waiter
    resubscribes by itself and the next notification answers the request."""
    connection = Redis.from_url(redis_server.url)
    box = RedisSandbox(connection)
    settings = Settings(
        zoo_dir=zoo,
        storage_dir=tmp_path / "images",
        auth_enabled=False,
        signing_secret="test-secret",
        key_prefix=box.prefix,
        redis_url=redis_server.url,
        max_retries=0,
        wait_poll_s=30.0,
    )
    app = create_app(settings, connect(settings))
    waiter = app.state.ddserve.waiter
    with TestClient(app) as client:
        wait_until(lambda: waiter.subscribed, 10)
        (held,), _ = hold(client, box)
        redis_server.kill()
        wait_until(lambda: not waiter.subscribed, 10)
        time.sleep(1.0)  # a few failed attempts: the backoff grows
        redis_server.start()  # same port, same AOF: the job is still there
        wait_until(lambda: waiter.subscribed, 15)
        worker = simple_worker(box, MODEL)
        response, delay = answered_after_success(box, worker, held)
    assert response.status_code == 200 and response.json()["status"] == "succeeded"
    assert delay < ANSWER_WITHIN_S


def test_the_batching_worker_publishes_what_it_finishes(tmp_path: Path) -> None:
    """End to end on the embedded mode's fakeredis: the real worker (a thread) finishes a held
    request's job, its finishing transaction publishes the job id, and the request is answered
    long before the 30 s safety poll."""
    import fakeredis
    import torch

    from tests.tiny_zoo import write_diffusion_model
    from workers.embedded import start_worker_thread

    torch.set_num_threads(1)
    write_diffusion_model(tmp_path / "zoo", "tiny-ddpm")
    settings = Settings(
        zoo_dir=tmp_path / "zoo",
        storage_dir=tmp_path / "images",
        key_prefix="emb-wait",
        auth_enabled=False,
        signing_secret="test-secret",
        heartbeat_s=0.2,
        wait_poll_s=30.0,
    )
    server = fakeredis.FakeServer()
    listener = fakeredis.FakeRedis(server=server).pubsub()
    listener.subscribe(channel("emb-wait", JobEvent.FINISHED))
    handle = start_worker_thread(settings, fakeredis.FakeRedis(server=server))
    try:
        assert handle.ready.wait(60) and handle.error is None, handle.error
        app = create_app(settings, fakeredis.FakeRedis(server=server))
        with TestClient(app) as client:
            wait_until(lambda: app.state.ddserve.waiter.subscribed, 10)
            started = time.monotonic()
            body = {"model": "tiny-ddpm", "class_label": 1, "num_inference_steps": 20, "seed": 3}
            response = client.post("/generate", json=body, headers={"Prefer": "wait=25"})
            elapsed = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "succeeded"
        assert elapsed < 20
        # the subscribe confirmation, the job's message, then nothing more
        messages = [listener.get_message(timeout=0.5) for _ in range(3)]
        published = [
            decode_message(m["data"]).job_id for m in messages if m and m["type"] == "message"
        ]
        assert published == [response.json()["id"]]
    finally:
        assert handle.stop(timeout=30)
        listener.close()


def count_reads(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[str]]:
    """The gateway store's reads from now on: the size of each `snapshots` call (the waiter's
    reader), and each job read alone (`fetch`: a request reading its own job)."""
    store = client.app.state.ddserve.store
    reads: list[int] = []
    single: list[str] = []
    snapshots, fetch = store.snapshots, store.fetch

    def counted(job_ids: list[str]) -> list[Any]:
        reads.append(len(job_ids))
        return snapshots(job_ids)

    def fetched(job_id: str) -> Any:
        single.append(job_id)
        return fetch(job_id)

    monkeypatch.setattr(store, "snapshots", counted)
    monkeypatch.setattr(store, "fetch", fetched)
    return reads, single


# --- the reader: one read per burst ----------------------------------------------------------


@pytest.mark.redis
def test_snapshots_read_many_jobs_as_snapshot_reads_one(
    box: RedisSandbox, zoo: Path, tmp_path: Path
) -> None:
    """`JobStore.snapshots` (two round trips for any number of jobs) gives what `snapshot(fetch)`
    gives, job by job: queued (with its position), running, succeeded (with its output), failed,
    canceled, and None for a missing job or one that is not ours."""
    with gateway(box, zoo, tmp_path) as client:
        store = client.app.state.ddserve.store
        ids = [client.post("/generate", json={**GEN, "seed": s}).json()["id"] for s in range(5)]
        box.job_ids.extend(ids)
        worker = simple_worker(box, MODEL)
        ends = []
        for _ in range(4):  # the first four leave the queue; the fifth stays queued
            ends.append(start_next(box, worker, MODEL))
        (j0, q0, e0), (j1, q1, e1), (j2, q2, e2), _running = ends
        rq_bridge.finish_successes(worker, [rq_bridge.Succeeded(j0, q0, e0, {"images": ["a"]})])
        rq_bridge.finish_failure(worker, j1, q1, e1, RuntimeError("device lost"), retry=False)
        rq_bridge.finish_stopped(worker, j2, q2, e2, "Job canceled by request.")
        foreign = Job.create(print, connection=box.connection, id=f"{box.prefix}-foreign")
        foreign.save()
        box.job_ids.append(foreign.id)
        asked = [*ids, "no-such-job", foreign.id]
        one_by_one = [
            None if (job := store.fetch(job_id)) is None else store.snapshot(job)
            for job_id in asked
        ]
        together = store.snapshots(asked)
    assert [s.status.value if s else None for s in together] == [
        "succeeded",
        "failed",
        "canceled",
        "running",
        "queued",
        None,
        None,
    ]
    assert together == one_by_one
    assert together[0] is not None and together[0].output == {"images": ["a"]}
    assert together[4] is not None and together[4].queue_position == 0


@pytest.mark.redis
def test_a_burst_of_woken_waits_is_read_in_one_go(
    box: RedisSandbox, zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue #18, item 6): every woken wait read its own job in its own thread hop,
    so 3,000 jobs finishing together were answered seconds late. Now the jobs that end together
    are read together: 30 finished in one transaction cost one `snapshots` read (and no
    per-request read), and every held request answers with its own job."""
    with gateway(box, zoo, tmp_path, poll_s=30.0) as client:
        reads, single = count_reads(client, monkeypatch)
        held, ids = hold(client, box, count=30)
        worker = simple_worker(box, MODEL)
        started = [start_next(box, worker, MODEL) for _ in ids]
        reads.clear()
        single.clear()
        finished = [rq_bridge.Succeeded(j, q, e, {"images": []}) for j, q, e in started]
        rq_bridge.finish_successes(worker, finished)
        answers = [h.answer().json() for h in held]
    assert reads == [30] and single == []
    assert sorted(a["id"] for a in answers) == sorted(ids)
    assert all(a["status"] == "succeeded" for a in answers)
    assert all(a["output"] is not None for a in answers)


@pytest.mark.redis
def test_waits_that_time_out_together_are_read_together(
    box: RedisSandbox, zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue #18, item 6, the timeout phase): a wait that timed out read its job in
    its own thread hop, so 3,000 requests held at the same wait stalled the event loop when they
    timed out together. Now the waits that time out together are read by the reader together,
    and each answers with its own job as it is (queued: no worker here)."""
    import asyncio

    with gateway(box, zoo, tmp_path, poll_s=30.0) as client:
        ids = [client.post("/generate", json={**GEN, "seed": s}).json()["id"] for s in range(20)]
        box.job_ids.extend(ids)
        reads, single = count_reads(client, monkeypatch)
        waiter = client.app.state.ddserve.waiter

        async def wait_all() -> list[tuple[bool, Any]]:  # registered in one go: one deadline
            return await asyncio.gather(*(waiter.wait_snapshot(i, 0.5) for i in ids))

        results = client.portal.call(wait_all)
    assert [woken for woken, _ in results] == [False] * 20
    assert [snap.id for _, snap in results] == ids
    assert all(snap.status.value == "queued" for _, snap in results)
    assert single == [] and sum(reads) == 20 and len(reads) <= 2  # one read (two at worst)
