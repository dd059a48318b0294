"""`GET /jobs`: the caller's own jobs, newest first, cursor pagination, status and model filters;
never another key's jobs. The real Redis at 127.0.0.1:6379 under a private prefix, no worker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from ddserve.settings import Settings
from service.app import create_app
from service.auth import hash_key
from tests.gateway_support import assert_error, png_b64, write_config_zoo
from tests.redis_sandbox import redis_or_skip

ALICE, BOB = "alice-key-1", "bob-key-2"

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def prefix() -> str:
    return f"ddtest-list-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def connection(prefix: str) -> Iterator[Redis]:
    """The real Redis; afterwards every key of the test's prefix and of its jobs is deleted."""
    redis = redis_or_skip()
    yield redis
    job_keys = [k for k in redis.scan_iter(match=f"*{prefix}*", count=1000)]
    ids = {m.decode() for k in job_keys if b"jobs-of" in k for m in redis.zrange(k, 0, -1)}
    for job_id in ids:
        for key in redis.scan_iter(match=f"rq:*{job_id}*", count=1000):
            redis.delete(key)
    if job_keys:
        redis.delete(*job_keys)


@pytest.fixture
def client(zoo: Path, tmp_path: Path, connection: Redis, prefix: str) -> Iterator[TestClient]:
    settings = Settings(
        zoo_dir=zoo,
        storage_dir=tmp_path / "images",
        signing_secret="test-secret",
        key_prefix=prefix,
        auth_enabled=True,
        api_keys=f"alice:{hash_key(ALICE)},bob:{hash_key(BOB)}",
        redis_url="redis://127.0.0.1:6379/0",
        max_queue_length=1000,
    )
    with TestClient(create_app(settings, connection)) as test_client:
        yield test_client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def submit(client: TestClient, key: str, body: dict) -> str:
    answer = client.post("/generate", json=body, headers=auth(key))
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def test_pages_newest_first_and_only_the_callers_own(client: TestClient) -> None:
    mine = [submit(client, ALICE, {"model": "tiny-ddpm", "seed": i}) for i in range(7)]
    theirs = submit(client, BOB, {"model": "tiny-ddpm", "seed": 99})
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/jobs", params=params, headers=auth(ALICE)).json()
        assert len(page["data"]) <= 3
        seen += [job["id"] for job in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(mine))  # newest first, each once, none of Bob's
    assert theirs not in seen
    bobs = client.get("/jobs", headers=auth(BOB)).json()
    assert [job["id"] for job in bobs["data"]] == [theirs] and bobs["next_cursor"] is None


def test_filters_by_status_and_model(client: TestClient) -> None:
    generate = submit(client, ALICE, {"model": "tiny-ddpm", "seed": 1})
    encode = submit_encode(client)
    canceled = submit(client, ALICE, {"model": "tiny-ddpm", "seed": 2})
    assert client.post(f"/jobs/{canceled}/cancel", headers=auth(ALICE)).status_code == 200
    by_model = client.get("/jobs", params={"model": "tiny-ae"}, headers=auth(ALICE)).json()
    assert [job["id"] for job in by_model["data"]] == [encode]
    by_status = client.get("/jobs", params={"status": "canceled"}, headers=auth(ALICE)).json()
    assert [job["id"] for job in by_status["data"]] == [canceled]
    queued = client.get("/jobs", params={"status": "queued"}, headers=auth(ALICE)).json()
    assert [job["id"] for job in queued["data"]] == [encode, generate]


def submit_encode(client: TestClient) -> str:
    answer = client.post(
        "/encode", json={"model": "tiny-ae", "images": [png_b64()]}, headers=auth(ALICE)
    )
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def test_an_expired_job_leaves_the_list(client: TestClient, connection: Redis) -> None:
    kept = submit(client, ALICE, {"model": "tiny-ddpm", "seed": 1})
    gone = submit(client, ALICE, {"model": "tiny-ddpm", "seed": 2})
    connection.delete(f"rq:job:{gone}")  # as RQ's TTL would
    page = client.get("/jobs", headers=auth(ALICE)).json()
    assert [job["id"] for job in page["data"]] == [kept]


def test_bad_queries_are_clear_4xx(client: TestClient) -> None:
    assert_error(
        client.get("/jobs", params={"cursor": "nope"}, headers=auth(ALICE)),
        400,
        "invalid_cursor",
        "cursor",
    )
    assert client.get("/jobs", params={"limit": 0}, headers=auth(ALICE)).status_code == 422
    assert client.get("/jobs", params={"limit": 101}, headers=auth(ALICE)).status_code == 422
    assert client.get("/jobs", params={"status": "done"}, headers=auth(ALICE)).status_code == 422
    assert_error(client.get("/jobs"), 401, "missing_api_key")
