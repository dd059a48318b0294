"""`GET /jobs/{id}/events` on the gateway alone (`service.routers.job_events`, `service.event_hub`,
`ddserve.job_events`): a fakeredis app, with a test playing the worker — it appends to the job's
stream exactly as `workers.step_writes` does and ends the job as RQ's paths do (status, then the
finished notification). The whole stack with a real worker is `tests/test_job_events_stack.py`."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from fastapi.testclient import TestClient
from httpx_sse import ServerSentEvent, connect_sse
from rq.job import Job
from rq.job import JobStatus as RQStatus

from ddserve.job_events import (
    BadEventId,
    EventKind,
    append,
    event_id,
    parse_event_id,
    retention_s,
    stream_key,
)
from ddserve.notifications import publish_finished
from tests.gateway_support import assert_error, make_app, write_config_zoo

PREFIX = "gwtest"
GEN = {"model": "tiny-ddpm", "class_label": 1, "seed": 3}
TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def stack(zoo: Path, tmp_path: Path) -> Iterator[tuple[TestClient, fakeredis.FakeRedis]]:
    app, server = make_app(zoo, tmp_path, sse_heartbeat_s=0.2)
    with TestClient(app) as client:
        yield client, fakeredis.FakeRedis(server=server)


def wait_until(condition: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def submit(client: TestClient) -> str:
    response = client.post("/generate", json=GEN)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def play_worker(redis: fakeredis.FakeRedis, job_id: str, steps: int, end: RQStatus) -> None:
    """What a worker writes: started, progress 1..steps (previews at even steps), then the end."""
    job = Job.fetch(job_id, connection=redis)
    job.set_status(RQStatus.STARTED)
    pipe = redis.pipeline()
    append(pipe, PREFIX, job_id, EventKind.STARTED, {}, 60)
    pipe.execute()
    for step in range(1, steps + 1):
        data: dict[str, Any] = {"step": step, "of": steps}
        if step % 2 == 0:
            data["previews"] = [{"index": 0, "png": "iVBORw0KGgo="}]
        pipe = redis.pipeline()
        append(pipe, PREFIX, job_id, EventKind.PROGRESS, data, 60)
        pipe.execute()
    pipe = redis.pipeline(transaction=True)
    job.set_status(end, pipeline=pipe)
    publish_finished(pipe, PREFIX, job_id)
    pipe.execute()


def stream(
    client: TestClient, job_id: str, headers: dict[str, str] | None = None, query: str = ""
) -> list[ServerSentEvent]:
    with connect_sse(
        client,
        "GET",
        f"/jobs/{job_id}/events{query}",
        headers=dict(headers or {}),
        timeout=TIMEOUT_S,
    ) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return list(source.iter_sse())


def in_background(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


# --- the id format -------------------------------------------------------------------------------


def test_event_ids_name_their_job() -> None:
    assert parse_event_id(event_id("job-1", "17-0"), "job-1") == "17-0"
    with pytest.raises(BadEventId) as other:
        parse_event_id(event_id("job-2", "17-0"), "job-1")
    assert other.value.code == "event_id_of_another_job"
    for bad in ("17-0", "job-1/", "job-1/x-1", "job 1/1-0", "a/b/1-0", ""):
        with pytest.raises(BadEventId) as error:
            parse_event_id(bad, "job-1")
        assert error.value.code == "invalid_event_id", bad


def test_stream_is_bounded_and_expires() -> None:
    redis = fakeredis.FakeRedis()
    ttl = retention_s(3600, 86400, 600, 600)
    assert ttl > 86400
    pipe = redis.pipeline()
    for step in range(3):
        append(pipe, PREFIX, "j", EventKind.PROGRESS, {"step": step, "of": 3}, ttl)
    pipe.execute()
    key = stream_key(PREFIX, "j")
    assert redis.xlen(key) == 3 and 86400 < redis.ttl(key) <= ttl


# --- the route -----------------------------------------------------------------------------------


def test_events_in_order_then_the_stream_ends(
    stack: tuple[TestClient, fakeredis.FakeRedis],
) -> None:
    client, redis = stack
    job_id = submit(client)
    hub = client.app.state.ddserve.events
    worker = in_background(
        lambda: (wait_until(lambda: hub.listening == 1), play_worker(redis, job_id, 4, "failed"))
    )
    events = stream(client, job_id, query="?preview=1")
    worker.join(TIMEOUT_S)
    kinds = [e.event for e in events]
    assert kinds == ["queued", "started", "progress", "progress", "progress", "progress", "failed"]
    assert json.loads(events[0].data) == {"position": 0} and events[0].id == ""
    steps = [json.loads(e.data) for e in events if e.event == "progress"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(s["of"] == 4 for s in steps)
    assert [("previews" in s) for s in steps] == [False, True, False, True]
    assert all(e.id.startswith(f"{job_id}/") for e in events[1:-1])
    failed = json.loads(events[-1].data)
    assert failed["id"] == job_id and failed["status"] == "failed" and failed["error"]["code"]
    assert hub.listening == 0  # the listener left with the stream


def test_previews_only_on_request(stack: tuple[TestClient, fakeredis.FakeRedis]) -> None:
    client, redis = stack
    job_id = submit(client)
    play_worker(redis, job_id, 2, "failed")
    events = stream(client, job_id)  # no ?preview=1: the previews stay out of the stream
    progress = [json.loads(e.data) for e in events if e.event == "progress"]
    assert progress == [{"step": 1, "of": 2}, {"step": 2, "of": 2}]


def test_resume_with_last_event_id_loses_nothing(
    stack: tuple[TestClient, fakeredis.FakeRedis],
) -> None:
    client, redis = stack
    job_id = submit(client)
    play_worker(redis, job_id, 5, "failed")
    everything = stream(client, job_id)
    # (an event without `id:` keeps the last id, as EventSource's lastEventId does)
    with_ids = [e for e in everything if e.event in ("started", "progress")]
    assert [e.event for e in everything] == ["started"] + ["progress"] * 5 + ["failed"]
    for cut in range(len(with_ids)):
        rest = stream(client, job_id, headers={"Last-Event-ID": with_ids[cut].id})
        assert [e.id for e in rest[:-1]] == [e.id for e in with_ids[cut + 1 :]]
        assert [e.data for e in rest[:-1]] == [e.data for e in with_ids[cut + 1 :]]
        assert rest[-1].event == "failed"
    # the query parameter (what a client without headers can send) is the same resume
    rest = stream(client, job_id, query=f"?last_event_id={with_ids[2].id}")
    assert [e.id for e in rest[:-1]] == [e.id for e in with_ids[3:]]


def test_resume_mid_job_then_live(stack: tuple[TestClient, fakeredis.FakeRedis]) -> None:
    """A client that reconnects while the job runs gets what it missed, then the live events."""
    client, redis = stack
    job_id = submit(client)
    job = Job.fetch(job_id, connection=redis)
    job.set_status(RQStatus.STARTED)
    pipe = redis.pipeline()
    append(pipe, PREFIX, job_id, EventKind.STARTED, {}, 60)
    for step in (1, 2):
        append(pipe, PREFIX, job_id, EventKind.PROGRESS, {"step": step, "of": 3}, 60)
    pipe.execute()
    first = redis.xrange(stream_key(PREFIX, job_id))[0][0].decode()
    hub = client.app.state.ddserve.events

    def rest_of_job() -> None:
        wait_until(lambda: hub.listening == 1)
        pipe = redis.pipeline(transaction=True)
        append(pipe, PREFIX, job_id, EventKind.PROGRESS, {"step": 3, "of": 3}, 60)
        job.set_status(RQStatus.FAILED, pipeline=pipe)
        publish_finished(pipe, PREFIX, job_id)
        pipe.execute()

    worker = in_background(rest_of_job)
    events = stream(client, job_id, headers={"Last-Event-ID": event_id(job_id, first)})
    worker.join(TIMEOUT_S)
    assert [json.loads(e.data).get("step") for e in events[:-1]] == [1, 2, 3]
    assert events[-1].event == "failed"


def test_canceled_job_ends_its_stream(stack: tuple[TestClient, fakeredis.FakeRedis]) -> None:
    client, _ = stack
    job_id = submit(client)
    hub = client.app.state.ddserve.events

    def cancel() -> None:
        wait_until(lambda: hub.listening == 1)
        assert client.post(f"/jobs/{job_id}/cancel").json()["status"] == "canceled"

    canceler = in_background(cancel)
    events = stream(client, job_id)
    canceler.join(TIMEOUT_S)
    assert [e.event for e in events] == ["queued", "canceled"]
    assert json.loads(events[-1].data)["status"] == "canceled"


def test_lost_wake_up_is_caught_by_the_safety_pass(
    stack: tuple[TestClient, fakeredis.FakeRedis],
) -> None:
    """Entries and an end written without any notification still arrive (heartbeat = 0.2 s)."""
    client, redis = stack
    job_id = submit(client)
    hub = client.app.state.ddserve.events

    def silent_worker() -> None:
        wait_until(lambda: hub.listening == 1)
        job = Job.fetch(job_id, connection=redis)
        pipe = redis.pipeline()
        append(pipe, PREFIX, job_id, EventKind.STARTED, {}, 60, wake=False)
        job.set_status(RQStatus.FAILED, pipeline=pipe)
        pipe.execute()

    worker = in_background(silent_worker)
    events = stream(client, job_id)
    worker.join(TIMEOUT_S)
    assert [e.event for e in events] == ["queued", "started", "failed"]


def test_heartbeat_comments_keep_an_idle_stream(
    stack: tuple[TestClient, fakeredis.FakeRedis],
) -> None:
    client, redis = stack
    job_id = submit(client)
    hub = client.app.state.ddserve.events
    with client.stream("GET", f"/jobs/{job_id}/events", timeout=TIMEOUT_S) as response:
        lines = response.iter_lines()
        seen: list[str] = []
        while sum(line.startswith(":") for line in seen) < 2:  # two heartbeats while queued
            seen.append(next(lines))
        assert any(line.startswith("event: queued") for line in seen)
        play_worker(redis, job_id, 1, "failed")
        rest = list(lines)
    assert any(line == "event: failed" for line in rest)
    wait_until(lambda: hub.listening == 0)


def test_bad_last_event_ids_are_refused(stack: tuple[TestClient, fakeredis.FakeRedis]) -> None:
    client, _ = stack
    job_id, other = submit(client), submit(client)
    url = f"/jobs/{job_id}/events"
    response = client.get(url, headers={"Last-Event-ID": event_id(other, "1-0")})
    error = assert_error(response, 400, "event_id_of_another_job", "Last-Event-ID")
    assert other in error["message"]
    assert_error(client.get(url, headers={"Last-Event-ID": "garbage"}), 400, "invalid_event_id")
    assert_error(client.get(f"{url}?last_event_id=1-0"), 400, "invalid_event_id")
    assert client.app.state.ddserve.events.listening == 0


def test_unknown_job_is_404(stack: tuple[TestClient, fakeredis.FakeRedis]) -> None:
    client, _ = stack
    assert_error(client.get("/jobs/no-such-job/events"), 404, "job_not_found", "id")
    assert_error(client.get("/jobs/bad%0Aid/events"), 404, "job_not_found", "id")


# --- the worker's side: the round's buffer ------------------------------------------------------


def test_round_merges_plain_progress_and_keeps_every_preview() -> None:
    from workers.step_writes import StepWrites

    writes = StepWrites(PREFIX, events_ttl_s=60)
    writes.event("a", EventKind.STARTED, {})
    writes.event("a", EventKind.PROGRESS, {"step": 1, "of": 4})
    writes.event("a", EventKind.PROGRESS, {"step": 2, "of": 4})  # replaces step 1
    writes.event("a", EventKind.PROGRESS, {"step": 2, "of": 4, "previews": []})
    writes.event("a", EventKind.PROGRESS, {"step": 3, "of": 4})  # after a preview: kept
    writes.event("b", EventKind.STARTED, {})
    writes.discard("b#1", "b")  # ended another way: nothing of it is written
    redis = fakeredis.FakeRedis()
    pubsub = redis.pubsub()
    pubsub.subscribe(f"{PREFIX}:events:updated")
    pubsub.get_message(timeout=1)
    pipe = redis.pipeline(transaction=True)
    writes.queue_writes(pipe, writes.take(), [])
    pipe.execute()
    entries = redis.xrange(stream_key(PREFIX, "a"))
    steps = [json.loads(fields[b"data"]).get("step") for _, fields in entries]
    assert [fields[b"event"] for _, fields in entries] == [b"started"] + [b"progress"] * 3
    assert steps == [None, 2, 2, 3] and redis.ttl(stream_key(PREFIX, "a")) == 60
    assert not redis.exists(stream_key(PREFIX, "b"))
    wakes = [pubsub.get_message(timeout=1) for _ in range(2)]
    assert [w["data"] for w in wakes if w] == [b"a"]  # one wake-up for the job's round


def test_a_failed_round_gives_its_events_back_in_order() -> None:
    from workers.step_writes import StepWrites

    writes = StepWrites(PREFIX, events_ttl_s=60)
    writes.event("a", EventKind.STARTED, {})
    taken = writes.take()
    writes.event("a", EventKind.PROGRESS, {"step": 1, "of": 2, "previews": []})
    writes.give_back(taken)  # Redis refused the round: it goes with the next, first
    assert [kind for kind, _ in writes.take().events["a"]] == ["started", "progress"]


def test_events_off_means_no_route_and_no_stream(zoo: Path, tmp_path: Path) -> None:
    """`DDSERVE_JOB_EVENTS=false`: the route is a 404 and a worker's round writes no stream."""
    from workers.step_writes import StepWrites

    app, _ = make_app(zoo, tmp_path, job_events=False)
    with TestClient(app) as client:
        job_id = submit(client)
        assert_error(client.get(f"/jobs/{job_id}/events"), 404, "not_found")
        assert not app.state.ddserve.events.subscribed
    writes = StepWrites(PREFIX, events_ttl_s=60, events=False)
    writes.event("a", EventKind.STARTED, {})
    assert not writes.take()


