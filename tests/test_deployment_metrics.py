"""/metrics of a deployment: two gateway processes (two apps, each its own `Telemetry`) and a
batching worker on one Redis (an in-process fakeredis server, as in the embedded mode). The jobs
the worker ends show up in the metrics of both gateways, and both render the same totals."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
import torch
from fastapi.testclient import TestClient
from rq.queue import Queue

from ddserve.job_metrics import job_metrics_key
from ddserve.jobs import JOB_FUNCTION, queue_name
from ddserve.settings import Settings
from tests.gateway_support import make_app
from tests.tiny_zoo import write_diffusion_model
from tests.worker_doubles import MemoryStorage
from workers.embedded import WorkerHandle, start_worker_thread
from workers.model_pool import ModelPool

MODEL = "tiny-ddpm"
PREFIX = "gwtest"  # make_app's key prefix


def samples(text: str) -> dict[str, float]:
    """Prometheus text → {sample name with labels: value}."""
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[TestClient, TestClient, fakeredis.FakeServer]]:
    torch.set_num_threads(1)
    zoo = tmp_path / "zoo"
    write_diffusion_model(zoo, MODEL)
    a, server = make_app(zoo, tmp_path / "a")
    b, _ = make_app(zoo, tmp_path / "b", server=server)
    settings = Settings(zoo_dir=zoo, key_prefix=PREFIX, models=MODEL, heartbeat_s=0.2)
    worker: WorkerHandle = start_worker_thread(
        settings,
        fakeredis.FakeRedis(server=server),
        pool=ModelPool(settings),
        storage=MemoryStorage(),
    )
    assert worker.ready.wait(30) and worker.error is None, worker.error
    try:
        with TestClient(a) as ca, TestClient(b) as cb:
            yield ca, cb, server
    finally:
        assert worker.stop(timeout=20)


def test_a_workers_jobs_show_in_every_gateways_metrics(
    deployment: tuple[TestClient, TestClient, fakeredis.FakeServer],
) -> None:
    ca, cb, server = deployment
    request = {"model": MODEL, "n": 2, "num_inference_steps": 5}
    ids = [ca.post("/generate", json=request | {"seed": s}).json()["id"] for s in range(2)]
    # A job the worker refuses (no request in it): a failed outcome, counted by the worker.
    connection = fakeredis.FakeRedis(server=server)
    refused = Queue(queue_name(PREFIX, MODEL), connection=connection).enqueue_call(
        JOB_FUNCTION, kwargs={}
    )
    deadline = time.monotonic() + 60
    while not (
        all(ca.get(f"/jobs/{i}").json()["status"] == "succeeded" for i in ids)
        and refused.get_status(refresh=True) == "failed"
        # a failure is counted with the worker's next round of writes, just after it ends
        and connection.hget(job_metrics_key(PREFIX, MODEL), "outcome:failed")
    ):
        assert time.monotonic() < deadline, [ca.get(f"/jobs/{i}").json()["status"] for i in ids]
        time.sleep(0.05)

    seen_by_a = samples(ca.get("/metrics").text)  # a adds its requests, then reads
    seen_by_b = samples(cb.get("/metrics").text)
    label = f'model="{MODEL}"'
    for seen in (seen_by_a, seen_by_b):
        assert seen[f'ddserve_job_outcomes_total{{{label},outcome="succeeded"}}'] == 2
        assert seen[f'ddserve_job_outcomes_total{{{label},outcome="failed"}}'] == 1
        assert seen[f"ddserve_images_generated_total{{{label}}}"] == 4
        assert seen[f"ddserve_queue_duration_seconds_count{{{label}}}"] == 3
        assert seen[f"ddserve_compute_duration_seconds_count{{{label}}}"] == 3
        assert seen[f"ddserve_batch_size_count{{{label}}}"] == 2
        assert seen[f"ddserve_steps_per_second_count{{{label}}}"] == 2
        assert seen['ddserve_requests_total{method="POST",route="/generate",status="202"}'] == 2
        assert seen[f"ddserve_workers_alive{{{label}}}"] == 1
        assert seen["ddserve_redis_up"] == 1
    # Whichever gateway answers, the totals are the same (a's scrape itself may be flushed by
    # a's once-a-second write in between: the /metrics route's own counts are left out).
    same = {k: v for k, v in seen_by_a.items() if 'route="/metrics"' not in k}
    assert same == {k: v for k, v in seen_by_b.items() if 'route="/metrics"' not in k}
