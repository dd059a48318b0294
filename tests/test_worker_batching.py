"""The batching worker against real Redis and RQ: jobs enqueued as the gateway enqueues them are
batched across jobs, each ends exactly as RQ ends a job, cancellation works queued and running, a
deadline fails only its job, and autoencoder jobs run through ONNX Runtime."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from rq.job import Job, Retry
from rq.registry import StartedJobRegistry

from ddserve.jobs import META_BATCH_SIZE, META_ERROR, META_PROGRESS, cancel_set_key
from ddserve.settings import Settings
from ddserve.spec import parse_job_spec
from tests import specs
from tests.redis_sandbox import RedisSandbox, status, wait_terminal, wait_until
from tests.tiny_zoo import write_diffusion_model, write_onnx_autoencoder
from tests.worker_doubles import MemoryStorage
from workers.embedded import WorkerHandle, start_worker_thread
from workers.execute import run_alone
from workers.model_pool import ModelPool

pytestmark = pytest.mark.redis
MODEL, CODEC = "tiny-ddpm", "tiny-kl"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    write_diffusion_model(root, MODEL)
    write_onnx_autoencoder(root, CODEC)
    return root


@pytest.fixture(scope="module")
def pool(zoo: Path) -> ModelPool:
    torch.set_num_threads(1)
    return ModelPool(Settings(zoo_dir=zoo, device="cpu"))


class Running:
    """A worker thread over the sandbox's queues, stopped (warmly) at the end of the test."""

    def __init__(self, box: RedisSandbox, pool: ModelPool, **settings: Any) -> None:
        self.storage = MemoryStorage()
        self.settings = Settings(
            zoo_dir=pool.settings.zoo_dir,
            key_prefix=box.prefix,
            models=f"{MODEL},{CODEC}",
            heartbeat_s=0.2,
            **settings,
        )
        self.handle: WorkerHandle = start_worker_thread(
            self.settings, box.connection, pool=pool, storage=self.storage, name=f"{box.prefix}-w"
        )
        box.worker_names.append(f"{box.prefix}-w")
        assert self.handle.ready.wait(30) and self.handle.error is None, self.handle.error
        assert self.handle.worker is not None
        self.worker = self.handle.worker
        self.engine = self.worker.engine

    def pixels(self, job: Job, index: int = 0) -> np.ndarray:
        key = job.return_value()["images"][index]["key"]
        return np.asarray(Image.open(io.BytesIO(self.storage.get(key))), dtype=np.int16)

    def stop(self) -> None:
        assert self.handle.stop(timeout=20)


@pytest.fixture
def running(box: RedisSandbox, pool: ModelPool, request: pytest.FixtureRequest) -> Iterator[Any]:
    workers: list[Running] = []

    def start(**settings: Any) -> Running:
        worker = Running(box, pool, **settings)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def generate(seed: int, **fields: Any) -> dict[str, Any]:
    """A full generate spec, as the gateway enqueues it; guided (s = 3) on the odd seeds."""
    base: dict[str, Any] = {
        "num_inference_steps": 8,
        "class_label": seed % 10,
        "guidance_scale": 3.0 if seed % 2 else 1.0,
        "seed": seed,
    }
    return specs.generate(MODEL, **{**base, **fields})


def alone_pixels(pool: ModelPool, request: dict[str, Any]) -> np.ndarray:
    storage = MemoryStorage()
    output = run_alone(parse_job_spec(request), pool, storage, "alone")
    key = output["images"][0]["key"]
    return np.asarray(Image.open(io.BytesIO(storage.get(key))), dtype=np.int16)


