"""A batching worker driven by hand (no loop thread) against real Redis, for the worker tests: the
tiny DDPM's model pool, and a `BatchingWorker` on a `RedisSandbox`'s prefix whose registration the
sandbox's cleanup removes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ddserve.settings import Settings
from tests.redis_sandbox import RedisSandbox
from tests.tiny_zoo import write_diffusion_model
from tests.worker_doubles import MemoryStorage
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
