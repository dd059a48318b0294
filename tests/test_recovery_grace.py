"""The recovery grace (issue #18 item 5): after a Redis outage longer than `abandoned_after_s`
every running job's started-registry entry looks expired until its live worker heartbeats again,
so no sweeper — the gateway's janitor, a worker's maintenance — retries or fails abandoned jobs
until it has seen Redis answer for `recovery_grace_s` without a break. The clock is injected."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from rq.job import Job
from rq.registry import StartedJobRegistry

from ddserve.recovery import RecoveryGrace
from ddserve.settings import Settings
from tests.gateway_support import make_app, write_config_zoo

GEN = {"model": "tiny-ddpm", "class_label": 1, "seed": 1}
QUEUE = "gwtest:tiny-ddpm"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_grace_opens_only_after_redis_answered_that_long_without_a_break() -> None:
    clock = Clock()
    grace = RecoveryGrace(3.0, clock)
    assert not grace.open() and grace.remaining_s() is None  # never seen: closed
    grace.reachable()
    assert not grace.open() and grace.remaining_s() == 3.0  # a new process waits too
    clock.now += 2.0
    grace.reachable()  # answering again does not restart the wait
    assert not grace.open() and grace.remaining_s() == pytest.approx(1.0)
    clock.now += 1.0
    assert grace.open() and grace.remaining_s() == 0.0
    grace.unreachable()  # an outage closes it at once...
    assert not grace.open()
    clock.now += 60.0
    grace.reachable()  # ...and the wait starts over from when Redis answers again
    clock.now += 2.9
    assert not grace.open()
    clock.now += 0.1
    assert grace.open()
    assert RecoveryGrace(0.0, clock).open() is False  # zero: open from the first answer on
    zero = RecoveryGrace(0.0, clock)
    zero.reachable()
    assert zero.open()


def test_the_default_grace_is_three_heartbeats() -> None:
    assert Settings(heartbeat_s=10).recovery_grace() == 30.0
    assert Settings(heartbeat_s=0.5).recovery_grace() >= 2 * 0.5
    assert Settings(heartbeat_s=10, recovery_grace_s=5).recovery_grace() == 5.0


def test_the_grace_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDSERVE_RECOVERY_GRACE_S", "12.5")
    assert Settings().recovery_grace() == 12.5


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def gateway(zoo: Path, tmp_path: Path) -> Iterator[tuple[TestClient, object]]:
    app, server = make_app(zoo, tmp_path, max_retries=1, heartbeat_s=1.0)
    with TestClient(app) as client:
        yield client, server


def _expired_entry(conn: redis.Redis, job_id: str) -> None:
    """A running job whose started-registry entry expired: its worker's last heartbeat is older
    than abandoned_after_s — a dead worker, or a live one cut off by a long outage."""
    conn.lrem(f"rq:queue:{QUEUE}", 0, job_id)
    conn.hset(Job.key_for(job_id), mapping={"status": "started", "worker_name": "w"})
    conn.zadd(StartedJobRegistry(QUEUE, connection=conn).key, {f"{job_id}:exec-1": 1.0})


def test_the_janitor_sweeps_nothing_until_redis_answered_for_the_grace(gateway) -> None:
    client, server = gateway
    janitor = client.app.state.janitor
    conn = client.app.state.ddserve.connection
    clock = Clock()
    janitor.grace = RecoveryGrace(client.app.state.ddserve.settings.recovery_grace(), clock)
    assert janitor.grace.grace_s == 3.0
    job_id = client.post("/generate", json=GEN).json()["id"]
    _expired_entry(conn, job_id)

    server.connected = False  # the outage: the round fails and the grace closes
    with pytest.raises(redis.ConnectionError):
        janitor.run_once(force=True)
    server.connected = True
    clock.now += 60.0
    report = janitor.run_once(force=True)  # Redis is back: the entry looks expired...
    assert not report.recovered
    assert client.get(f"/jobs/{job_id}").json()["status"] == "running"  # ...and is left alone
    clock.now += 2.9
    assert not janitor.run_once(force=True).recovered

    clock.now += 0.1  # its worker would have heartbeated by now; it did not: it is dead
    assert janitor.run_once(force=True).recovered
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "queued"  # retried


def test_a_live_workers_heartbeat_within_the_grace_saves_its_job(gateway) -> None:
    client, server = gateway
    janitor = client.app.state.janitor
    conn = client.app.state.ddserve.connection
    clock = Clock()
    janitor.grace = RecoveryGrace(3.0, clock)
    job_id = client.post("/generate", json=GEN).json()["id"]
    _expired_entry(conn, job_id)
    server.connected = False
    with pytest.raises(redis.ConnectionError):
        janitor.run_once(force=True)
    server.connected = True
    assert not janitor.run_once(force=True).recovered
    registry = StartedJobRegistry(QUEUE, connection=conn)
    conn.zadd(registry.key, {f"{job_id}:exec-1": 9e12}, xx=True)  # the worker heartbeats
    clock.now += 3.0
    assert janitor.run_once(force=True).recovered
    assert client.get(f"/jobs/{job_id}").json()["status"] == "running"
