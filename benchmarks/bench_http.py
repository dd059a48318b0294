"""End-to-end serving throughput over HTTP against one worker, beside the bare in-process sampler.

One run, for each concurrency c (default 1, 8, 32, 64):
- http: c clients, each in a loop POSTing a one-image /generate (DDIM, `--steps` steps, a class
  label, no guidance) with `Prefer: wait=60` to a gateway process in front of Redis and one
  `ddserve worker` process (continuous batching); requests/s and images/s over the measured window
  (after a warm-up request per client), and the latency p50;
- bare: `models.diffusion.sampler.sample(...)` in this process on a batch of c images with the same
  network, sampler and step count (no HTTP, Redis, PNG or storage); images/s.
HTTP windows and bare runs alternate (`--repeats` of each, medians reported) so that a busy
machine's load hits both alike.
e2e / bare at the same c is the serving stack's efficiency (target at c = 64: ≥ 80 %).
First, before the worker starts, the gateway's own time per request, submit → 202 (no wait), from
its `Server-Timing` header (target p50 ≤ 5 ms), one client and 8 clients at a time; the worker then
drains those jobs as its warm-up.

The model is the zoo's digits-ddpm if it is there, else a randomly initialised network of the same
architecture (models/recipes/digits-ddpm.json): speed does not depend on the weights. Redis: the
real server (`--redis-url`), keys under a private prefix, deleted afterwards.

    .venv/bin/python benchmarks/bench_http.py [--concurrency 1 8 32 64] [--steps 50] [--threads 1]
        [--rounds 2] [--repeats 2] [--submits 200] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: this checkout
from benchmarks.support import (
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

BIN = Path(sys.executable).parent


def prepare_zoo(scratch: Path) -> Path:
    """The zoo holding digits-ddpm: the shipped one, else a random model of its architecture."""
    shipped = ROOT / "models" / "zoo"
    if (shipped / MODEL / "config.json").exists() and (
        shipped / MODEL / "weights.safetensors"
    ).exists():
        return shipped
    zoo = random_ddpm_zoo(scratch / "zoo")
    print(f"(no trained {MODEL} in the zoo: a random network of its architecture)", flush=True)
    return zoo


def bare_images_per_s(zoo: Path, batch: int, steps: int, rounds: int) -> float:
    """Images/s of the library sampler alone on a batch of `batch` class-conditional images."""
    import torch

    from models.catalog import load_catalog
    from models.diffusion.sampler import SamplerSettings, sample
    from models.diffusion.schedule import NoiseSchedule
    from models.registry import load_network

    entry = load_catalog(zoo)[MODEL]
    net = load_network(entry)
    schedule = NoiseSchedule.create(entry.schedule.kind, entry.schedule.num_timesteps)
    g = torch.Generator().manual_seed(batch)
    shape = (entry.image.channels, entry.image.height, entry.image.width)
    x = torch.randn((batch, *shape), generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)
    settings = SamplerSettings("ddim", steps, clip_denoised=True)
    times = []
    with torch.inference_mode():
        sample(net, schedule, x, settings, cond=labels)  # warm-up
        for _ in range(rounds):
            start = time.perf_counter()
            sample(net, schedule, x, settings, cond=labels)
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


async def http_round(url: str, concurrency: int, rounds: int, steps: int) -> dict[str, float]:
    """c closed-loop clients, `rounds` measured requests each after one warm-up request."""
    limits = httpx.Limits(
        max_connections=concurrency + 4,
        max_keepalive_connections=concurrency + 4,
        keepalive_expiry=2.0,  # well inside the server's keep-alive: no close/reuse race
    )
    latencies: list[float] = []
    batch_sizes: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(i: int) -> None:
            body = {
                "model": MODEL,
                "n": 1,
                "sampler": "ddim",
                "num_inference_steps": steps,
                "class_label": i % 10,
                "guidance_scale": 1.0,  # s = 1: no guidance
                "seed": i,
            }
            start = time.perf_counter()
            r = await client.post("/generate", json=body, headers={"Prefer": "wait=60"})
            job = r.json()
            if r.status_code != 200 or job["status"] != "succeeded":
                raise RuntimeError(f"request failed: {r.status_code} {str(job)[:300]}")
            latencies.append(time.perf_counter() - start)
            batch_sizes.append(job["metrics"]["batch_size"] or 0)

        async def client_loop(k: int, count: int) -> None:
            for j in range(count):
                await one(k * 1000 + j)

        await asyncio.gather(*(client_loop(k, 1) for k in range(concurrency)))  # warm-up
        latencies.clear()
        batch_sizes.clear()
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(k, rounds) for k in range(concurrency)))
        elapsed = time.perf_counter() - start
    done = len(latencies)
    return {
        "requests_per_s": done / elapsed,
        "images_per_s": done / elapsed,  # one image per request
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "mean_batch": statistics.mean(batch_sizes),
    }


async def submit_timings(
    url: str, count: int, steps: int, concurrency: int
) -> tuple[dict[str, float], list[str]]:
    """Gateway time (its Server-Timing header) and client round trip of submit → 202 (no wait),
    `concurrency` submits at a time. Returns the figures and the job ids."""
    server_ms: list[float] = []
    client_ms: list[float] = []
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        sem = asyncio.Semaphore(concurrency)

        async def submit(i: int) -> None:
            # one step: these jobs only measure the gateway; the worker drains them quickly
            body = {"model": MODEL, "num_inference_steps": 1, "class_label": i % 10, "seed": i}
            async with sem:
                start = time.perf_counter()
                r = await client.post("/generate", json=body)
                client_ms.append(1000 * (time.perf_counter() - start))
            if r.status_code != 202:
                raise RuntimeError(f"submit failed: {r.status_code} {r.text[:300]}")
            server_ms.append(float(r.headers["server-timing"].split("dur=")[1]))
            ids.append(r.json()["id"])

        await asyncio.gather(*(submit(i) for i in range(count)))
    server_ms.sort()
    figures = {
        "concurrency": concurrency,
        "gateway_p50_ms": statistics.median(server_ms),
        "gateway_p95_ms": server_ms[int(0.95 * (len(server_ms) - 1))],
        "client_p50_ms": statistics.median(client_ms),
    }
    return figures, ids


async def drain(url: str, ids: list[str], timeout_s: float = 900) -> None:
    """Wait until every job in `ids` is finished (the worker's warm-up)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for job_id in ids:
            while (job := (await client.get(f"/jobs/{job_id}")).json())["status"] in (
                "queued",
                "running",
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the queue did not drain: {str(job)[:500]}")
                await asyncio.sleep(0.05)
            if job["status"] != "succeeded":
                raise RuntimeError(f"a job did not succeed: {str(job)[:500]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument(
        "--steps", type=int, default=50, help="DDIM steps per image (digits-ddpm's default: 50)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="measured requests per client")
    parser.add_argument("--bare-rounds", type=int, default=2, help="timed bare runs per repeat")
    parser.add_argument("--repeats", type=int, default=2, help="HTTP windows and bare runs per c")
    parser.add_argument("--submits", type=int, default=200, help="requests of the 202-time phase")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, worker and bare")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="bench-http-"))
    zoo = prepare_zoo(scratch)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = gateway_env(
        args.redis_url,
        prefix,
        zoo,
        MODEL,
        scratch / "images",
        max_queue_length=100000,
        max_batch=max(64, max(args.concurrency)),
        device=args.device,
        port=port,
    )
    env["OMP_NUM_THREADS"] = str(args.threads)
    processes = [subprocess.Popen([str(BIN / "ddserve"), "serve"], env=env, cwd=ROOT)]
    rows = []
    try:
        # 1. The gateway's own time, submit → 202, with no worker yet: nothing but the gateway
        #    (and the client) busy on this machine's cores. The jobs wait in the queue.
        wait_healthy(url)
        print(f"gateway alone, {args.submits} submits (no wait) per row, the jobs left queued:")
        print(
            "| clients at a time | gateway p50 (Server-Timing) | gateway p95 | "
            "client round trip p50 | gateway CPU per request |"
        )
        print("|---|---|---|---|---|")
        submits, queued = [], []
        queued += asyncio.run(submit_timings(url, 20, args.steps, 1))[1]  # warm-up, not counted
        gateway_pid = processes[0].pid
        for c in (1, 8):
            before = cpu_seconds(gateway_pid)
            figures, ids = asyncio.run(submit_timings(url, args.submits, args.steps, c))
            after = cpu_seconds(gateway_pid)
            if before is not None and after is not None:
                figures["gateway_cpu_ms"] = 1000 * (after - before) / args.submits
            submits.append(figures)
            queued += ids
            cpu = figures.get("gateway_cpu_ms")
            print(
                f"| {c} | {figures['gateway_p50_ms']:.2f} ms | {figures['gateway_p95_ms']:.2f} ms | "
                f"{figures['client_p50_ms']:.2f} ms | "
                + (f"{cpu:.2f} ms |" if cpu is not None else "— |"),
                flush=True,
            )
        # 2. One worker; it drains those jobs (its warm-up), then the throughput rounds.
        worker = [str(BIN / "ddserve"), "worker", "--name", f"{prefix}-w"]
        processes.append(subprocess.Popen(worker, env=env, cwd=ROOT))
        wait_ready(url)
        asyncio.run(drain(url, queued))
        print(
            f"\ntorch {torch.__version__}, {args.threads} thread(s), {args.device}, "
            f"DDIM-{args.steps}, one image per request, one worker (continuous batching)"
        )
        print(
            "| concurrency | HTTP req/s | HTTP images/s | p50 latency | mean batch | bare images/s "
            "(batch = concurrency) | e2e / bare |"
        )
        print("|---|---|---|---|---|---|---|")
        for c in args.concurrency:
            # HTTP windows and bare runs alternate, so that the machine's load hits both alike.
            https, bares = [], []
            for _ in range(args.repeats):
                https.append(asyncio.run(http_round(url, c, args.rounds, args.steps)))
                bares.append(bare_images_per_s(zoo, c, args.steps, args.bare_rounds))
            middle = statistics.median(h["images_per_s"] for h in https)
            http = min(https, key=lambda h: abs(h["images_per_s"] - middle))  # the median window
            bare = statistics.median(bares)
            row = {
                "concurrency": c,
                **http,
                "bare_images_per_s": bare,
                "efficiency": http["images_per_s"] / bare,
            }
            rows.append(row)
            print(
                f"| {c} | {http['requests_per_s']:.1f} | {http['images_per_s']:.1f} | "
                f"{http['latency_p50_ms']:.0f} ms | {http['mean_batch']:.1f} | {bare:.1f} | "
                f"{100 * row['efficiency']:.0f} % |",
                flush=True,
            )
        if args.json:
            args.json.write_text(
                json.dumps(
                    {"rows": rows, "submit": submits, "args": vars(args)}, indent=2, default=str
                )
            )
    finally:
        stop_all(processes)
        cleanup_redis(args.redis_url, prefix)


if __name__ == "__main__":
    main()
