"""A worker restarted under its name (Kubernetes' `$(POD_NAME)`) after being killed takes over the
dead registration at once instead of crash-looping until it expires (#18 item 10); a live worker
of the same name is still refused, with a clear message. Real Redis, private prefix."""

from __future__ import annotations

from datetime import timedelta

import pytest
from rq.utils import now, utcformat

from tests.redis_sandbox import RedisSandbox
from tests.worker_support import hand_worker, tiny_ddpm_pool
from workers.model_pool import ModelPool
from workers.rq_bridge import WorkerNameTaken
from workers.worker import BatchingWorker

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> ModelPool:
    return tiny_ddpm_pool(tmp_path_factory.mktemp("zoo"))


def worker(box: RedisSandbox, pool: ModelPool) -> BatchingWorker:
    return hand_worker(box, pool, "pod-0", heartbeat_s=2.0)


def killed(box: RedisSandbox, pool: ModelPool, heartbeat_age_s: float) -> BatchingWorker:
    """A worker that registered, heartbeated `heartbeat_age_s` ago and died without a word."""
    first = worker(box, pool)
    first.register_birth()
    stamp = utcformat(now() - timedelta(seconds=heartbeat_age_s))
    box.connection.hset(first.key, "last_heartbeat", stamp)
    return first


def test_a_killed_workers_name_is_taken_over_at_once(box: RedisSandbox, pool: ModelPool) -> None:
    killed(box, pool, heartbeat_age_s=30.0)  # 3 heartbeats (2 s) missed
    restarted = worker(box, pool)
    restarted.register_birth()  # RQ alone: ValueError("There exists an active worker named ...")
    assert box.connection.hget(restarted.key, "death") is None
    assert restarted.key.encode() in box.connection.smembers("rq:workers")


def test_a_live_worker_of_the_same_name_is_refused_clearly(
    box: RedisSandbox, pool: ModelPool
) -> None:
    killed(box, pool, heartbeat_age_s=1.0)  # still heartbeating
    with pytest.raises(WorkerNameTaken, match="worker names must be unique"):
        worker(box, pool).register_birth()


def test_a_cleanly_stopped_workers_name_is_free(box: RedisSandbox, pool: ModelPool) -> None:
    first = worker(box, pool)
    first.register_birth()
    first.register_death()
    worker(box, pool).register_birth()