def test_a_client_that_leaves_frees_its_listener(
    stack: tuple[TestClient, fakeredis.FakeRedis],
) -> None:
    client, _ = stack
    job_id = submit(client)
    hub = client.app.state.ddserve.events
    for _ in range(3):
        with client.stream("GET", f"/jobs/{job_id}/events", timeout=TIMEOUT_S) as response:
            lines = response.iter_lines()
            assert next(lines) == "event: queued"
            assert hub.listening == 1
            lines.close()
        wait_until(lambda: hub.listening == 0)  # gone with the connection, job still queued


def test_the_hub_subscribes_only_while_a_stream_is_open(
    stack: tuple[TestClient, fakeredis.FakeRedis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (#20, the SSE path's cost): the hub was subscribed from the start, so every
    worker round's message and every job's end reached the gateway even when nobody followed a
    job (+5.3 % gateway CPU per job at c = 64). Now it subscribes when a stream opens and
    unsubscribes a while after the last one closes; a job followed after that still gets all of
    its events (the subscription marks every listened job dirty)."""
    import service.event_hub as event_hub

    monkeypatch.setattr(event_hub, "UNSUBSCRIBE_AFTER_S", 0.3)
    client, redis = stack
    hub = client.app.state.ddserve.events
    job_id = submit(client)
    time.sleep(0.3)
    assert not hub.subscribed  # the app started, nobody listens
    with client.stream("GET", f"/jobs/{job_id}/events", timeout=TIMEOUT_S) as response:
        lines = response.iter_lines()
        assert next(lines) == "event: queued"
        wait_until(lambda: hub.subscribed)
        lines.close()
    wait_until(lambda: hub.listening == 0)
    wait_until(lambda: not hub.subscribed)  # the last stream closed: unsubscribed
    play_worker(redis, job_id, 2, RQStatus.FINISHED)  # published while nobody subscribed
    with client.stream("GET", f"/jobs/{job_id}/events", timeout=TIMEOUT_S) as response:
        text = response.read().decode()
    assert "event: started" in text and "event: succeeded" in text


def test_a_queued_job_is_told_each_time_it_moves_up(zoo: Path, tmp_path: Path) -> None:
    """Regression (the position was sent once, at connect): a client following the third job of
    a queue sees `queued` with 2, then 1, then 0 as the jobs ahead of it are taken, and no
    position after its job started."""
    from rq.queue import Queue

    app, server = make_app(zoo, tmp_path, sse_heartbeat_s=0.2, sse_queue_position_s=0.05)
    with TestClient(app) as client:
        redis = fakeredis.FakeRedis(server=server)
        ahead = [submit(client), submit(client)]
        job_id = submit(client)
        queue = Queue(Job.fetch(job_id, connection=redis).origin, connection=redis)
        seen: list[tuple[str, Any]] = []
        with connect_sse(client, "GET", f"/jobs/{job_id}/events", timeout=TIMEOUT_S) as source:
            for event in source.iter_sse():
                seen.append((event.event, json.loads(event.data)))
                if event.event == "queued" and ahead:
                    queue.remove(ahead.pop(0))  # a worker took the job at the head
                elif event.event == "queued":
                    in_background(lambda: play_worker(redis, job_id, 1, RQStatus.FAILED))
        positions = [data["position"] for kind, data in seen if kind == "queued"]
        assert positions == [2, 1, 0]
        assert [kind for kind, _ in seen[3:]] == ["started", "progress", "failed"]
        assert not app.state.ddserve.events._queued  # nobody follows a queue any more


def test_positions_off_means_one_queued_event(zoo: Path, tmp_path: Path) -> None:
    from rq.queue import Queue

    app, server = make_app(zoo, tmp_path, sse_heartbeat_s=0.2, sse_queue_position_s=0)
    with TestClient(app) as client:
        redis = fakeredis.FakeRedis(server=server)
        first = submit(client)
        job_id = submit(client)
        hub = client.app.state.ddserve.events

        def worker() -> None:
            wait_until(lambda: hub.listening == 1)
            Queue(Job.fetch(first, connection=redis).origin, connection=redis).remove(first)
            time.sleep(0.2)
            play_worker(redis, job_id, 1, RQStatus.FAILED)

        thread = in_background(worker)
        events = stream(client, job_id)
        thread.join(TIMEOUT_S)
        assert [e.event for e in events] == ["queued", "started", "progress", "failed"]
        assert json.loads(events[0].data) == {"position": 1}
