"""Live job events over SSE (`GET /jobs/{id}/events`, issue #20 item 4) on one gateway process.

A gateway (`ddserve serve`, one uvicorn process) in front of the real Redis (keys under a private
prefix, deleted afterwards), in two parts:

1. **Open streams** (no worker yet: the jobs stay queued): `/healthz` probed every 50 ms on its own
   keep-alive connection, p50/p99/max, side by side in three windows of `--hold-s` each:
   - *none*: no stream open;
   - *idle*: `--streams` (1,000) SSE streams open, one per queued job (raw sockets, read by this
     process), quiet but for the heartbeats;
   - *busy*: the same streams while a stand-in worker appends a progress entry to every one of
     their job streams each second (`ddserve.job_events.append`, one pipeline and one wake-up
     message, as a worker's round sends them): `--streams` events/s fanned out by the shared
     reader.
   The gateway's CPU seconds in each window are printed too (/proc/<pid>/stat), and the machine's
   load average (the figures are only as quiet as the machine). The probe runs in a process of its
   own.
2. **CPU per job at c = 64** (`bench_http.py`'s load: c closed-loop clients, one-image DDIM-`--steps`
   `/generate` requests on digits-ddpm) on two stacks side by side, each a gateway and one
   `ddserve worker` on its own prefix — one with `DDSERVE_JOB_EVENTS=false` (no event streams, no
   reader, no route) and one with them on — three modes alternated `--repeats` times (only one
   stack loaded at a time), the serving gateway's CPU seconds per finished job of each window:
   - *off*: events off, `POST /generate` with `Prefer: wait=60` (bench_http's client);
   - *wait*: events on (every job's stream written, the reader subscribed), the same client: what
     the SSE path costs a job nobody follows;
   - *sse*: events on, `POST /generate` (202), then `GET /jobs/{id}/events` to the terminal event:
     the client follows its job over SSE instead of waiting (started, a progress event every
     `progress_every` steps, the terminal event with the job).

    .venv/bin/python -m benchmarks.bench_sse [--streams 1000] [--hold-s 10] [--concurrency 64]
        [--steps 50] [--rounds 2] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.bench_held_waits import percentiles, probe_healthz
from benchmarks.bench_http import prepare_zoo
from benchmarks.support import (
    HOST,
    MODEL,
    ROOT,
    cleanup_redis,
    cpu_seconds,
    free_port,
    gateway_env,
    random_ddpm_zoo,
    stop_all,
    wait_healthy,
    wait_ready,
)

PROBE_EVERY_S = 0.05
# `python -m` from ROOT: this checkout's code (a console script would import the installed one)
DDSERVE = [sys.executable, "-m", "ddserve.cli"]


# --- part 1: open streams ------------------------------------------------------------------------


async def submit_queued(url: str, n: int) -> list[str]:
    """n one-image jobs, left in their queue (no worker yet)."""
    ids: list[str] = []
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def submit(start: int) -> None:
            for i in range(start, n, 16):
                body = {"model": MODEL, "class_label": i % 10, "seed": i}
                r = await client.post("/generate", json=body)
                if r.status_code != 202:
                    raise RuntimeError(f"submit failed: {r.status_code} {r.text[:200]}")
                ids.append(r.json()["id"])

        await asyncio.gather(*(submit(k) for k in range(16)))
    return ids


class Stream:
    """One raw-socket SSE stream: it reads (and counts) what the gateway sends until closed."""

    def __init__(self) -> None:
        self.events = 0
        self.pings = 0
        self.task: asyncio.Task[None] | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.error: str | None = None

    async def open(self, port: int, job_id: str) -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        self.writer = writer
        writer.write(
            f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: {HOST}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"stream refused: {head[:200]!r}")
        self.task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                if line.startswith(b"event:"):
                    self.events += 1
                elif line.startswith(b":"):
                    self.pings += 1
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.task is not None:
            self.task.cancel()


def run_probe(port: int, seconds: float) -> None:
    """`--probe-port`: probe /healthz for `seconds`, print the latencies as JSON (a process of its
    own, so that this benchmark's busy event loop — 1,000 streams read, the stand-in worker — does
    not delay the probe's own reads and count as the gateway's latency)."""

    async def main() -> list[float]:
        stop = asyncio.Event()
        probe = asyncio.create_task(probe_healthz(port, stop, PROBE_EVERY_S))
        await asyncio.sleep(seconds)
        stop.set()
        return await probe

    print(json.dumps(asyncio.run(main())))


async def window(port: int, pid: int, seconds: float, load: Any = None) -> dict[str, float]:
    """/healthz latencies for `seconds` (with `load()` running beside), and the gateway's CPU."""
    stop = asyncio.Event()
    cpu_start = cpu_seconds(pid)
    probe = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.bench_sse",
        "--probe-port",
        str(port),
        "--hold-s",
        str(seconds),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    loader = asyncio.create_task(load(stop)) if load is not None else None
    out, _ = await probe.communicate()
    stop.set()
    if loader is not None:
        await loader
    latencies = json.loads(out)
    cpu = (cpu_seconds(pid) or 0.0) - (cpu_start or 0.0)
    return {**percentiles(latencies), "probes": len(latencies), "gateway_cpu_s": cpu}


