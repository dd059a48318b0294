"""The embedded mode's worker: a thread on a fakeredis connection (the gateway's in-process Redis),
no signal handlers, timer death penalty, stopped warmly from another thread."""

from __future__ import annotations

import time
from pathlib import Path

import fakeredis
import torch
from rq.queue import Queue
from rq.timeouts import TimerDeathPenalty

from ddserve.jobs import JOB_FUNCTION, queue_name
from ddserve.settings import Settings
from models.registry import write_entry
from tests import specs
from tests.tiny_zoo import write_diffusion_model
from tests.worker_doubles import MemoryStorage
from workers.embedded import start_worker_thread
from workers.model_pool import ModelPool


def test_worker_thread_on_fakeredis_runs_jobs_and_stops(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    write_diffusion_model(tmp_path / "zoo", "tiny-ddpm")
    evaluation_only = {  # a model with no task to serve (weights never loaded)
        "name": "eval-classifier",
        "kind": "classifier",
        "dataset": "digits",
        "image": {"channels": 1, "height": 8, "width": 8},
    }
    write_entry(tmp_path / "zoo" / "eval-classifier", evaluation_only)
    settings = Settings(zoo_dir=tmp_path / "zoo", key_prefix="emb", heartbeat_s=0.2)
    server = fakeredis.FakeServer()
    gateway_side = fakeredis.FakeRedis(server=server)
    storage = MemoryStorage()
    handle = start_worker_thread(
        settings,
        fakeredis.FakeRedis(server=server),
        pool=ModelPool(settings),
        storage=storage,
    )
    assert handle.ready.wait(30) and handle.error is None, handle.error
    assert handle.worker is not None and handle.worker.death_penalty_class is TimerDeathPenalty
    assert handle.worker.models == ["tiny-ddpm"]  # every zoo model with a task
    queue = Queue(queue_name("emb", "tiny-ddpm"), connection=gateway_side)
    request = specs.generate("tiny-ddpm", n=2, num_inference_steps=5)
    jobs = [
        queue.enqueue_call(JOB_FUNCTION, kwargs={"request": request | {"seed": s}})
        for s in range(3)
    ]
    deadline = time.monotonic() + 30
    while not all(j.get_status(refresh=True) == "finished" for j in jobs):
        assert time.monotonic() < deadline, [j.get_status() for j in jobs]
        time.sleep(0.05)
    output = jobs[0].return_value()
    assert [image["key"] for image in output["images"]] == [
        f"{jobs[0].id}/0.png",
        f"{jobs[0].id}/1.png",
    ]
    assert storage.get(output["images"][1]["key"]).startswith(b"\x89PNG")
    assert handle.worker.engine.stats.network_calls < 3 * 5  # the three jobs shared calls
    assert handle.stop(timeout=10)
    assert not handle.alive and handle.error is None


def test_start_failure_is_reported_not_raised(tmp_path: Path) -> None:
    settings = Settings(zoo_dir=tmp_path / "empty-zoo", key_prefix="emb2")
    handle = start_worker_thread(settings, fakeredis.FakeRedis(), storage=MemoryStorage())
    assert handle.ready.wait(10)
    assert isinstance(handle.error, ValueError) and "no models" in str(handle.error)
    assert handle.stop(timeout=5)
