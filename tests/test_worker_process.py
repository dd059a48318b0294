"""`ddserve worker` as a process against real Redis: burst mode drains the queues and exits; SIGTERM
asks for a warm shutdown (the running job finishes, then the process exits 0)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ddserve.jobs import META_PROGRESS
from tests import specs
from tests.redis_sandbox import REDIS_URL, RedisSandbox, status, wait_terminal, wait_until
from tests.tiny_zoo import write_diffusion_model

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-ddpm"
STEPS = 300  # ~1-2 s on one thread: still running when the SIGTERM comes


def worker_process(box: RedisSandbox, tmp_path: Path, *extra: str) -> subprocess.Popen:
    zoo = tmp_path / "zoo"
    if not zoo.exists():
        write_diffusion_model(zoo, MODEL)
    name = f"{box.prefix}-proc"
    box.worker_names.append(name)
    env = os.environ | {
        "DDSERVE_REDIS_URL": REDIS_URL,
        "DDSERVE_KEY_PREFIX": box.prefix,
        "DDSERVE_ZOO_DIR": str(zoo),
        "DDSERVE_STORAGE_DIR": str(tmp_path / "images"),
        "DDSERVE_PROGRESS_EVERY": "1",
        "OMP_NUM_THREADS": "1",
        # One torch thread: every core (the default) beside pytest and other processes spin-waits
        # in OpenMP on a loaded 2-core machine; a 60-step job took 2.5-100 s there.
        "DDSERVE_TORCH_THREADS": "1",
    }
    command = [sys.executable, "-m", "ddserve.cli", "worker", "--models", MODEL, "--name", name]
    return subprocess.Popen(
        [*command, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def request(seed: int, steps: int) -> dict:
    return specs.generate(MODEL, n=2, num_inference_steps=steps, seed=seed)


def test_burst_worker_drains_the_queue_and_exits(box: RedisSandbox, tmp_path: Path) -> None:
    jobs = [box.enqueue(MODEL, request(seed, 5)) for seed in range(4)]
    process = worker_process(box, tmp_path, "--burst")
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output.decode()[-2000:]
    assert [status(j) for j in jobs] == ["finished"] * 4
    keys = [image["key"] for image in jobs[0].return_value()["images"]]
    assert all((tmp_path / "images" / key).is_file() for key in keys)


def test_sigterm_finishes_the_running_job_then_exits(box: RedisSandbox, tmp_path: Path) -> None:
    process = worker_process(box, tmp_path)
    try:
        job = box.enqueue(MODEL, request(1, STEPS))
        wait_until(
            lambda: (job.get_meta(refresh=True).get(META_PROGRESS) or {}).get("step", 0) > 0, 60
        )
        process.send_signal(signal.SIGTERM)
        step_at_stop = job.get_meta(refresh=True)[META_PROGRESS]["step"]
        waiting = box.enqueue(MODEL, request(2, 5))  # arrives after the stop request
        process.wait(timeout=120)
        assert process.returncode == 0
        assert step_at_stop < STEPS  # the signal came mid-run
        wait_terminal([job], timeout=5)
        assert status(job) == "finished"
        assert status(waiting) == "queued"  # left for another worker
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