def progress_storm(redis_url: str, prefix: str, job_ids: list[str]) -> Any:
    """A stand-in worker: one progress entry on every job's stream each second."""
    from redis.asyncio import Redis

    from ddserve.job_events import EventKind, append, publish_updated

    async def run(stop: asyncio.Event) -> None:
        async with Redis.from_url(redis_url) as redis:
            step = 0
            while not stop.is_set():
                step += 1
                started = time.monotonic()
                pipe = redis.pipeline(transaction=False)
                for job_id in job_ids:
                    data = {"step": step, "of": 999}
                    append(pipe, prefix, job_id, EventKind.PROGRESS, data, 600, wake=False)
                publish_updated(pipe, prefix, job_ids)  # as a worker's round: one wake-up
                await pipe.execute()
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))

    return run


async def part_streams(
    args: argparse.Namespace, url: str, port: int, pid: int, prefix: str
) -> dict[str, Any]:
    job_ids = await submit_queued(url, args.streams)
    results: dict[str, Any] = {"none": await window(port, pid, args.hold_s)}
    streams = [Stream() for _ in job_ids]
    for start in range(0, len(streams), 100):  # open in batches: no accept-queue overflow
        batch = range(start, min(len(streams), start + 100))
        await asyncio.gather(*(streams[i].open(port, job_ids[i]) for i in batch))
    await asyncio.sleep(1.0)  # every stream has had its backlog read (the queued event)
    results["idle"] = await window(port, pid, args.hold_s)
    before = sum(s.events for s in streams)
    results["busy"] = await window(
        port, pid, args.hold_s, progress_storm(args.redis_url, prefix, job_ids)
    )
    await asyncio.sleep(1.0)
    results["busy"]["events_delivered"] = sum(s.events for s in streams) - before
    results["errors"] = [s.error for s in streams if s.error][:3]
    results["heartbeats"] = sum(s.pings for s in streams)
    for s in streams:
        s.close()
    # The jobs never ran: take them out of the queue before the worker starts.
    from redis import Redis

    Redis.from_url(args.redis_url).delete(f"rq:queue:{prefix}:{MODEL}")
    return results


# --- part 2: gateway CPU per job -----------------------------------------------------------------


def tiny_zoo(scratch: Path) -> Path:
    """digits-ddpm's entry (classes, schedule, samplers, defaults) on a tiny random U-Net (8 base
    channels, no attention): the gateway's work per job is the same, and the worker keeps up with
    64 clients on a loaded 2-vCPU machine, so a window holds many jobs."""
    tiny = {"base_channels": 8, "channel_mults": [1, 2], "attention_resolutions": []}
    return random_ddpm_zoo(scratch / "tiny-zoo", unet=tiny)


def body(i: int, steps: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "n": 1,
        "sampler": "ddim",
        "num_inference_steps": steps,
        "class_label": i % 10,
        "guidance_scale": 1.0,
        "seed": i,
    }


async def follow(client: httpx.AsyncClient, job_id: str) -> str:
    """Read the job's event stream to its terminal event; that event's name."""
    last = ""
    async with client.stream("GET", f"/jobs/{job_id}/events") as response:
        if response.status_code != 200:
            raise RuntimeError(f"stream refused: {response.status_code}")
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                last = line.partition(":")[2].strip()
                if last in ("succeeded", "failed", "canceled"):
                    return last
    raise RuntimeError(f"stream of {job_id} ended without a terminal event ({last!r})")


