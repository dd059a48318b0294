"""The gateway's side of "every accepted job ends" (fakeredis, no worker): a job still queued after
`job_ttl_s` ends `failed` with `job_expired` — never a 404 — and a running job whose worker died is
retried, then failed with `worker_lost`, by the janitor when no worker of its model is left."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from rq.job import Job
from rq.queue import Queue
from rq.registry import StartedJobRegistry

from ddserve.recovery import RecoveryGrace
from tests.gateway_support import make_app, write_config_zoo

GEN = {"model": "tiny-ddpm", "class_label": 1, "seed": 1}
QUEUE = "gwtest:tiny-ddpm"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def client(zoo: Path, tmp_path: Path) -> Iterator[TestClient]:
    app, _ = make_app(zoo, tmp_path, job_ttl_s=60, max_retries=1, recovery_grace_s=0)
    with TestClient(app) as c:
        yield c


def janitor_round(client: TestClient) -> None:
    client.app.state.janitor.run_once(force=True)


def test_a_job_queued_past_its_ttl_fails_instead_of_vanishing(client: TestClient) -> None:
    conn = client.app.state.ddserve.connection
    stale = client.post("/generate", json=GEN).json()["id"]
    fresh = client.post("/generate", json={**GEN, "seed": 2}).json()["id"]
    assert conn.ttl(Job.key_for(stale)) == -1  # no RQ ttl: the record stays while queued
    conn.hset(Job.key_for(stale), "enqueued_at", "2020-01-01T00:00:00.000000Z")
    janitor_round(client)

    job = client.get(f"/jobs/{stale}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "job_expired" and job["error"]["type"] == "timeout_error"
    assert job["completed_at"] is not None and job["queue_position"] is None
    assert conn.ttl(Job.key_for(stale)) > 0  # kept failure_ttl_s, then gone
    assert client.get(f"/jobs/{fresh}").json()["status"] == "queued"
    assert conn.lrange(f"rq:queue:{QUEUE}", 0, -1) == [fresh.encode()]


def _abandon(conn, job_id: str) -> None:
    """What a worker killed mid-run leaves: the job `started`, out of its queue, with a
    started-registry entry whose heartbeat expired."""
    conn.lrem(f"rq:queue:{QUEUE}", 0, job_id)
    conn.hset(Job.key_for(job_id), mapping={"status": "started", "worker_name": "dead"})
    registry = StartedJobRegistry(QUEUE, connection=conn)
    conn.zadd(registry.key, {f"{job_id}:exec-{conn.incr('gwtest:n')}": 1.0})


def test_janitor_retries_then_fails_a_dead_workers_job(client: TestClient) -> None:
    conn = client.app.state.ddserve.connection
    job_id = client.post("/generate", json=GEN).json()["id"]
    _abandon(conn, job_id)
    assert client.get(f"/jobs/{job_id}").json()["status"] == "running"
    janitor_round(client)
    first = client.get(f"/jobs/{job_id}").json()
    assert first["status"] == "queued" and first["queue_position"] == 0  # retried
    assert Job.fetch(job_id, connection=conn).retries_left == 0

    _abandon(conn, job_id)  # the retry's worker dies too
    janitor_round(client)
    last = client.get(f"/jobs/{job_id}").json()
    assert last["status"] == "failed"
    assert last["error"]["code"] == "worker_lost"
    assert Queue(QUEUE, connection=conn).count == 0


def test_live_jobs_are_left_alone(client: TestClient) -> None:
    conn = client.app.state.ddserve.connection
    job_id = client.post("/generate", json=GEN).json()["id"]
    _abandon(conn, job_id)
    registry = StartedJobRegistry(QUEUE, connection=conn)
    entry = conn.zrange(registry.key, 0, -1)[0]
    conn.zadd(registry.key, {entry: 9e12})  # its worker's heartbeat keeps it in the future
    janitor_round(client)
    assert client.get(f"/jobs/{job_id}").json()["status"] == "running"


def test_with_no_worker_left_a_dead_workers_job_ends_within_two_minutes(
    zoo: Path, tmp_path: Path
) -> None:
    app, _ = make_app(zoo, tmp_path, max_retries=0)  # the default recovery settings
    with TestClient(app) as client:
        janitor = client.app.state.janitor
        settings = client.app.state.ddserve.settings
        # The job's registry entry expires abandoned_after_s after the last heartbeat, and a
        # janitor round comes at most interval_s later: the bound is 2 minutes.
        assert settings.abandoned_after_s + janitor.interval_s <= 120
        assert janitor.interval_s <= settings.abandoned_after_s / 4
        # A gateway starting sweeps after the recovery grace, as it does after an outage.
        clock = [0.0]
        janitor.grace = RecoveryGrace(settings.recovery_grace(), clock=lambda: clock[0])
        assert settings.recovery_grace() >= 2 * settings.heartbeat_s
        first = janitor.run_once()
        assert first.ran and not first.recovered  # this cleanup interval's round is done...
        clock[0] = settings.recovery_grace()
        conn = client.app.state.ddserve.connection
        job_id = client.post("/generate", json=GEN).json()["id"]
        _abandon(conn, job_id)
        report = janitor.run_once()  # ...and the next round recovers the job all the same
        assert report.recovered and not report.ran
        job = client.get(f"/jobs/{job_id}").json()
        assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
