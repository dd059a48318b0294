"""Chaos (issue #18 item 5): Redis unavailable for 2 × `abandoned_after_s` while two workers run a
batch of jobs and a gateway's janitor sweeps. Every started-registry entry is past its expiry when
Redis returns, although every worker is alive; the recovery grace keeps the sweepers (the
janitor, the workers' maintenance — here also called the moment Redis is back, the race the issue
lost) from handing those jobs out again before the workers heartbeat, and fencing by attempt would
drop a stale execution's outcome. Every job ends `succeeded` exactly
once: one successful result, no failed one, and one attempt (it ran once).

A private redis-server (AOF on, stopped with SIGTERM so that nothing acknowledged is lost) on its
own port; the machine's Redis is never touched."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq.job import Job
from rq.results import Result

from ddserve.jobs import META_PROGRESS
from ddserve.recovery import ATTEMPT_FIELD
from service.app import connect, create_app
from tests.redis_sandbox import wait_until
from tests.redis_server import RedisServer, redis_server_available, tiny_ddpm_settings
from workers.embedded import start_worker_thread

pytestmark = [
    pytest.mark.skipif(not redis_server_available(), reason="needs redis-server"),
    pytest.mark.timeout(180),
]
MODEL = "tiny-ddpm"
ABANDONED_AFTER_S = 2.0
JOBS = 12


def test_an_outage_of_twice_abandoned_after_s_runs_and_ends_every_job_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = tiny_ddpm_settings(
        redis_server,
        tmp_path,
        "longout",
        auth_enabled=False,
        abandoned_after_s=ABANDONED_AFTER_S,  # janitor and maintenance sweep every second
        max_retries=1,  # a swept job would be run again: counted below
    )
    assert settings.recovery_grace() == 1.5  # three heartbeats
    handles = [
        start_worker_thread(settings, Redis.from_url(redis_server.url), name=f"longout-{i}")
        for i in range(2)
    ]
    conn = Redis.from_url(redis_server.url)
    try:
        for handle in handles:
            assert handle.ready.wait(60) and handle.error is None, handle.error
        with TestClient(create_app(settings, connect(settings))) as client:
            body = {"model": MODEL, "n": 2, "sampler": "ddpm", "num_inference_steps": 1000}
            ids = []
            for seed in range(JOBS):
                answer = client.post("/generate", json={**body, "seed": seed})
                assert answer.status_code == 202, answer.text
                ids.append(answer.json()["id"])
            jobs = [Job(i, connection=conn) for i in ids]

            def all_running() -> bool:
                for job in jobs:
                    job.refresh()
                    if (job.meta.get(META_PROGRESS) or {}).get("step", 0) == 0:
                        return False
                return True

            wait_until(all_running, 60, 0.05, "every job running")
            redis_server.stop()  # the outage: every heartbeat fails
            time.sleep(2 * ABANDONED_AFTER_S)
            redis_server.start()  # same AOF: every running job's registry entry has expired
            # The race, lost on purpose: sweeps right after Redis answers again, before
            # any worker heartbeats (the janitor's and a worker's maintenance, as they run).
            client.app.state.janitor.run_once(force=True)
            for handle in handles:
                handle.worker.clean_registries()

            def all_ended() -> bool:
                statuses = [job.get_status(refresh=True) for job in jobs]
                return all(s in ("finished", "failed", "stopped", "canceled") for s in statuses)

            wait_until(all_ended, 120, 0.05, "every job ended")
            time.sleep(2 * ABANDONED_AFTER_S)  # a late, second finish would land now
    finally:
        for handle in handles:
            assert handle.stop(timeout=30)
            assert handle.error is None, handle.error

    report = {}
    for job in jobs:
        job.refresh()
        results = list(job.results())
        attempts = int(conn.hget(job.key, ATTEMPT_FIELD) or 0)
        report[job.id] = (
            job.get_status(),
            sum(r.type == Result.Type.SUCCESSFUL for r in results),
            sum(r.type == Result.Type.FAILED for r in results),
            attempts,
            job.retries_left,  # a sweep's retry uses one
            (job.meta.get("error") or {}).get("code"),
        )
    assert all(row == ("finished", 1, 0, 1, 1, None) for row in report.values()), report
