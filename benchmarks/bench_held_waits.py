"""Many held `Prefer: wait` requests on one gateway process (issue #18, item 6).

A gateway (uvicorn in a subprocess, on 127.0.0.1, in front of the real Redis, keys under a private
prefix, no worker) and N held `POST /generate` requests with `Prefer: wait=W`, sent over raw
sockets by this process (an HTTP library would spend more CPU than the gateway). After an **idle**
baseline (only the `/healthz` probe, every 100 ms, for `--hold-s`), two phases, each on its own model
(queue):

- **timeout**: the issue's scenario — N requests held at wait=W (60) on an idle system, no job ever
  finishing: how late after W each is answered (p50/p99/max), `/healthz` latency while they are
  held, and the gateway's CPU seconds from the last one held to the last one answered (the minute).
- **finish**: N requests held; a stand-in worker (a subprocess: `--finisher`) takes their jobs and,
  after a `--hold-s` window measured like the above, finishes them the way the batching worker
  does (`workers.rq_bridge.finish_successes`, rounds of `--round` jobs, which also publishes each
  job-finished notification); the time from each job's finish to its request's answer (p50/p99/max).

    .venv/bin/python -m benchmarks.bench_held_waits [--n 3000] [--wait 60] [--hold-s 10]
        [--phases timeout finish] [--gateway-root DIR] [--json out.json]

`--gateway-root` runs the gateway from another checkout (say the commit before the new waiter,
unpacked with `git archive`), for comparison. The file-descriptor limit is raised to its hard limit
(the gateway holds one socket per request, and so does this process). Figures depend on the load of
the machine; each phase's CPU figure is the gateway process's alone (/proc/<pid>/stat).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.support import (
    HOST,
    ROOT,
    cleanup_redis,
    cpu_seconds,
    free_port,
    gateway_env,
    stop_all,
    wait_healthy,
)

MODELS = {"timeout": "bench-wait-a", "finish": "bench-wait-b"}


def write_zoo(root: Path) -> Path:
    """Config-only zoo entries (the gateway never loads weights)."""
    for name in MODELS.values():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        entry = {
            "name": name,
            "kind": "diffusion",
            "tasks": ["generate"],
            "dataset": "digits",
            "image": {"channels": 1, "height": 8, "width": 8},
            "conditioning": {"type": "class", "classes": [str(i) for i in range(10)]},
            "schedule": {"kind": "linear", "num_timesteps": 100},
            "samplers": ["ddim"],
            "defaults": {"num_inference_steps": 10},
        }
        (folder / "config.json").write_text(json.dumps(entry))
    return root


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "n": len(ordered),
        "p50": statistics.median(ordered),
        "p99": at(0.99),
        "max": ordered[-1],
    }


# --- a minimal HTTP/1.1 client on asyncio streams ----------------------------------------------


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, await reader.readexactly(length)


@dataclass
class Held:
    sent_at: float = 0.0
    answered_at: float | None = None  # time.monotonic()
    answered_wall: float | None = None  # time.time(), against the job's created_at
    status: int | None = None
    job: dict[str, Any] | None = None
    error: str | None = None


async def held_request(port: int, model: str, wait_s: float, index: int, out: Held) -> None:
    body = json.dumps({"model": model, "class_label": index % 10, "seed": index}).encode()
    request = (
        f"POST /generate HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        f"Prefer: wait={wait_s:g}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(request)
        await writer.drain()
        out.sent_at = time.monotonic()
        out.status, payload = await read_response(reader)
        out.answered_at = time.monotonic()
        out.answered_wall = time.time()
        out.job = json.loads(payload)
        writer.close()
    except Exception as exc:  # reported, not raised: one refused connection must not end the run
        out.error = f"{type(exc).__name__}: {exc}"


async def probe_healthz(port: int, stop: asyncio.Event, every_s: float = 0.1) -> list[float]:
    """`GET /healthz` on one keep-alive connection every `every_s`; the latencies (s)."""
    latencies: list[float] = []
    reader, writer = await asyncio.open_connection(HOST, port)
    request = f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    while not stop.is_set():
        start = time.monotonic()
        writer.write(request)
        await writer.drain()
        status, _ = await read_response(reader)
        latencies.append(time.monotonic() - start)
        if status != 200:
            raise RuntimeError(f"/healthz answered {status}")
        await asyncio.sleep(every_s)
    writer.close()
    return latencies


async def queue_length(redis_url: str, prefix: str, model: str) -> int:
    """The model's jobs queued or started (the finish phase's stand-in worker starts them)."""
    from redis.asyncio import Redis
    from rq.registry import StartedJobRegistry

    started = StartedJobRegistry.key_template.format(f"{prefix}:{model}")
    async with Redis.from_url(redis_url) as connection:
        queued = await connection.llen(f"rq:queue:{prefix}:{model}")
        return int(queued) + int(await connection.zcard(started))


async def hold(
    port: int, redis_url: str, prefix: str, model: str, n: int, wait_s: float
) -> tuple[list[Held], list[asyncio.Task[None]]]:
    """Send n held requests, at most ~200 not yet enqueued at a time; return once every job is
    in its queue (so every request is held)."""
    held = [Held() for _ in range(n)]
    tasks: list[asyncio.Task[None]] = []
    for start in range(0, n, 100):
        for i in range(start, min(n, start + 100)):
            tasks.append(asyncio.create_task(held_request(port, model, wait_s, i, held[i])))
        while await queue_length(redis_url, prefix, model) < len(tasks) - 200:
            await asyncio.sleep(0.05)
    deadline = time.monotonic() + 120
    while await queue_length(redis_url, prefix, model) < n:
        failed = [h.error for h in held if h.error]
        if failed or time.monotonic() > deadline:
            raise RuntimeError(f"requests failed or never held: {failed[:3]}")
        await asyncio.sleep(0.05)
    return held, tasks


# --- phases ------------------------------------------------------------------------------------


async def probed(port: int, pid: int, during: Awaitable[Any]) -> tuple[list[float], float]:
    """Await `during` while `/healthz` is probed every 100 ms: the probes' latencies (s) and the
    gateway's CPU seconds in the window."""
    cpu_start = cpu_seconds(pid) or 0.0
    stop = asyncio.Event()
    probe = asyncio.create_task(probe_healthz(port, stop))
    await during
    stop.set()
    healthz = await probe
    return healthz, (cpu_seconds(pid) or 0.0) - cpu_start


