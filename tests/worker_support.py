"""Workers driven by hand (no loop thread) against real Redis, for the worker tests: the tiny DDPM's
model pool, a `BatchingWorker` or a plain RQ `SimpleWorker` on a `RedisSandbox`'s prefix (their
registrations removed by the sandbox's cleanup), and starting the next job of a queue as the
batching worker starts it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.worker import SimpleWorker

from ddserve.settings import Settings
from tests.redis_sandbox import RedisSandbox
from tests.tiny_zoo import write_diffusion_model
from tests.worker_doubles import MemoryStorage
from workers import rq_bridge
from workers.model_pool import ModelPool
from workers.worker import BatchingWorker

MODEL = "tiny-ddpm"


def tiny_ddpm_pool(zoo: Path) -> ModelPool:
    """A CPU model pool over a zoo of one tiny random DDPM (`MODEL`), written into `zoo`."""
    torch.set_num_threads(1)
    write_diffusion_model(zoo, MODEL)
    return ModelPool(Settings(zoo_dir=zoo, device="cpu"))


def hand_worker(
    box: RedisSandbox, pool: ModelPool, name: str = "w", **settings: Any
) -> BatchingWorker:
    """A worker named `{box.prefix}-{name}` serving `MODEL` from `pool` on the box's queues, its
    images kept in memory; `settings` overrides any other setting."""
    made = BatchingWorker(
        Settings(zoo_dir=pool.settings.zoo_dir, key_prefix=box.prefix, models=MODEL, **settings),
        box.connection,
        pool=pool,
        storage=MemoryStorage(),
        name=f"{box.prefix}-{name}",
    )
    box.worker_names.append(made.name)
    return made


def simple_worker(box: RedisSandbox, queue: str, suffix: str = "w") -> SimpleWorker:
    """A plain RQ worker named `{box.prefix}-{suffix}` on the box's queue of model `queue`."""
    made = SimpleWorker(
        [box.queue(queue)], connection=box.connection, name=f"{box.prefix}-{suffix}"
    )
    box.worker_names.append(made.name)
    return made


def start_next(box: RedisSandbox, worker: SimpleWorker, queue: str) -> tuple[Job, Queue, Execution]:
    """Dequeue the next job of the box's queue `queue` and mark it started by `worker`, through
    the batching worker's own paths (`workers.rq_bridge`); the queue must hold one."""
    got = rq_bridge.dequeue(worker, [box.queue(queue)], None)
    assert got is not None
    job, rq_queue = got
    return job, rq_queue, rq_bridge.mark_started(worker, job)
