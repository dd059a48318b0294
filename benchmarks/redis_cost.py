"""What one job costs Redis today: commands, round trips' bytes and retained memory, per phase.

Runs the real gateway (`service.app.create_app`, in process through Starlette's TestClient) and one
batching worker thread (`workers.embedded.start_worker_thread`) against a private `redis-server` it
starts on a free loopback port (so no other client's commands are counted), and reads Redis's own
counters (`INFO commandstats` without INFO itself, `INFO stats` net bytes, less the reading's own
bytes) around each phase:
- idle: the worker alone for `--idle` seconds (heartbeats, maintenance): a per-worker-second cost;
- submit: N `POST /generate` (no wait);
- run: the worker takes, steps, finishes the N jobs (its commands minus the idle rate);
- read: one `GET /jobs/{id}` per job (what a polling client costs);
then the memory one finished job keeps in Redis for its result TTL (`MEMORY USAGE` of its keys),
with links (`output.return = url`) and with inline base64 images (`b64`).
The figures feed `benchmarks/simulate_scaling.py` and docs/scaling.md. Counts, not times: they do
not depend on how busy the machine is.

    .venv/bin/python benchmarks/redis_cost.py [--jobs 40] [--steps 20] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from redis import Redis
from rq.registry import FinishedJobRegistry

from ddserve.jobs import queue_name
from ddserve.settings import Settings

MODEL = "digits-ddpm"


class Meter:
    """Redis's counters, less what reading them costs (two INFO calls each time)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        first = self._raw()
        second = self._raw()
        self.own = {k: second[k] - first[k] for k in first}  # one reading's bytes

    def _raw(self) -> dict[str, int]:
        stats = self.redis.info("stats")
        commands = self.redis.info("commandstats")
        return {
            "commands": sum(int(v["calls"]) for k, v in commands.items() if k != "cmdstat_info"),
            "bytes_in": int(stats["total_net_input_bytes"]),
            "bytes_out": int(stats["total_net_output_bytes"]),
        }

    def read(self) -> dict[str, int]:
        return self._raw()

    def since(self, before: dict[str, int], readings: int = 1) -> dict[str, int]:
        """What happened since `before`, less `readings` readings of the meter itself."""
        after = self._raw()
        return {k: after[k] - before[k] - readings * self.own[k] for k in after}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def private_redis() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            Redis.from_url(url).ping()
            return server, url
        except Exception:
            time.sleep(0.05)
    server.kill()
    raise SystemExit("redis-server did not start")


def per_job(cost: dict[str, int], jobs: int) -> dict[str, float]:
    return {key: round(value / jobs, 1) for key, value in cost.items()}


def job_memory(redis: Redis, job_id: str) -> int:
    """Bytes Redis holds for one finished job: its hash, its results stream, its executions."""
    total = 0
    for pattern in (f"rq:job:{job_id}*", f"rq:results:{job_id}*", f"rq:execution*{job_id}*"):
        for key in redis.scan_iter(match=pattern, count=1000):
            total += int(redis.memory_usage(key, samples=0) or 0)
    return total


def wait_all(redis: Redis, registry: str, count: int, timeout: float = 900) -> int:
    """Wait until `count` jobs are in the finished registry; the number of polls (one ZCARD)."""
    deadline, polls = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        polls += 1
        if int(redis.zcard(registry)) >= count:
            return polls
        time.sleep(0.5)
    raise SystemExit("the jobs did not finish")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from service.app import create_app
    from workers.embedded import start_worker_thread

    torch.set_num_threads(1)
    server, url = private_redis()
    redis = Redis.from_url(url)
    prefix = "bench-cost"
    scratch = Path(tempfile.mkdtemp(prefix="ddserve-redis-cost-"))
    settings = Settings(
        redis_url=url,
        key_prefix=prefix,
        models=MODEL,
        storage_dir=scratch,
        auth_enabled=False,
        signing_secret="bench",
        max_queue_length=10_000,
    )
    finished = FinishedJobRegistry(name=queue_name(prefix, MODEL), connection=redis).key
    results: dict[str, Any] = {"jobs": args.jobs, "steps": args.steps, "model": MODEL}
    handle = start_worker_thread(settings, Redis.from_url(url))
    handle.ready.wait(300)
    try:
        with TestClient(create_app(settings, redis)) as client:
            meter = Meter(redis)
            poll_before = meter.read()
            redis.zcard(finished)
            one_poll = meter.since(poll_before)

            before = meter.read()
            time.sleep(args.idle)
            idle = meter.since(before)
            results["idle_worker_per_s"] = {k: round(v / args.idle, 1) for k, v in idle.items()}

            body = {"model": MODEL, "class_label": 3, "num_inference_steps": args.steps}
            before = meter.read()
            ids = [
                client.post("/generate", json={**body, "seed": i}).json()["id"]
                for i in range(args.jobs)
            ]
            results["submit_per_job"] = per_job(meter.since(before), args.jobs)

            before, started = meter.read(), time.monotonic()
            polls = wait_all(redis, finished, args.jobs)
            elapsed = time.monotonic() - started
            run = meter.since(before)
            worker_only = {
                k: run[k] - idle[k] / args.idle * elapsed - polls * one_poll[k] for k in run
            }
            results["run_per_job"] = per_job({k: int(v) for k, v in worker_only.items()}, args.jobs)
            results["run_seconds"] = round(elapsed, 1)

            before = meter.read()
            for job_id in ids:
                client.get(f"/jobs/{job_id}")
            results["read_per_job"] = per_job(meter.since(before), args.jobs)

            results["retained_bytes_url"] = job_memory(redis, ids[0])
            client.post("/generate", json={**body, "seed": 0, "output": {"return": "b64"}})
            wait_all(redis, finished, args.jobs + 1)
            b64_id = next(
                m.decode() for m in redis.zrange(finished, 0, -1) if m.decode() not in set(ids)
            )
            results["retained_bytes_b64"] = job_memory(redis, b64_id)
            results["result_ttl_s"] = settings.result_ttl_s
    finally:
        handle.stop()
        server.terminate()
        server.wait(10)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
