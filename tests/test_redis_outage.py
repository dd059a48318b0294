"""Redis crashes and comes back (a private redis-server with AOF, as in the compose file): while it
is down the gateway answers 503 with Retry-After (never 500) and /readyz is red; when it is back,
the gateway and a busy worker recover by themselves, and every job accepted before the crash still
ends `succeeded`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from service.app import connect, create_app
from service.auth import hash_key
from tests.gateway_support import assert_error
from tests.redis_sandbox import wait_until
from tests.redis_server import RedisServer, redis_server_available, tiny_ddpm_settings
from workers.embedded import start_worker_thread

pytestmark = [
    pytest.mark.skipif(not redis_server_available(), reason="needs redis-server"),
    pytest.mark.timeout(120),
]
MODEL = "tiny-ddpm"
KEY = "outage-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def test_gateway_and_worker_ride_out_a_redis_crash(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = tiny_ddpm_settings(
        redis_server, tmp_path, "outage", api_keys=f"tester:{hash_key(KEY)}"
    )
    handle = start_worker_thread(settings, Redis.from_url(redis_server.url), name="outage-worker")
    try:
        assert handle.ready.wait(60) and handle.error is None, handle.error
        with TestClient(create_app(settings, connect(settings))) as client:
            wait_until(lambda: client.get("/readyz").status_code == 200, 30, 0.05, "ready")
            body = {"model": MODEL, "n": 2, "sampler": "ddpm", "num_inference_steps": 300}
            accepted = []
            for seed in range(6):
                r = client.post("/generate", json={**body, "seed": seed}, headers=AUTH)
                assert r.status_code == 202, r.text
                accepted.append(r.json()["id"])

            def running() -> bool:
                jobs = [client.get(f"/jobs/{i}", headers=AUTH).json() for i in accepted]
                return any((j["progress"] or {}).get("step", 0) > 0 for j in jobs)

            wait_until(running, 30, 0.05, "a job running")
            redis_server.kill()  # a crash: SIGKILL

            down = client.post("/generate", json={**body, "seed": 99}, headers=AUTH)
            assert_error(down, 503, "redis_unavailable")
            assert int(down.headers["retry-after"]) > 0
            assert_error(client.get(f"/jobs/{accepted[0]}", headers=AUTH), 503, "redis_unavailable")
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["redis"] is False
            assert ready.headers["retry-after"]
            assert client.get("/healthz").status_code == 200
            time.sleep(1.5)  # the busy worker meets the outage too

            redis_server.start()  # same port, same AOF
            recovery_s = wait_until(
                lambda: client.get("/readyz").status_code == 200, 30, 0.05, "ready"
            )
            assert recovery_s < 15

            def all_ended() -> bool:
                states = [client.get(f"/jobs/{i}", headers=AUTH).json()["status"] for i in accepted]
                return all(s in ("succeeded", "failed", "canceled") for s in states)

            wait_until(all_ended, 60, 0.05, "every accepted job ended")
            jobs = [client.get(f"/jobs/{i}", headers=AUTH).json() for i in accepted]
            assert [j["status"] for j in jobs] == ["succeeded"] * len(accepted), [
                j["error"] for j in jobs
            ]
            after = client.post(
                "/generate",
                json={**body, "num_inference_steps": 5, "seed": 7},
                headers={**AUTH, "Prefer": "wait=30"},
            )
            assert after.status_code == 200 and after.json()["status"] == "succeeded"
    finally:
        assert handle.stop(timeout=30)
        assert handle.error is None, handle.error