def latencies_ms(latencies: list[float]) -> dict[str, float]:
    """`percentiles` of latencies in seconds, in milliseconds (the count as it is)."""
    return {k: v * 1000 if k != "n" else v for k, v in percentiles(latencies).items()}


async def phase_idle(args: argparse.Namespace, port: int, pid: int) -> dict[str, Any]:
    """The baseline: nothing held, only the /healthz probe, for `--hold-s`."""
    healthz, cpu = await probed(port, pid, asyncio.sleep(args.hold_s))
    return {
        "healthz_ms": latencies_ms(healthz),
        "gateway_cpu_s_per_minute": cpu * 60 / args.hold_s,
    }


async def phase_timeout(args: argparse.Namespace, port: int, pid: int) -> dict[str, Any]:
    model = MODELS["timeout"]
    t0 = time.monotonic()
    held, tasks = await hold(port, args.redis_url, args.prefix, model, args.n, args.wait)
    held_s = time.monotonic() - t0
    window_start = time.monotonic()
    healthz, cpu = await probed(port, pid, asyncio.gather(*tasks))  # every request times out
    window_s = time.monotonic() - window_start
    # From the job's creation (its enqueue in the gateway, after the request waited its turn to be
    # read) to the answer, less the wait asked for.
    late = [
        h.answered_wall - datetime.fromisoformat(h.job["created_at"]).timestamp() - args.wait
        for h in held
        if h.answered_wall is not None and h.job and h.job.get("created_at")
    ]
    return {
        "n": args.n,
        "wait_s": args.wait,
        "submit_all_s": held_s,
        "answered": sum(1 for h in held if h.status == 202),
        "errors": [h.error for h in held if h.error][:5],
        "answered_late_s": percentiles(late),
        "healthz_ms": latencies_ms(healthz),
        "window_s": window_s,
        "gateway_cpu_s": cpu,
        "gateway_cpu_s_per_minute": cpu * 60 / window_s,
    }


