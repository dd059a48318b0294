"""A continuous-batching engine kept saturated in-process, for benchmarks of the worker's own costs.

`SaturatedEngine` is its own job feed: before every round it tops its queue up to `WAITING` jobs of
the continuous-batching benchmark's request mix (`bench_continuous.sample_request`), so the running
set stays full. `stand_in_pool` builds the random-weight stand-in U-Net of that benchmark in a
temporary zoo. No Redis, no HTTP: what a round costs is the engine's and the network's alone.
"""

from __future__ import annotations

import argparse
import itertools
import random
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench_continuous import job_spec, prepare_zoo, sample_request
from ddserve.jobs import JobOutput
from ddserve.settings import Settings
from ddserve.spec import JobSpec
from ddserve.storage import Storage
from workers.engine import BatchingPolicy, Engine
from workers.model_pool import ModelPool

STAND_IN = '{"base_channels": 8, "channel_mults": [1, 2], "attention_resolutions": []}'
WAITING = 8  # jobs kept in the queue: the running set never runs dry
CLASSES = 10
LONG_FRACTION = 0.05


def stand_in_pool(workdir: Path, unet: str = STAND_IN) -> tuple[ModelPool, str]:
    """A model pool over a temporary zoo holding the stand-in U-Net; its model name."""
    args = argparse.Namespace(synthetic=True, unet=unet, zoo=None, model=None)
    zoo, model = prepare_zoo(args, workdir)
    return ModelPool(Settings(zoo_dir=zoo, device="cpu")), model


@dataclass
class Ticket:
    """A job as the engine sees it (`workers.engine.Ticket`); its outcome is not kept."""

    id: str
    spec: JobSpec  # the parsed job spec, as the worker's WorkerJob holds it
    arrived_at: float = 0.0
    deadline: float = float("inf")

    def progress(self, step: int, total: int, batch_rows: int) -> None:
        pass

    def succeed(self, output: JobOutput, batch_rows: int) -> None:
        pass

    def fail(self, error: BaseException) -> None:
        pass  # counted in the engine's stats, which `SaturatedEngine.run` checks

    def cancel(self) -> None:
        pass


class SaturatedEngine:
    """An engine over one model whose queue never runs dry; it is the engine's `JobFeed`."""

    def __init__(
        self,
        pool: ModelPool,
        model: str,
        storage: Storage,
        *,
        max_batch: int = 64,
        store_threads: int = 0,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.queue: deque[Ticket] = deque()
        self.ids = itertools.count()
        self.rng = random.Random(seed)
        self.engine = Engine(
            pool,
            [model],
            self,
            storage,
            BatchingPolicy(max_batch=max_batch),
            store_threads=store_threads,
        )

    def take(self, model: str) -> Ticket | None:
        return self.queue.popleft() if self.queue else None

    def canceled(self, job_ids: list[str]) -> set[str]:
        return set()

    def run(self, rounds: int) -> dict[str, float]:
        """Run `rounds` scheduling rounds; their rate (rows·steps/s, images/s, µs per round)."""
        stats = self.engine.stats
        rows, images, started = stats.rows_total, stats.images_done, time.perf_counter()
        for _ in range(rounds):
            while len(self.queue) < WAITING:
                request = sample_request(self.rng, self.model, CLASSES, LONG_FRACTION)
                self.queue.append(Ticket(f"job{next(self.ids)}", job_spec(request)))
            self.engine.run_once()
        seconds = time.perf_counter() - started
        if stats.jobs_failed:
            raise RuntimeError(f"{stats.jobs_failed} jobs failed; see the log")
        return {
            "rows_steps_per_s": (stats.rows_total - rows) / seconds,
            "images_per_s": (stats.images_done - images) / seconds,
            "us_per_round": seconds / rounds * 1e6,
        }

    def close(self) -> None:
        self.engine.close()
