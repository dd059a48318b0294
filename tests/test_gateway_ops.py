"""Operations: health and readiness, Redis outages (503), metrics, logs and request ids, the
OpenAPI document, Prefer: wait, cancel of a queued job, signed image links, cleanup, and the
gateway's independence from torch. fakeredis, no worker."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from rq import Queue, Worker
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry

from ddserve.job_metrics import JobOutcome, record_outcome
from ddserve.logs import JsonFormatter, RequestIdFilter
from ddserve.settings import Settings
from models.catalog import load_catalog
from service.cli import banner, example_request
from service.submission import prefer_wait
from tests.gateway_support import assert_error, make_app, png_b64, write_config_zoo

ROOT = Path(__file__).resolve().parents[1]
GEN = {"model": "tiny-ddpm", "class_label": 1, "seed": 1}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def app_server(zoo: Path, tmp_path: Path):
    return make_app(zoo, tmp_path)


@pytest.fixture
def client(app_server) -> Iterator[TestClient]:
    with TestClient(app_server[0]) as c:
        yield c


def _availability(client: TestClient) -> dict[str, tuple[int | None, bool | None]]:
    models = client.get("/models").json()["models"]
    return {m["name"]: (m["workers"], m["available"]) for m in models}


def test_readiness_follows_redis_only_and_models_report_their_workers(
    client: TestClient, app_server
) -> None:
    """A gateway with Redis is ready even when no worker serves some model (its jobs wait in the
    queue): a 503 there would take every gateway pod out of the Kubernetes Service. Which models
    have workers is in /models (and /metrics)."""
    _, server = app_server
    served = {"tiny-ddpm", "tiny-text", "tiny-ae", "tiny-vae", "tiny-vq"}
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200, r.json()
    assert r.json()["ready"] is True and r.json()["redis"] is True
    assert set(r.json()["missing"]) == served  # reported, not acted on
    assert _availability(client) == dict.fromkeys(served, (0, False))
    assert client.post("/generate", json=GEN).status_code == 202  # ready means: accepts jobs
    conn = client.app.state.ddserve.connection
    queues = [Queue(f"gwtest:{m}", connection=conn) for m in ("tiny-ddpm", "tiny-text")]
    Worker(queues, connection=conn, name="w-diffusion").register_birth()
    partial = client.get("/readyz")
    assert partial.status_code == 200 and partial.json()["workers"]["tiny-ddpm"] == 1
    assert set(partial.json()["missing"]) == {"tiny-ae", "tiny-vae", "tiny-vq"}
    availability = _availability(client)
    assert availability["tiny-ddpm"] == (1, True) and availability["tiny-text"] == (1, True)
    assert availability["tiny-ae"] == (0, False)
    queues = [Queue(f"gwtest:{m}", connection=conn) for m in ("tiny-ae", "tiny-vae", "tiny-vq")]
    worker = Worker(queues, connection=conn, name="w-codec")
    worker.register_birth()
    assert client.get("/readyz").json()["missing"] == []
    assert _availability(client)["tiny-vq"] == (1, True)
    worker.register_death()
    assert client.get("/readyz").status_code == 200
    assert _availability(client)["tiny-vq"] == (0, False)
    server.connected = False
    down = client.get("/readyz")
    assert down.status_code == 503 and down.json()["redis"] is False
    assert down.json()["ready"] is False and down.headers["retry-after"]
    assert client.get("/healthz").status_code == 200  # liveness does not need Redis
    assert _availability(client) == dict.fromkeys(served, (None, None))  # unknown, still 200


def test_redis_down_is_503_never_500(client: TestClient, app_server) -> None:
    job_id = client.post("/generate", json=GEN).json()["id"]
    _, server = app_server
    server.connected = False
    for method, path, body in [
        ("POST", "/generate", GEN),
        ("POST", "/encode", {"model": "tiny-ae", "images": [png_b64()]}),
        ("GET", f"/jobs/{job_id}", None),
        ("POST", f"/jobs/{job_id}/cancel", None),
    ]:
        r = client.request(method, path, json=body)
        assert_error(r, 503, "redis_unavailable")
        assert r.headers["retry-after"] == "5"
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "ddserve_redis_up 0.0" in metrics.text
    assert client.get("/models").status_code == 200  # the catalog needs no Redis
    server.connected = True
    assert client.get(f"/jobs/{job_id}").status_code == 200


def _samples(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_metrics(client: TestClient) -> None:
    conn = client.app.state.ddserve.connection
    ids = [client.post("/generate", json={**GEN, "n": 3}).json()["id"] for _ in range(2)]
    client.post("/generate", json={"model": "nope"})
    # The registries as a worker leaves them: the first job finished (for ddserve_jobs)...
    job = Job.fetch(ids[0], connection=conn)
    conn.lrem("rq:queue:gwtest:tiny-ddpm", 0, job.id)
    job.set_status("finished")
    queue = Queue("gwtest:tiny-ddpm", connection=conn)
    FinishedJobRegistry(queue=queue).add(job, 3600)
    # ...and what that worker counted when it ended the job: it waited 0.5 s and ran 2 s (50
    # steps per image, in network calls of up to 24 rows); another attempt failed.
    pipe = conn.pipeline()
    record_outcome(pipe, "gwtest", JobOutcome("tiny-ddpm", "succeeded", 0.5, 2.0, 3, 24, 50))
    record_outcome(pipe, "gwtest", JobOutcome("tiny-ddpm", "failed", 0.1, 0.2))
    pipe.execute()
    text = client.get("/metrics").text
    lines = set(text.splitlines())
    assert "# TYPE ddserve_requests_total counter" in lines
    assert 'ddserve_requests_total{method="POST",route="/generate",status="202"} 2.0' in lines
    assert 'ddserve_requests_total{method="POST",route="/generate",status="404"} 1.0' in lines
    assert 'ddserve_request_duration_seconds_count{route="/generate"} 3.0' in lines
    assert 'ddserve_queue_depth{model="tiny-ddpm"} 1.0' in lines
    assert 'ddserve_jobs{status="queued"} 1.0' in lines
    assert 'ddserve_jobs{status="succeeded"} 1.0' in lines
    assert 'ddserve_workers_alive{model="tiny-ddpm"} 0.0' in lines
    assert 'ddserve_queue_duration_seconds_bucket{le="0.1",model="tiny-ddpm"} 1.0' in lines
    assert 'ddserve_queue_duration_seconds_bucket{le="0.25",model="tiny-ddpm"} 1.0' in lines
    assert 'ddserve_queue_duration_seconds_bucket{le="0.5",model="tiny-ddpm"} 2.0' in lines
    assert 'ddserve_compute_duration_seconds_bucket{le="2.5",model="tiny-ddpm"} 2.0' in lines
    assert 'ddserve_compute_duration_seconds_bucket{le="+Inf",model="tiny-ddpm"} 2.0' in lines
    assert 'ddserve_images_generated_total{model="tiny-ddpm"} 3.0' in lines
    assert 'ddserve_batch_size_sum{model="tiny-ddpm"} 24.0' in lines
    assert 'ddserve_batch_size_count{model="tiny-ddpm"} 1.0' in lines
    assert 'ddserve_steps_per_second_sum{model="tiny-ddpm"} 25.0' in lines  # 50 steps in 2 s
    assert 'ddserve_job_outcomes_total{model="tiny-ddpm",outcome="failed"} 1.0' in lines
    assert 'ddserve_images_generated_total{model="tiny-text"} 0.0' in lines
    assert "ddserve_redis_up 1.0" in lines
    job.delete()  # its record is gone (expired) before the next scrape: it still counts
    again = _samples(client.get("/metrics").text)  # and reading counts nothing twice
    assert again['ddserve_jobs{status="succeeded"}'] == 0
    assert again['ddserve_images_generated_total{model="tiny-ddpm"}'] == 3
    assert again['ddserve_compute_duration_seconds_count{model="tiny-ddpm"}'] == 2
    assert again['ddserve_requests_total{method="GET",route="/metrics",status="200"}'] == 1


def test_metrics_count_a_canceled_running_job_as_canceled(client: TestClient) -> None:
    """A job canceled while it ran ends as RQ's stop-job path leaves it (status `stopped`, in the
    failed-job registry): ddserve_jobs shows it as canceled, and a failed job as failed."""
    conn = client.app.state.ddserve.connection
    queue = Queue("gwtest:tiny-ddpm", connection=conn)
    failed = FailedJobRegistry(queue=queue)
    for status in ("stopped", "failed"):
        job_id = client.post("/generate", json=GEN).json()["id"]
        job = Job.fetch(job_id, connection=conn)
        conn.lrem(queue.key, 0, job.id)
        job.set_status(status)
        failed.add(job, 3600)
    lines = set(client.get("/metrics").text.splitlines())
    assert 'ddserve_jobs{status="canceled"} 1.0' in lines
    assert 'ddserve_jobs{status="failed"} 1.0' in lines


def test_metrics_scrape_passes_promtool_check_metrics(client: TestClient) -> None:
    """Prometheus's own linter on a real scrape with every family filled in (counters end in
    `_total`, units in base units, HELP on every family). promtool: `make promtool` (Debian's
    prometheus package)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed: `make promtool` (Debian's prometheus package)")
    conn = client.app.state.ddserve.connection
    client.post("/generate", json=GEN)
    client.post("/generate", json={"model": "nope"})
    pipe = conn.pipeline()
    record_outcome(pipe, "gwtest", JobOutcome("tiny-ddpm", "succeeded", 0.5, 2.0, 3, 24, 50))
    record_outcome(pipe, "gwtest", JobOutcome("tiny-ddpm", "canceled", 0.1, 0.2))
    pipe.execute()
    client.get("/healthz")
    scrape = client.get("/metrics")
    assert scrape.status_code == 200 and "ddserve_requests_total{" in scrape.text
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=scrape.text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_gateway_process_shows_the_same_totals(zoo: Path, tmp_path: Path) -> None:
    """Two apps on one Redis are two `ddserve serve --workers 2` processes: whichever answers the
    scrape, the requests of both are in it."""
    a, server = make_app(zoo, tmp_path / "a")
    b, _ = make_app(zoo, tmp_path / "b", server=server)
    with TestClient(a) as ca, TestClient(b) as cb:
        ca.get("/healthz")
        ca.get("/healthz")
        cb.get("/healthz")
        b.state.ddserve.telemetry.flush()  # what b's once-a-second write does
        line = 'ddserve_requests_total{method="GET",route="/healthz",status="200"}'
        assert _samples(ca.get("/metrics").text)[line] == 3
        assert _samples(cb.get("/metrics").text)[line] == 3


def test_request_counts_are_written_every_second_and_survive_an_outage(
    client: TestClient, app_server
) -> None:
    conn = client.app.state.ddserve.connection
    client.get("/healthz")
    deadline = time.monotonic() + 5  # the lifespan's flush loop, not a scrape, writes it
    while not conn.hget("gwtest:metrics:requests", "GET 200 /healthz"):
        assert time.monotonic() < deadline, "the request tally was not written"
        time.sleep(0.05)
    _, server = app_server
    server.connected = False
    client.get("/healthz")
    client.get("/healthz")
    assert "ddserve_redis_up 0.0" in client.get("/metrics").text
    server.connected = True
    samples = _samples(client.get("/metrics").text)
    assert samples['ddserve_requests_total{method="GET",route="/healthz",status="200"}'] == 3
    assert samples['ddserve_request_duration_seconds_count{route="/healthz"}'] == 3


def test_request_id_reaches_logs_and_job(client: TestClient) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("ddserve.access")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        r = client.post("/generate", json=GEN, headers={"X-Request-ID": "req-abc.123"})
        generated = client.post("/generate", json=GEN, headers={"X-Request-ID": "bad id\n"})
    finally:
        logger.removeHandler(handler)
    assert r.headers["x-request-id"] == "req-abc.123"
    assert float(r.headers["server-timing"].split("dur=")[1]) > 0
    conn = client.app.state.ddserve.connection
    assert Job.fetch(r.json()["id"], connection=conn).meta["request_id"] == "req-abc.123"
    other = generated.headers["x-request-id"]
    assert other != "bad id\n" and len(other) == 32
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    mine = [rec for rec in records if rec["request_id"] == "req-abc.123"]
    assert mine and mine[0]["status"] == 202 and mine[0]["route"] == "/generate"
    assert mine[0]["level"] == "INFO" and "duration_ms" in mine[0]


def test_openapi_documents_the_contract(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    expected = {
        "/generate": "post",
        "/encode": "post",
        "/decode": "post",
        "/reconstruct": "post",
        "/inpaint": "post",
        "/img2img": "post",
        "/jobs/{job_id}": "get",
        "/jobs/{job_id}/cancel": "post",
        "/images/{key}": "get",
        "/models": "get",
        "/healthz": "get",
        "/readyz": "get",
        "/metrics": "get",
    }
    for path, method in expected.items():
        assert method in paths[path], path
    generate = paths["/generate"]["post"]
    assert {p["name"] for p in generate["parameters"]} == {"Prefer", "Idempotency-Key"}
    for status in ("200", "202", "400", "401", "404", "413", "422", "429", "503"):
        assert status in generate["responses"], status
    assert generate["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    gen = schemas["GenerateBody"]["properties"]
    assert gen["n"]["maximum"] == 16 and gen["n"]["minimum"] == 1
    assert gen["eta"]["anyOf"][0]["maximum"] == 1.0
    guidance = gen["guidance_scale"]["anyOf"][0]
    assert guidance["minimum"] == 1.0 and guidance["maximum"] == 21.0  # s, as in diffusers
    assert "return" in schemas["OutputOptions"]["properties"]
    job = schemas["Job"]["properties"]
    for field in ("id", "status", "queue_position", "progress", "input", "output", "metrics"):
        assert field in job


def test_prefer_wait(client: TestClient) -> None:
    assert prefer_wait("wait=5", 60) == 5 and prefer_wait("respond-async, wait=100", 60) == 60
    assert prefer_wait("wait=10", 2.5) == 2.5 and prefer_wait("return=minimal", 60) is None
    assert prefer_wait(None, 60) is None
    t0 = time.monotonic()
    r = client.post("/generate", json=GEN, headers={"Prefer": "wait=0.3"})
    assert r.status_code == 202 and time.monotonic() - t0 >= 0.3
    assert r.headers["preference-applied"] == "wait=0.3"
    conn = client.app.state.ddserve.connection

    def finish_soon() -> None:  # a stand-in worker: the newest queued job finishes after 0.2 s
        time.sleep(0.2)
        job_id = conn.lindex("rq:queue:gwtest:tiny-ddpm", -1).decode()
        Job.fetch(job_id, connection=conn).set_status("finished")

    thread = threading.Thread(target=finish_soon)
    thread.start()
    t0 = time.monotonic()
    done = client.post("/generate", json=GEN, headers={"Prefer": "wait=10"})
    thread.join()
    assert done.status_code == 200 and done.json()["status"] == "succeeded"
    assert time.monotonic() - t0 < 5


def test_cancel_a_queued_job(client: TestClient) -> None:
    first = client.post("/generate", json=GEN).json()
    second = client.post("/generate", json=GEN).json()
    r = client.post(f"/jobs/{first['id']}/cancel")
    assert r.status_code == 200
    job = r.json()
    assert job["status"] == "canceled" and job["completed_at"] is not None
    conn = client.app.state.ddserve.connection
    assert conn.lrange("rq:queue:gwtest:tiny-ddpm", 0, -1) == [second["id"].encode()]
    assert client.get(f"/jobs/{second['id']}").json()["queue_position"] == 0
    again = client.post(f"/jobs/{first['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "canceled"


def test_signed_image_links(client: TestClient) -> None:
    storage = client.app.state.ddserve.storage
    storage.put("job-1/0.png", b"\x89PNG-bytes", "image/png")
    url = storage.url("job-1/0.png", "http://testserver")
    r = client.get(url)
    assert r.status_code == 200 and r.content == b"\x89PNG-bytes"
    assert r.headers["content-type"] == "image/png"
    tampered = url.replace("sig=", "sig=0")
    assert_error(client.get(tampered), 404, "image_not_found")
    assert_error(client.get(url.replace("0.png", "1.png")), 404, "image_not_found")
    assert_error(client.get("/images/job-1/0.png"), 404, "image_not_found")
    expired = "/images/job-1/0.png?expires=1&sig=" + storage.signer.signature("job-1/0.png", 1)
    assert_error(client.get(expired), 404, "image_not_found")


def test_job_output_keys_become_links(client: TestClient) -> None:
    from rq.results import Result

    conn = client.app.state.ddserve.connection
    job_id = client.post("/generate", json={**GEN, "n": 1}).json()["id"]
    job = Job.fetch(job_id, connection=conn)
    job.set_status("finished")
    output = {
        "images": [{"key": f"{job_id}/0.png", "width": 8, "height": 8, "seed": 1}],
        "latents": None,
        "trajectory_key": f"{job_id}/trajectory.gif",
    }
    Result.create(job, Result.Type.SUCCESSFUL, ttl=60, return_value=output)
    view = client.get(f"/jobs/{job_id}").json()
    assert view["status"] == "succeeded"
    image = view["output"]["images"][0]
    assert image["url"].startswith(f"http://testserver/images/{job_id}/0.png?expires=")
    assert (image["width"], image["height"], image["seed"]) == (8, 8, 1)
    assert "/trajectory.gif?" in view["output"]["trajectory_url"]


def test_janitor_cleans_images_and_cancel_requests(client: TestClient) -> None:
    state = client.app.state.ddserve
    janitor = client.app.state.janitor
    state.storage.put("old-job/0.png", b"x", "image/png")
    state.storage.put("new-job/0.png", b"y", "image/png")
    old = time.time() - 2 * state.settings.image_ttl_s
    os.utime(state.storage.root / "old-job" / "0.png", (old, old))
    job_id = client.post("/generate", json=GEN).json()["id"]
    client.post(f"/jobs/{job_id}/cancel")
    state.connection.sadd(state.store.cancel_key, "vanished-job")
    report = janitor.run_once()
    assert report.ran and report.images_deleted == 1 and report.cancels_pruned == 2
    assert state.storage.get("new-job/0.png") == b"y"
    assert state.connection.scard(state.store.cancel_key) == 0
    assert not janitor.run_once().ran  # another round within the interval waits its turn


def test_gateway_never_imports_torch(zoo: Path, tmp_path: Path) -> None:
    code = f"""
import sys
from fastapi.testclient import TestClient
from ddserve.cli import main
from ddserve.job_metrics import JobOutcome, record_outcome
from ddserve.settings import Settings
import service.cli
from service.app import create_app
app = create_app(Settings(zoo_dir={str(zoo)!r}, storage_dir={str(tmp_path)!r}, auth_enabled=False))
with TestClient(app) as client:
    assert client.post("/generate", json={{"model": "tiny-ddpm"}}).status_code == 202
    assert client.post("/encode", json={{"model": "tiny-ae", "images": [{png_b64()!r}]}}).status_code == 202
heavy = [m for m in ("torch", "onnxruntime", "workers", "models.registry") if m in sys.modules]
assert not heavy, heavy
"""
    env = {**os.environ, "DDSERVE_REDIS_URL": ""}
    env.pop("DDSERVE_REDIS_URL")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_startup_banner(zoo: Path) -> None:
    catalog = load_catalog(zoo)
    route, body = example_request(catalog, ["tiny-ae", "tiny-text", "tiny-ddpm"])
    assert route == "/generate" and body["model"] == "tiny-text" and body["prompt"] == "red cross"
    route, body = example_request(catalog, ["tiny-ddpm"])
    assert body == {"model": "tiny-ddpm", "n": 4, "seed": 1234, "class_label": 2}
    text = banner("http://127.0.0.1:8000", Settings(auth_enabled=False), route, body)
    assert "http://127.0.0.1:8000/docs" in text
    assert "curl -s -X POST http://127.0.0.1:8000/generate" in text and "Prefer: wait=60" in text
    assert '"class_label": 2' in text and "Authorization" not in text
    assert example_request(catalog, ["tiny-ae"]) == ("/models", {})


@pytest.mark.redis
def test_cancel_a_queued_job_on_real_redis(zoo: Path, tmp_path: Path) -> None:
    """The same cancel against the real Redis (no worker, so the jobs stay queued)."""
    import uuid

    import redis

    from service.app import create_app

    connection = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    prefix = f"gwreal-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        redis_url="redis://127.0.0.1:6379/0",
        key_prefix=prefix,
        zoo_dir=zoo,
        storage_dir=tmp_path,
        auth_enabled=False,
    )
    ids: list[str] = []
    try:
        with TestClient(create_app(settings, connection)) as client:
            ids = [client.post("/generate", json=GEN).json()["id"] for _ in range(3)]
            assert client.get(f"/jobs/{ids[2]}").json()["queue_position"] == 2
            canceled = client.post(f"/jobs/{ids[1]}/cancel").json()
            assert canceled["status"] == "canceled" and canceled["completed_at"]
            assert client.get(f"/jobs/{ids[2]}").json()["queue_position"] == 1
            queue = f"rq:queue:{prefix}:tiny-ddpm"
            assert [i.decode() for i in connection.lrange(queue, 0, -1)] == [ids[0], ids[2]]
            assert client.get(f"/jobs/{ids[1]}").json()["status"] == "canceled"
    finally:
        keys = list(connection.scan_iter(match=f"*{prefix}*"))
        keys += [f"rq:job:{job_id}" for job_id in ids]
        if keys:
            connection.delete(*keys)