async def load_window(url: str, mode: str, concurrency: int, rounds: int, steps: int) -> int:
    """c closed-loop clients, `rounds` jobs each; returns the jobs finished."""
    limits = httpx.Limits(max_connections=2 * concurrency + 4, keepalive_expiry=2.0)
    done = 0
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def wait_job(i: int) -> dict[str, Any]:
            r = await client.post("/generate", json=body(i, steps), headers={"Prefer": "wait=60"})
            job = r.json()
            while job["status"] not in ("succeeded", "failed", "canceled"):  # past 60 s: poll
                await asyncio.sleep(1.0)
                job = (await client.get(f"/jobs/{job['id']}")).json()
            return job

        async def one(i: int) -> None:
            nonlocal done
            if mode == "wait":
                job = await wait_job(i)
                status = job["status"]
            else:  # sse: submit (202), then follow the job's events to its end
                r = await client.post("/generate", json=body(i, steps))
                status = await follow(client, r.json()["id"])
            if status != "succeeded":
                raise RuntimeError(f"job ended {status}")
            done += 1

        async def loop(k: int) -> None:
            for j in range(rounds):
                await one(k * 1000 + j)

        await asyncio.gather(*(loop(k) for k in range(concurrency)))
    return done


@dataclass
class Stack:
    """A gateway process (and later its worker) on its own key prefix and port."""

    prefix: str
    port: int
    env: dict[str, str]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def gateway_pid(self) -> int:
        return self.processes[0].pid

    def start_gateway(self) -> None:
        self.processes.append(subprocess.Popen([*DDSERVE, "serve"], env=self.env, cwd=ROOT))
        wait_healthy(self.url)

    def start_worker(self) -> None:
        worker = [*DDSERVE, "worker", "--name", f"{self.prefix}-w"]
        self.processes.append(subprocess.Popen(worker, env=self.env, cwd=ROOT))

    def stop(self) -> None:
        stop_all(self.processes)


IDLE_S = 10.0  # how long each gateway's idle CPU rate is measured


def idle_rate(pid: int) -> float:
    """The gateway's CPU seconds per second with nothing to do (its metrics flush, the waiter's
    and the event reader's safety reads, the janitor): subtracted from a window's CPU, so that a
    slower window is not charged more for the same jobs."""
    start = cpu_seconds(pid) or 0.0
    time.sleep(IDLE_S)
    return ((cpu_seconds(pid) or 0.0) - start) / IDLE_S