@pytest.mark.parametrize("overlap_redis", [True, False], ids=["redis-beside-step", "redis-first"])
def test_sixteen_concurrent_jobs_share_network_calls_and_equal_alone(
    box: RedisSandbox, pool: ModelPool, running: Any, overlap_redis: bool
) -> None:
    requests = [generate(seed, num_inference_steps=6 + seed % 3) for seed in range(16)]
    jobs = [box.enqueue(MODEL, r, timeout=60) for r in requests]
    worker = running(overlap_redis=overlap_redis)
    wait_terminal(jobs)
    assert [status(j) for j in jobs] == ["finished"] * 16
    assert worker.engine.stats.network_calls < 16
    for job, request in zip(jobs, requests, strict=True):
        # ≤ 1e-4 in x_0 (tests/test_engine.py); here, after 8-bit rounding, at most one level.
        assert np.abs(worker.pixels(job) - alone_pixels(pool, request)).max() <= 1
        meta = job.get_meta(refresh=True)
        assert meta[META_BATCH_SIZE] > 1
        assert meta[META_PROGRESS]["step"] == meta[META_PROGRESS]["total"] == 6 + job_seed(job) % 3
        assert job.return_value()["images"][0]["seed"] == job_seed(job)


def job_seed(job: Job) -> int:
    return int(job.kwargs["request"]["seed"])


def test_a_newcomer_joins_the_running_batch(
    box: RedisSandbox, pool: ModelPool, running: Any
) -> None:
    worker = running(progress_every=1)
    long_job = box.enqueue(MODEL, generate(1, sampler="ddpm", num_inference_steps=150))
    wait_until(
        lambda: (long_job.get_meta(refresh=True).get(META_PROGRESS) or {}).get("step", 0) > 2
    )
    short_job = box.enqueue(MODEL, generate(2, num_inference_steps=5))
    wait_terminal([short_job])
    assert status(short_job) == "finished" and status(long_job) == "started"
    assert short_job.get_meta(refresh=True)[META_BATCH_SIZE] == 1 + 2  # ran beside the long job
    assert (
        np.abs(
            worker.pixels(short_job) - alone_pixels(pool, generate(2, num_inference_steps=5))
        ).max()
        <= 1
    )
    wait_terminal([long_job])
    assert status(long_job) == "finished"


def test_cancel_while_queued(box: RedisSandbox, running: Any) -> None:
    canceled = box.enqueue(MODEL, generate(1))
    raced = box.enqueue(MODEL, generate(2))
    kept = box.enqueue(MODEL, generate(3))
    # The gateway's cancel: flag it, take it out of the queue, mark it canceled.
    box.connection.sadd(cancel_set_key(box.prefix), canceled.id, raced.id)
    assert box.connection.lrem(box.queue(MODEL).key, 0, canceled.id) == 1
    canceled.cancel()
    # `raced` stays in the queue (the worker won the race to it): the flag alone must stop it.
    worker = running()
    wait_terminal([raced, kept])
    assert status(canceled) == "canceled"
    assert status(raced) == "stopped"  # → public status "canceled"
    assert status(kept) == "finished"
    assert worker.engine.stats.jobs_canceled == 1


def test_cancel_while_running(box: RedisSandbox, running: Any) -> None:
    worker = running(progress_every=1)
    doomed = box.enqueue(
        MODEL, generate(1, sampler="ddpm", num_inference_steps=400), retry=Retry(max=1)
    )
    kept = box.enqueue(MODEL, generate(2, num_inference_steps=40))
    wait_until(lambda: (doomed.get_meta(refresh=True).get(META_PROGRESS) or {}).get("step", 0) >= 3)
    registry = StartedJobRegistry(queue=box.queue(MODEL))
    assert doomed.id in registry.get_job_ids()
    box.connection.sadd(cancel_set_key(box.prefix), doomed.id)
    wait_terminal([doomed, kept])
    assert status(doomed) == "stopped"  # not retried, although it had a retry
    assert status(kept) == "finished"
    assert (doomed.get_meta(refresh=True)[META_PROGRESS]["step"]) < 400
    assert registry.get_job_ids() == []
    assert worker.engine.idle


