"""Finished images are written by the engine's store threads while the next steps run: a slow or
failing storage backend delays or fails only the jobs whose images it holds, never the step
boundary of the others, and a job still completes exactly once, with the images the stepping
thread would have written itself."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ddserve.storage.base import StorageError
from tests.test_engine import Clock, generate, pool, zoo  # noqa: F401
from tests.worker_doubles import MemoryFeed, MemoryStorage
from workers.engine import BatchingPolicy, Engine
from workers.model_pool import ModelPool

MODEL = "tiny-ddpm"
WAIT_S = 10.0  # a put held longer than this is a hung test, not a slow backend


class GatedStorage(MemoryStorage):
    """Memory storage whose writes of one job's images wait for `release` (a slow backend) or
    fail (a broken one); it records which thread made each write."""

    def __init__(self, held_job: str | None = None, failing_job: str | None = None) -> None:
        super().__init__()
        self.held_job = held_job
        self.failing_job = failing_job
        self.released = threading.Event()
        self.writer_threads: list[str] = []

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.writer_threads.append(threading.current_thread().name)
        job = key.split("/")[0]
        if job == self.held_job:
            assert self.released.wait(WAIT_S), "the test never released the held writes"
        if job == self.failing_job:
            raise StorageError(f"cannot write {key!r}: bucket unavailable")
        super().put(key, data, content_type)


@contextmanager
def engine_over(
    model_pool: ModelPool, storage: MemoryStorage, store_threads: int
) -> Iterator[tuple[Engine, MemoryFeed]]:
    """An engine over a fresh feed; on leaving, held writes are released and its threads closed."""
    feed = MemoryFeed()
    engine = Engine(
        model_pool,
        [MODEL],
        feed,
        storage,
        BatchingPolicy(max_batch=8),
        clock=Clock(),
        sleep=lambda _s: None,
        store_threads=store_threads,
    )
    try:
        yield engine, feed
    finally:
        if isinstance(storage, GatedStorage):
            storage.released.set()
        engine.close()


def request(seed: int, **fields: Any) -> dict[str, Any]:
    return generate(seed, output={}, **fields)


def run_rounds(engine: Engine, rounds: int) -> None:
    for _ in range(rounds):
        engine.run_once()


def test_a_held_write_delays_only_its_own_job(pool: ModelPool) -> None:  # noqa: F811
    storage = GatedStorage(held_job="job0")
    with engine_over(pool, storage, store_threads=2) as (engine, feed):
        slow = feed.submit(request(1, n=2, num_inference_steps=3))
        run_rounds(engine, 3)  # its two samples finish: their write is held
        assert not slow.finished and not engine.idle
        quick = feed.submit(request(2, num_inference_steps=4))
        calls = engine.stats.network_calls
        run_rounds(engine, 4)
        assert engine.stats.network_calls == calls + 4  # every round stepped meanwhile
        for _ in range(1000):  # its own write, on the other thread (each round waits ≤ 10 ms)
            if quick.finished:
                break
            engine.run_once()
        assert quick.output is not None and not slow.finished
        assert engine.stats.network_calls == calls + 4
        assert [step for step, _, _ in quick.progress_log][-1] == 4
        storage.released.set()
        engine.run_until_idle()
    assert slow.ends == 1 and slow.error is None
    keys = [record["key"] for record in slow.output["images"]]
    assert keys == ["job0/0.png", "job0/1.png"] and all(k in storage.objects for k in keys)
    assert slow.progress_log[-1][:2] == (3, 3)  # the last progress once it completed
    assert set(storage.writer_threads) <= {"store_0", "store_1"}
    assert engine.stats.images_done == 3


def test_a_failed_write_fails_only_its_job(pool: ModelPool) -> None:  # noqa: F811
    storage = GatedStorage(failing_job="job0")
    with engine_over(pool, storage, store_threads=1) as (engine, feed):
        broken = feed.submit(request(1, n=2, num_inference_steps=3))
        fine = feed.submit(request(2, n=2, num_inference_steps=5))
        engine.run_until_idle()
    assert broken.ends == 1 and isinstance(broken.error, StorageError)
    assert "bucket unavailable" in str(broken.error)
    assert fine.ends == 1 and fine.error is None and len(fine.output["images"]) == 2
    assert engine.stats.jobs_failed == 1 and engine.stats.jobs_succeeded == 1


def test_a_job_canceled_while_its_images_are_written_ends_once(pool: ModelPool) -> None:  # noqa: F811
    storage = GatedStorage(held_job="job0")
    with engine_over(pool, storage, store_threads=1) as (engine, feed):
        ticket = feed.submit(request(1, n=2, num_inference_steps=3))
        run_rounds(engine, 3)
        feed.cancel_set.add(ticket.id)
        engine.run_once()
        assert ticket.canceled and engine.idle
        storage.released.set()
        engine.run_until_idle()
    assert ticket.ends == 1 and ticket.output is None


def test_store_threads_write_what_the_stepping_thread_writes(pool: ModelPool) -> None:  # noqa: F811
    stored = []
    for threads in (0, 2):
        storage = MemoryStorage()
        tickets = []
        with engine_over(pool, storage, store_threads=threads) as (engine, feed):
            for seeds in ((0, 1, 2), (3, 4)):  # closed store threads start again when needed
                tickets += [
                    feed.submit(request(seed, n=1 + seed % 3, num_inference_steps=2 + seed))
                    for seed in seeds
                ]
                engine.run_until_idle()
                engine.close()
        assert all(t.ends == 1 and t.error is None for t in tickets)
        stored.append((storage.objects, [t.output for t in tickets]))
    assert stored[0] == stored[1]