def part_cpu(args: argparse.Namespace, on: Stack, off: Stack) -> dict[str, Any]:
    """Windows of the three modes, alternated; each mode's gateway CPU per job (medians), gross
    and net of the gateway's idle CPU over the window."""
    modes = {"off": (off, "wait"), "wait": (on, "wait"), "sse": (on, "sse")}
    gross: dict[str, list[float]] = {m: [] for m in modes}
    net: dict[str, list[float]] = {m: [] for m in modes}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for stack in (on, off):  # warm-up: models loaded, first calls made
        asyncio.run(load_window(stack.url, "wait", args.concurrency, 1, args.steps))
    idle = {id(stack): idle_rate(stack.gateway_pid) for stack in (on, off)}
    for _ in range(args.repeats):
        for mode, (stack, client) in modes.items():
            pid = stack.gateway_pid
            cpu_start, started = cpu_seconds(pid) or 0.0, time.perf_counter()
            jobs = asyncio.run(
                load_window(stack.url, client, args.concurrency, args.rounds, args.steps)
            )
            elapsed = time.perf_counter() - started
            used = (cpu_seconds(pid) or 0.0) - cpu_start
            gross[mode].append(1000 * used / jobs)
            net[mode].append(1000 * (used - idle[id(stack)] * elapsed) / jobs)
            rates[mode].append(jobs / elapsed)
    base_gross, base_net = statistics.median(gross["off"]), statistics.median(net["off"])
    return {
        mode: {
            "gateway_cpu_ms_per_job": statistics.median(gross[mode]),
            "net_cpu_ms_per_job": statistics.median(net[mode]),
            "windows_ms": gross[mode],
            "net_windows_ms": net[mode],
            "idle_cpu_ms_per_s": 1000 * idle[id(modes[mode][0])],
            "jobs_per_s": statistics.median(rates[mode]),
            "vs_off": statistics.median(gross[mode]) / base_gross,
            "net_vs_off": statistics.median(net[mode]) / base_net,
        }
        for mode in modes
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--hold-s", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2, help="jobs per client per window")
    parser.add_argument("--repeats", type=int, default=2, help="windows of each mode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the worker")
    parser.add_argument("--parts", nargs="+", default=["streams", "cpu"])
    parser.add_argument(
        "--net",
        choices=["tiny", "digits"],
        default="tiny",
        help="the worker's network: tiny (fast; the gateway's work per job is the same) or "
        "digits-ddpm's own (bench_http's; slow on a CPU)",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--probe-port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_port is not None:
        run_probe(args.probe_port, args.hold_s)
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the stacks on the way out
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    scratch = Path(tempfile.mkdtemp(prefix="bench-sse-"))
    zoo = prepare_zoo(scratch) if args.net == "digits" else tiny_zoo(scratch)

    def stack(events: bool) -> Stack:
        prefix, port = f"bench-{uuid.uuid4().hex[:8]}", free_port()
        env = gateway_env(
            args.redis_url,
            prefix,
            zoo,
            MODEL,
            scratch / prefix,
            max_queue_length=100000,
            # an open stream is an open connection: uvicorn's limit (1,000 by default) must hold them
            max_concurrency=args.streams + 2 * args.concurrency + 100,
            max_batch=max(64, args.concurrency),
            job_events="true" if events else "false",
            device="cpu",
            port=port,
        )
        env["OMP_NUM_THREADS"] = str(args.threads)
        return Stack(prefix, port, env)

    on, off = stack(True), stack(False)
    report: dict[str, Any] = {"args": vars(args)}
    try:
        on.start_gateway()
        if "streams" in args.parts:
            streams = asyncio.run(part_streams(args, on.url, on.port, on.gateway_pid, on.prefix))
            report["streams"] = streams
            print(
                f"\n/healthz every {PROBE_EVERY_S * 1000:.0f} ms, {args.hold_s:g} s a window "
                f"(load average {os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} CPUs):"
            )
            print("| open SSE streams | p50 | p99 | max | gateway CPU in the window |")
            print("|---|---|---|---|---|")
            labels = {
                "none": "0",
                "idle": f"{args.streams}, idle (heartbeats only)",
                "busy": f"{args.streams}, one progress event each per second",
            }
            for key, label in labels.items():
                w = streams[key]
                print(
                    f"| {label} | {w['p50'] * 1000:.1f} ms | {w['p99'] * 1000:.1f} ms | "
                    f"{w['max'] * 1000:.1f} ms | {w['gateway_cpu_s']:.2f} s |",
                    flush=True,
                )
            print(
                f"(events delivered in the busy window: {streams['busy']['events_delivered']};"
                f" stream errors: {streams['errors'] or 'none'})"
            )
        if "cpu" in args.parts:
            off.start_gateway()
            on.start_worker()
            off.start_worker()
            wait_ready(on.url)
            wait_ready(off.url)
            cpu = part_cpu(args, on, off)
            report["cpu"] = cpu
            print(
                f"\n(load average {os.getloadavg()[0]:.1f}) "
                f"c = {args.concurrency}, DDIM-{args.steps}, {MODEL} ({args.net} network), "
                "one worker per stack, "
                f"{args.rounds} jobs per client per window, {args.repeats} windows per mode "
                "(alternated), medians:"
            )
            print(
                "| job events | client follows its job by | gateway CPU per job | vs off | "
                "net of idle CPU | vs off | jobs/s |"
            )
            print("|---|---|---|---|---|---|---|")
            labels = {
                "off": ("off", "`Prefer: wait`"),
                "wait": ("on", "`Prefer: wait`"),
                "sse": ("on", "its SSE stream"),
            }
            for mode, row in cpu.items():
                events, client = labels[mode]
                print(
                    f"| {events} | {client} | {row['gateway_cpu_ms_per_job']:.2f} ms | "
                    f"{100 * (row['vs_off'] - 1):+.1f} % | {row['net_cpu_ms_per_job']:.2f} ms | "
                    f"{100 * (row['net_vs_off'] - 1):+.1f} % | {row['jobs_per_s']:.2f} |",
                    flush=True,
                )
            print(
                "(idle gateway CPU: "
                + ", ".join(f"{m} {cpu[m]['idle_cpu_ms_per_s']:.1f} ms/s" for m in ("off", "wait"))
                + "; windows, gross ms/job: "
                + "; ".join(f"{m} {[round(w, 2) for w in r['windows_ms']]}" for m, r in cpu.items())
                + ")"
            )
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))
    finally:
        for each in (on, off):
            each.stop()
            cleanup_redis(args.redis_url, each.prefix)


if __name__ == "__main__":
    sys.exit(main())
