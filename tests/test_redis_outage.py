"""Redis crashes and comes back (a private redis-server with AOF, as in the compose file): while it
is down the gateway answers 503 with Retry-After (never 500) and /readyz is red; when it is back,
the gateway and a busy worker recover by themselves, and every job accepted before the crash still
ends `succeeded`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from ddserve.settings import Settings
from service.app import connect, create_app
from service.auth import hash_key
from tests.gateway_support import assert_error
from tests.redis_server import RedisServer, redis_server_available
from tests.tiny_zoo import write_diffusion_model
from workers.embedded import start_worker_thread

pytestmark = [
    pytest.mark.skipif(not redis_server_available(), reason="needs redis-server"),
    pytest.mark.timeout(120),
]
MODEL = "tiny-ddpm"
KEY = "outage-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def wait_for(predicate, timeout_s: float, what: str) -> float:
    """Seconds until `predicate()` holds (AssertionError after timeout_s)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.05)
    return time.monotonic() - started


def test_gateway_and_worker_ride_out_a_redis_crash(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    zoo = tmp_path / "zoo"
    write_diffusion_model(zoo, MODEL)
    settings = Settings(
        redis_url=redis_server.url,
        key_prefix="outage",
        zoo_dir=zoo,
        storage_dir=tmp_path / "images",
        signing_secret="outage-secret",
        api_keys=f"tester:{hash_key(KEY)}",
        device="cpu",
        progress_every=1,
        heartbeat_s=0.5,
        log_level="WARNING",
    )
    handle = start_worker_thread(settings, Redis.from_url(redis_server.url), name="outage-worker")
    try:
        assert handle.ready.wait(60) and handle.error is None, handle.error
        with TestClient(create_app(settings, connect(settings))) as client:
            wait_for(lambda: client.get("/readyz").status_code == 200, 30, "ready")
            body = {"model": MODEL, "n": 2, "sampler": "ddpm", "num_inference_steps": 300}
            accepted = []
            for seed in range(6):
                r = client.post("/generate", json={**body, "seed": seed}, headers=AUTH)
                assert r.status_code == 202, r.text
                accepted.append(r.json()["id"])

            def running() -> bool:
                jobs = [client.get(f"/jobs/{i}", headers=AUTH).json() for i in accepted]
                return any((j["progress"] or {}).get("step", 0) > 0 for j in jobs)

            wait_for(running, 30, "a job running")
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
            recovery_s = wait_for(lambda: client.get("/readyz").status_code == 200, 30, "ready")
            assert recovery_s < 15

            def all_ended() -> bool:
                states = [client.get(f"/jobs/{i}", headers=AUTH).json()["status"] for i in accepted]
                return all(s in ("succeeded", "failed", "canceled") for s in states)

            wait_for(all_ended, 60, "every accepted job ended")
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