def test_deadline_fails_only_that_job_and_is_not_retried(box: RedisSandbox, running: Any) -> None:
    running()
    late = box.enqueue(
        MODEL,
        generate(1, n=8, sampler="ddpm", num_inference_steps=1000, guidance_scale=4.0),
        timeout=1,
        retry=Retry(max=1),
    )
    on_time = box.enqueue(MODEL, generate(2, num_inference_steps=20), timeout=60)
    wait_terminal([late, on_time])
    assert status(late) == "failed" and status(on_time) == "finished"
    error = late.get_meta(refresh=True)[META_ERROR]
    assert error["code"] == "deadline_exceeded" and error["type"] == "timeout_error"
    assert box.queue(MODEL).count == 0  # no retry


def test_bad_request_fails_clearly_without_retry(box: RedisSandbox, running: Any) -> None:
    running()
    bad = box.enqueue(MODEL, generate(1, class_label=42), retry=Retry(max=2))
    good = box.enqueue(MODEL, generate(2))
    wait_terminal([bad, good])
    assert status(bad) == "failed" and status(good) == "finished"
    error = bad.get_meta(refresh=True)[META_ERROR]
    assert error["type"] == "invalid_request_error" and "class_label" in error["message"]


def _b64png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_autoencoder_jobs_run_through_onnx_runtime(box: RedisSandbox, running: Any) -> None:
    worker = running()
    rng = np.random.default_rng(0)
    images = [_b64png(rng.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in range(3)]
    encode = box.enqueue(CODEC, specs.codec("encode", CODEC, images=images))
    wait_terminal([encode])
    latents = encode.return_value()["latents"]
    assert np.asarray(latents).shape == (3, 2, 4, 4)
    decode = box.enqueue(CODEC, specs.codec("decode", CODEC, latents=latents))
    rebuild = box.enqueue(
        CODEC,
        specs.codec(
            "reconstruct",
            CODEC,
            images=images,
            noise={"kind": "masking", "amount": 0.5},
            seed=3,
        ),
    )
    wait_terminal([decode, rebuild])
    assert status(decode) == "finished" and status(rebuild) == "finished"
    decoded = [worker.pixels(decode, i) for i in range(3)]
    rebuilt = [worker.pixels(rebuild, i) for i in range(3)]
    assert all(d.shape == (8, 8) for d in decoded)
    corrupted = rebuild.return_value()["corrupted"]
    assert len(corrupted) == 3 and corrupted[0]["seed"] == 3
    assert any(not np.array_equal(a, b) for a, b in zip(decoded, rebuilt, strict=True))
    # Corruption noise of image i comes from its own stream: the same with fewer images.
    alone = box.enqueue(
        CODEC,
        specs.codec(
            "reconstruct",
            CODEC,
            images=images[:1],
            noise={"kind": "masking", "amount": 0.5},
            seed=3,
        ),
    )
    # `generate` on an autoencoder decodes samples of its latent prior, image i from (seed, i).
    prior = [box.enqueue(CODEC, specs.prior_sample(CODEC, n=n, seed=11)) for n in (3, 1)]
    wait_terminal([alone, *prior])

    def stored(job: Job, record: str, index: int) -> bytes:
        return worker.storage.get(job.return_value()[record][index]["key"])

    assert stored(alone, "corrupted", 0) == stored(rebuild, "corrupted", 0)
    assert stored(alone, "images", 0) == stored(rebuild, "images", 0)
    assert [status(j) for j in prior] == ["finished", "finished"]
    assert len(prior[0].return_value()["images"]) == 3
    assert stored(prior[0], "images", 0) == stored(prior[1], "images", 0)
    assert stored(prior[0], "images", 0) != stored(prior[0], "images", 1)


def test_warm_shutdown_finishes_the_running_job(
    box: RedisSandbox, pool: ModelPool, running: Any
) -> None:
    worker = running(progress_every=1)
    job = box.enqueue(MODEL, generate(1, num_inference_steps=60))
    wait_until(lambda: status(job) == "started")
    worker.stop()
    assert status(job) == "finished"
    assert not worker.handle.alive