async def phase_finish(args: argparse.Namespace, port: int, pid: int) -> dict[str, Any]:
    model = MODELS["finish"]
    # The stand-in worker starts the jobs as they are queued (so that submitting, starting and the
    # held window fit in the wait), and finishes them when told to.
    times_file = Path(tempfile.mkdtemp(prefix="bench-held-")) / "finished.json"
    finisher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_held_waits",
            "--finisher",
            "--redis-url",
            args.redis_url,
            "--prefix",
            args.prefix,
            "--n",
            str(args.n),
            "--round",
            str(args.round),
            "--out",
            str(times_file),
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    t0 = time.monotonic()
    held, tasks = await hold(port, args.redis_url, args.prefix, model, args.n, args.wait)
    held_s = time.monotonic() - t0
    assert finisher.stdin is not None and finisher.stdout is not None
    line = await asyncio.to_thread(finisher.stdout.readline)  # every job started
    if line.strip() != "ready":
        raise RuntimeError(f"the finisher failed: {line!r}")
    healthz, hold_cpu = await probed(port, pid, asyncio.sleep(args.hold_s))

    async def finish_all() -> None:
        assert finisher.stdin is not None
        finisher.stdin.write("go\n")
        finisher.stdin.flush()
        await asyncio.gather(*tasks)

    healthz_finishing, finish_cpu = await probed(port, pid, finish_all())
    await asyncio.to_thread(finisher.wait, 120)
    finished = json.loads(times_file.read_text())
    delays = [  # of the requests answered with their finished job (not timed out first)
        h.answered_at - finished[h.job["id"]]
        for h in held
        if h.answered_at is not None and h.status == 200 and h.job["id"] in finished
    ]
    span = max(finished.values()) - min(finished.values()) if finished else 0.0
    return {
        "n": args.n,
        "wait_s": args.wait,
        "submit_all_s": held_s,
        "succeeded": sum(1 for h in held if h.status == 200 and h.job["status"] == "succeeded"),
        "errors": [h.error for h in held if h.error][:5],
        "finish_to_answer_s": percentiles(delays),
        "finishing_span_s": span,
        "round": args.round,
        "hold_s": args.hold_s,
        "healthz_ms_while_held": latencies_ms(healthz),
        "healthz_ms_while_finishing": latencies_ms(healthz_finishing),
        "gateway_cpu_s_while_held": hold_cpu,
        "gateway_cpu_s_per_minute_held": hold_cpu * 60 / args.hold_s,
        "gateway_cpu_s_finishing": finish_cpu,
    }


def run_finisher(args: argparse.Namespace) -> None:
    """The stand-in worker: start every queued job of the finish phase, say "ready", wait for "go",
    then finish them in rounds as the batching worker does; write each job's finish time."""
    from redis import Redis
    from rq import SimpleWorker
    from rq.queue import Queue

    from workers import rq_bridge

    connection = Redis.from_url(args.redis_url)
    queue = Queue(f"{args.prefix}:{MODELS['finish']}", connection=connection)
    worker = SimpleWorker([queue], connection=connection, name=f"{args.prefix}-finisher")
    started = []
    deadline = time.monotonic() + 300
    while len(started) < args.n:
        got = rq_bridge.dequeue(worker, [queue], 1)
        if got is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(started)} jobs queued")
            continue
        job, job_queue = got
        started.append(rq_bridge.Succeeded(job, job_queue, rq_bridge.mark_started(worker, job), {}))
    print("ready", flush=True)
    sys.stdin.readline()
    finished: dict[str, float] = {}
    for start in range(0, len(started), args.round):
        items = started[start : start + args.round]
        for item in items:
            item.value = {"images": []}
        rq_bridge.finish_successes(worker, items)
        now = time.monotonic()
        finished.update({item.job.id: now for item in items})
    Path(args.out).write_text(json.dumps(finished))
    worker.register_death()


PHASES = {"idle": phase_idle, "timeout": phase_timeout, "finish": phase_finish}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="held requests per phase")
    parser.add_argument("--wait", type=float, default=60.0, help="Prefer: wait=W")
    parser.add_argument("--hold-s", type=float, default=10.0, help="finish phase: held window")
    parser.add_argument("--round", type=int, default=64, help="jobs finished per transaction")
    parser.add_argument(
        "--phases", nargs="+", choices=list(PHASES), default=["idle", "timeout", "finish"]
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--gateway-root", type=Path, default=ROOT, help="checkout to serve from")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--finisher", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.finisher:
        run_finisher(args)
        return

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = args.n + 1000
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit < needed:
        raise SystemExit(f"--n {args.n} needs {needed} file descriptors; the limit is {limit}")

    if cpu_seconds(os.getpid()) is None:
        raise SystemExit("needs Linux /proc to read the gateway's CPU time")
    args.prefix = f"bench-{uuid.uuid4().hex[:8]}"
    scratch = Path(tempfile.mkdtemp(prefix="bench-held-"))
    zoo = write_zoo(scratch / "zoo")
    port = free_port()
    env = gateway_env(
        args.redis_url,
        args.prefix,
        zoo,
        ",".join(MODELS.values()),
        scratch / "images",
        max_queue_length=10 * args.n,
        max_wait_s=args.wait,
        signing_secret="bench",
    )
    env["PYTHONPATH"] = str(args.gateway_root)
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "service.app:app_from_env",
        "--host",
        HOST,
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
        "--timeout-keep-alive",
        "75",
        "--backlog",
        str(max(2048, args.n)),
    ]
    gateway = subprocess.Popen(command, env=env, cwd=args.gateway_root)
    results: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "cpus": os.cpu_count(),
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
    }
    try:
        wait_healthy(f"http://{HOST}:{port}", process=gateway)
        for phase in args.phases:
            results[phase] = asyncio.run(PHASES[phase](args, port, gateway.pid))
            print(json.dumps({phase: results[phase]}, indent=2), flush=True)
        results["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        stop_all([gateway])
        cleanup_redis(args.redis_url, args.prefix)


if __name__ == "__main__":
    main()
