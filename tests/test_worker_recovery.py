"""Worker faults against real Redis, with real `ddserve worker` processes and short recovery
settings (abandoned_after_s = 3 s, heartbeat 0.5 s): an accepted job always ends, and ends once.

- SIGKILL mid-batch: a surviving worker retries the dead worker's jobs (the one without retries
  fails with `worker_lost`) within abandoned_after_s + two maintenance intervals; each retried job
  finishes exactly once (one result, by the survivor).
- SIGSTOP (a frozen worker): its job goes to the other worker; when the frozen one resumes it drops
  its copy instead of finishing the job a second time.
- SIGTERM within `shutdown_grace_s`: the worker admits no new job, finishes the one it holds (once,
  no retry used) and exits 0.
- SIGTERM past `shutdown_grace_s`: the unfinished job goes back to the head of its queue with its
  retries untouched, and the process exits 0.
- A job dequeued after `job_ttl_s` in its queue fails `job_expired` without running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rq.job import Job, Retry
from rq.results import Result

from ddserve.jobs import META_ERROR, META_PROGRESS
from ddserve.settings import Settings
from tests import specs
from tests.redis_sandbox import REDIS_URL, RedisSandbox, status, wait_until
from tests.tiny_zoo import write_diffusion_model
from tests.worker_doubles import MemoryStorage
from workers.embedded import start_worker_thread

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-ddpm"
ABANDONED_AFTER_S = 3.0
MAINTENANCE_S = 1.0  # ceil(abandoned_after_s / 4)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    write_diffusion_model(root, MODEL)
    return root


class Workers:
    """`ddserve worker` processes on the sandbox's queues; all killed at the end of the test."""

    def __init__(self, box: RedisSandbox, zoo: Path, tmp_path: Path) -> None:
        self.box, self.zoo, self.tmp_path = box, zoo, tmp_path
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        worker_name = f"{self.box.prefix}-{name}"
        self.box.worker_names.append(worker_name)
        environment = os.environ | {
            "DDSERVE_REDIS_URL": REDIS_URL,
            "DDSERVE_KEY_PREFIX": self.box.prefix,
            "DDSERVE_ZOO_DIR": str(self.zoo),
            "DDSERVE_STORAGE_DIR": str(self.tmp_path / "images"),
            "DDSERVE_DEVICE": "cpu",
            "DDSERVE_PROGRESS_EVERY": "1",
            "DDSERVE_ABANDONED_AFTER_S": str(ABANDONED_AFTER_S),
            "DDSERVE_HEARTBEAT_S": "0.5",
            "OMP_NUM_THREADS": "1",
            # One torch thread: every core (the default) spin-waits in OpenMP beside pytest and
            # the other worker on a loaded 2-core machine (a 1000-step job then took over 60 s).
            "DDSERVE_TORCH_THREADS": "1",
            **env,
        }
        log = (self.tmp_path / f"{name}.log").open("wb")
        command = [sys.executable, "-m", "ddserve.cli", "worker", "--models", MODEL]
        process = subprocess.Popen(
            [*command, "--name", worker_name],
            cwd=ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes[name] = process
        return process

    def name(self, short: str) -> str:
        return f"{self.box.prefix}-{short}"

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def wait_registered(self, name: str, timeout: float = 60) -> None:
        """Until the worker has registered itself in Redis (it is listening)."""
        key = f"rq:worker:{self.name(name)}"
        wait_until(lambda: self.box.connection.exists(key) == 1, timeout, 0.05)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                with_signal(process, signal.SIGCONT)
                process.kill()
            process.wait(timeout=30)


def with_signal(process: subprocess.Popen[bytes], signum: int) -> None:
    if process.poll() is None:
        os.kill(process.pid, signum)


@pytest.fixture
def workers(box: RedisSandbox, zoo: Path, tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(box, zoo, tmp_path)
    try:
        yield pool
    finally:
        pool.stop_all()


def long_request(seed: int) -> dict[str, Any]:
    """A job of a few seconds on the tiny model: 1000 DDPM steps."""
    return specs.generate(MODEL, n=2, sampler="ddpm", num_inference_steps=1000, seed=seed)


def running_in(job: Job, worker_name: str) -> bool:
    """The job is started, by this worker, and has made progress."""
    job.refresh()
    return (
        status(job) == "started"
        and job.worker_name == worker_name
        and (job.meta.get(META_PROGRESS) or {}).get("step", 0) > 0
    )


def results_of(job: Job) -> list[Result]:
    return list(job.results())


def successes(job: Job) -> list[Result]:
    return [r for r in results_of(job) if r.type == Result.Type.SUCCESSFUL]


def test_sigkill_mid_batch_retries_or_fails_every_job_once(
    box: RedisSandbox, workers: Workers
) -> None:
    doomed = workers.start("a")
    workers.wait_registered("a")
    retried = [box.enqueue(MODEL, long_request(s), retry=Retry(max=1)) for s in range(2)]
    no_retry = box.enqueue(MODEL, long_request(9))
    jobs = [*retried, no_retry]
    wait_until(lambda: all(running_in(j, workers.name("a")) for j in jobs), 60)
    workers.start("b")
    workers.wait_registered("b")
    doomed.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    doomed.wait(10)

    def recovered(job: Job) -> bool:
        job.refresh()
        return status(job) == "failed" or job.worker_name == workers.name("b")

    wait_until(lambda: all(recovered(j) for j in jobs), 30, 0.05)
    recovery_s = time.monotonic() - killed_at
    # Detection needs the registry entry to expire (≤ abandoned_after_s after the last heartbeat)
    # and a maintenance pass (every abandoned_after_s / 4); the rest is this loaded machine.
    assert recovery_s < ABANDONED_AFTER_S + 2 * MAINTENANCE_S + 4.0, recovery_s
    wait_until(lambda: all(status(j) in ("finished", "failed") for j in jobs), 60)

    for job in retried:
        job.refresh()
        assert status(job) == "finished"
        assert job.retries_left == 0  # retried once, after the kill
        finished = successes(job)
        assert len(finished) == 1 and finished[0].worker_name == workers.name("b")
    no_retry.refresh()
    assert status(no_retry) == "failed"
    assert no_retry.meta[META_ERROR]["code"] == "worker_lost"
    assert workers.processes["b"].poll() is None


def test_frozen_worker_never_finishes_a_job_twice(box: RedisSandbox, workers: Workers) -> None:
    frozen = workers.start("a")
    workers.wait_registered("a")
    job = box.enqueue(MODEL, long_request(3), retry=Retry(max=1))
    wait_until(lambda: running_in(job, workers.name("a")), 60)
    workers.start("b")
    workers.wait_registered("b")
    frozen.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: status(job) == "finished", 60)
    finally:
        frozen.send_signal(signal.SIGCONT)
    # The resumed worker notices within a heartbeat or at its next finish that the job is gone.
    wait_until(
        lambda: (
            "another worker owns it now" in workers.log("a")
            or "no longer owned" in workers.log("a")
        ),
        30,
        0.1,
    )
    time.sleep(1.0)  # a late, wrong finish would land now
    assert [r.type for r in results_of(job)] == [Result.Type.SUCCESSFUL]
    assert successes(job)[0].worker_name == workers.name("b")
    assert status(job) == "finished"
    assert frozen.poll() is None  # the resumed worker goes on serving


def test_sigterm_within_the_grace_finishes_the_held_job_and_takes_no_new_one(
    box: RedisSandbox, workers: Workers
) -> None:
    process = workers.start("a", DDSERVE_SHUTDOWN_GRACE_S="60")
    workers.wait_registered("a")
    held = box.enqueue(MODEL, long_request(7), retry=Retry(max=1))
    wait_until(lambda: running_in(held, workers.name("a")), 60, 0.02)
    process.send_signal(signal.SIGTERM)
    held.refresh()
    step_at_stop = held.meta[META_PROGRESS]["step"]
    late = box.enqueue(MODEL, {**long_request(8), "num_inference_steps": 5})
    assert process.wait(60) == 0, workers.log("a")[-3000:]
    assert step_at_stop < 1000  # the signal came mid-run
    held.refresh()
    assert status(held) == "finished" and held.retries_left == 1
    assert [r.worker_name for r in successes(held)] == [workers.name("a")]
    late.refresh()
    assert status(late) == "queued" and not results_of(late)  # a stopping worker admits nothing
    assert box.connection.lrange(box.queue(MODEL).key, 0, -1) == [late.id.encode()]


def test_sigterm_past_the_grace_hands_the_job_back(box: RedisSandbox, workers: Workers) -> None:
    process = workers.start("a", DDSERVE_SHUTDOWN_GRACE_S="0.5")
    workers.wait_registered("a")
    job = box.enqueue(MODEL, long_request(4), retry=Retry(max=1))
    wait_until(lambda: running_in(job, workers.name("a")), 60)
    process.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    assert process.wait(30) == 0, workers.log("a")[-3000:]
    assert time.monotonic() - stopped_at < 15
    job.refresh()
    assert status(job) == "queued"
    assert job.retries_left == 1  # handing back uses no retry
    assert box.connection.lindex(box.queue(MODEL).key, 0) == job.id.encode()  # head of the queue
    assert not results_of(job)
    assert "handed back" in workers.log("a")


def test_a_job_dequeued_after_its_ttl_fails_expired(box: RedisSandbox, zoo: Path) -> None:
    settings = Settings(
        zoo_dir=zoo, key_prefix=box.prefix, models=MODEL, job_ttl_s=60, device="cpu"
    )
    stale = box.enqueue(MODEL, {**long_request(5), "num_inference_steps": 5})
    fresh = box.enqueue(MODEL, {**long_request(6), "num_inference_steps": 5})
    box.connection.hset(stale.key, "enqueued_at", "2020-01-01T00:00:00.000000Z")
    handle = start_worker_thread(
        settings, box.connection, storage=MemoryStorage(), name=f"{box.prefix}-t"
    )
    box.worker_names.append(f"{box.prefix}-t")
    try:
        assert handle.ready.wait(60) and handle.error is None, handle.error
        wait_until(lambda: status(stale) == "failed" and status(fresh) == "finished", 30)
    finally:
        assert handle.stop(timeout=20)
    stale.refresh()
    assert stale.meta[META_ERROR]["code"] == "job_expired"
    assert stale.meta[META_ERROR]["type"] == "timeout_error"
    assert "job_ttl_s" in stale.meta[META_ERROR]["message"]
    assert stale.retries_left is None or stale.retries_left == 0
