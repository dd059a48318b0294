"""API keys, job ownership, the rate limit, the queue-length limit and Idempotency-Key."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from rq.job import Job

from service.auth import KeyConfigError, KeyRing, bearer_token, hash_key, load_keys
from tests.gateway_support import assert_error, make_app, write_config_zoo

ALICE, BOB = "alice-secret-key-123", "bob-secret-key-456"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def client(zoo: Path, tmp_path: Path) -> Iterator[TestClient]:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# team b\nbob:{hash_key(BOB)}  # comment\n\n")
    app, _ = make_app(
        zoo,
        tmp_path,
        auth_enabled=True,
        api_keys=f"alice:{hash_key(ALICE)}",
        api_keys_file=keys_file,
        rate_limit_per_minute=5,
        max_queue_length=4,
    )
    with TestClient(app) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


GEN = {"model": "tiny-ddpm", "class_label": 1, "seed": 1}


def test_keys_parse_and_compare() -> None:
    digest = hash_key("k")
    keys = load_keys(f"{digest}, named:{digest.upper()}", None)
    assert len(keys) == 1 and keys[0].id == digest[:16]  # duplicates by hash kept once
    ring = KeyRing(load_keys(f"a:{hash_key('x')},b:{hash_key('y')}", None))
    assert ring.identify("x") == "a" and ring.identify("y") == "b"
    assert ring.identify("z") is None and ring.identify("") is None
    with pytest.raises(KeyConfigError, match="SHA-256") as info:
        load_keys("plaintext-key", None)
    assert "plaintext-key" not in str(info.value)  # a misplaced secret is never echoed
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None


def test_routes_need_a_key(client: TestClient) -> None:
    routes = [
        ("POST", "/generate"),
        ("GET", "/models"),
        ("GET", "/metrics"),
        ("GET", "/jobs/x"),
        ("POST", "/jobs/x/cancel"),
        ("POST", "/encode"),
    ]
    for method, path in routes:
        body = GEN if method == "POST" else None
        r = client.request(method, path, json=body)
        assert_error(r, 401, "missing_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(
            client.request(method, path, json=body, headers=auth("wrong")), 401, "invalid_api_key"
        )
        basic = {"Authorization": f"Basic {ALICE}"}
        assert_error(client.request(method, path, json=body, headers=basic), 401, "missing_api_key")
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200  # Redis answers (no worker needed), no 401
    assert client.get("/models", headers=auth(ALICE)).status_code == 200
    assert client.get("/metrics", headers=auth(BOB)).status_code == 200  # a key from the file


def test_auth_comes_before_body_validation(client: TestClient) -> None:
    assert_error(client.post("/generate", json={"n": 99}), 401, "missing_api_key")


def test_a_key_sees_only_its_own_jobs(client: TestClient) -> None:
    r = client.post("/generate", json=GEN, headers=auth(ALICE))
    assert r.status_code == 202
    job_id = r.json()["id"]
    conn = client.app.state.ddserve.connection
    assert Job.fetch(job_id, connection=conn).meta["owner"] == "alice"
    assert client.get(f"/jobs/{job_id}", headers=auth(ALICE)).status_code == 200
    assert_error(client.get(f"/jobs/{job_id}", headers=auth(BOB)), 404, "job_not_found")
    assert_error(client.post(f"/jobs/{job_id}/cancel", headers=auth(BOB)), 404, "job_not_found")
    assert client.get(f"/jobs/{job_id}", headers=auth(ALICE)).json()["status"] == "queued"


def test_rate_limit_per_key(client: TestClient) -> None:
    for _ in range(4):
        assert client.post("/generate", json=GEN, headers=auth(ALICE)).status_code == 202
    # the fifth request passes the rate limit (5/min) but finds the queue full (4)
    full = client.post("/generate", json=GEN, headers=auth(ALICE))
    assert_error(full, 429, "queue_full")
    assert int(full.headers["retry-after"]) > 0
    limited = client.post("/generate", json=GEN, headers=auth(ALICE))
    assert_error(limited, 429, "rate_limited")
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert_error(client.post("/generate", json=GEN, headers=auth(BOB)), 429, "queue_full")


def test_queue_limit_counts_queued_and_running(zoo: Path, tmp_path: Path) -> None:
    app, _ = make_app(zoo, tmp_path, max_queue_length=2)
    with TestClient(app) as client:
        first = client.post("/generate", json=GEN).json()["id"]
        client.post("/generate", json=GEN)
        assert_error(client.post("/generate", json=GEN), 429, "queue_full")
        conn = app.state.ddserve.connection
        assert conn.llen("rq:queue:gwtest:tiny-ddpm") == 2
        assert len(list(conn.scan_iter("rq:job:*"))) == 2  # the refused job was taken back
        assert (
            client.post(
                "/generate", json={**GEN, "model": "tiny-text", "class_label": None}
            ).status_code
            == 202
        )  # another model's queue
        # a worker takes the first job: queued 1 + started 1 is still 2
        conn.lrem("rq:queue:gwtest:tiny-ddpm", 0, first)
        conn.zadd("rq:wip:gwtest:tiny-ddpm", {f"{first}:exec": 9e9})
        assert_error(client.post("/generate", json=GEN), 429, "queue_full")
        conn.zrem("rq:wip:gwtest:tiny-ddpm", f"{first}:exec")
        assert client.post("/generate", json=GEN).status_code == 202


def test_idempotency_key(client: TestClient) -> None:
    headers = {**auth(ALICE), "Idempotency-Key": "order-42"}
    first = client.post("/generate", json=GEN, headers=headers)
    again = client.post("/generate", json=GEN, headers=headers)
    assert first.status_code == 202 and again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["input"]["seed"] == first.json()["input"]["seed"]
    # the seed is part of the job, so even a request without one replays the same images
    unseeded = {"model": "tiny-ddpm"}
    h2 = {**auth(ALICE), "Idempotency-Key": "order-43"}
    a = client.post("/generate", json=unseeded, headers=h2).json()
    b = client.post("/generate", json=unseeded, headers=h2).json()
    assert a["id"] == b["id"] and a["input"]["seed"] == b["input"]["seed"]
    assert_error(
        client.post("/generate", json={**GEN, "n": 2}, headers=headers),
        422,
        "idempotency_key_reused",
        "Idempotency-Key",
    )
    other = client.post("/generate", json=GEN, headers={**auth(BOB), "Idempotency-Key": "order-42"})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]  # per key owner
    assert_error(
        client.post("/generate", json=GEN, headers={**auth(ALICE), "Idempotency-Key": ""}),
        400,
        "invalid_idempotency_key",
    )


def test_idempotency_claim_is_released_when_refused(zoo: Path, tmp_path: Path) -> None:
    app, _ = make_app(zoo, tmp_path, max_queue_length=1)
    with TestClient(app) as client:
        client.post("/generate", json=GEN)
        headers = {"Idempotency-Key": "k1"}
        assert_error(client.post("/generate", json=GEN, headers=headers), 429, "queue_full")
        app.state.ddserve.connection.delete("rq:queue:gwtest:tiny-ddpm")
        retry = client.post("/generate", json=GEN, headers=headers)
        assert retry.status_code == 202 and "idempotent-replayed" not in retry.headers


def test_no_secret_in_logs(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client.post("/generate", json=GEN, headers=auth(ALICE))
    client.get("/models", headers=auth("wrong-key-789"))
    job = client.post("/generate", json=GEN, headers=auth(ALICE)).json()
    client.get(f"/jobs/{job['id']}", headers=auth(ALICE))
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert "/generate" in text  # the access log did run
    for secret in (ALICE, "wrong-key-789", hash_key(ALICE), "test-secret"):
        assert secret not in text
