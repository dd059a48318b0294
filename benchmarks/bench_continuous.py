"""Continuous batching against request-level batching and no batching, over HTTP, open loop.

What it measures (issue: continuous batching), in one run on this machine:
- the ceiling: the bare network's rows·steps/s (rows per second of network calls) at its best batch
  size, measured in-process with the worker's thread count;
- for each offered load (a fraction of the capacity that ceiling implies for the request mix) and
  each batching mode (`none`, `request`, `continuous`): throughput (images/s), p50 and p99 latency
  (POST to finished job, seen by the client), the mean batch occupancy (rows per network call over
  `max_batch`, from the worker's published counters) and the rows·steps/s the worker sustained.

Set-up: the real Redis, one gateway process (`ddserve serve`, auth off) and one worker process per
(load, mode) point (`ddserve worker --batching MODE`), all on this machine. The client sends
requests at Poisson arrival times regardless of completions (open loop: a slow server builds a
queue, as real traffic does) with `Prefer: wait` and polls `GET /jobs/{id}` when that runs out.

The request mix ("realistic"): num_inference_steps uniform in [10, 100], with probability 5 % 1000
(DDPM); n uniform in 1..8; half of the requests with classifier-free guidance (w = 3, two rows per
image); classes uniform.

    .venv/bin/python benchmarks/bench_continuous.py --synthetic            # random-weight U-Net
    .venv/bin/python benchmarks/bench_continuous.py --model digits-ddpm    # a zoo model

Writes benchmarks/results/continuous.json and continuous_latency.png and prints a Markdown table.
Not a test: it takes minutes and wants the machine to itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import torch
from redis import Redis

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODES = ("none", "request", "continuous")
TERMINAL = {"succeeded", "failed", "canceled"}


# --- the request mix ----------------------------------------------------------------------------
def sample_request(rng: random.Random, model: str, classes: int, long_fraction: float) -> dict:
    long = rng.random() < long_fraction
    guided = rng.random() < 0.5
    return {
        "model": model,
        "n": rng.randint(1, 8),
        "sampler": "ddpm" if long else "ddim",
        "num_inference_steps": 1000 if long else rng.randint(10, 100),
        "class_label": rng.randrange(classes),
        "guidance_scale": 3.0 if guided else 0.0,
        "seed": rng.randrange(2**31),
    }


def work_of(request: dict) -> float:
    """Rows·steps a request costs: n · (2 if guided) · steps."""
    rows = request["n"] * (2 if request["guidance_scale"] else 1)
    return float(rows * request["num_inference_steps"])


# --- the ceiling --------------------------------------------------------------------------------
def measure_ceiling(entry: Any, max_batch: int, seconds: float = 1.5) -> dict[str, Any]:
    """rows/s of bare network calls at batch sizes 1, 2, 4, … max_batch (random t and classes)."""
    from models.registry import load_network

    net = load_network(entry, "cuda" if torch.cuda.is_available() else "cpu")
    device = next(net.parameters()).device
    c, h = entry.network["unet"]["in_channels"], entry.network["unet"]["image_size"]
    per_batch = {}
    batch = 1
    while batch <= max_batch:
        x = torch.randn(batch, c, h, h, device=device)
        t = torch.randint(0, 1000, (batch,), device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        with torch.no_grad():
            net(x, t, y)  # warm-up
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                net(x, t, y)
                calls += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
        per_batch[batch] = batch * calls / (time.perf_counter() - start)
        batch *= 2
    best = max(per_batch, key=per_batch.__getitem__)
    return {"rows_per_s": per_batch, "best_batch": best, "ceiling": per_batch[best]}


# --- processes ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "ddserve.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


# --- one measurement point ----------------------------------------------------------------------
@dataclass
class JobRecord:
    """One request; times are seconds since the epoch. Latency uses the job's own timestamps
    (created_at → completed_at, written by the gateway and RQ), so the client may poll slowly."""

    sent_at: float
    images: int
    status: str = "pending"
    created_at: float | None = None
    done_at: float | None = None
    job_id: str | None = None

    @property
    def latency(self) -> float | None:
        if self.done_at is None:
            return None
        return self.done_at - (self.created_at or self.sent_at)


@dataclass
class Point:
    mode: str
    load: float
    offered_req_s: float
    sent: int = 0
    completed: int = 0
    incomplete: int = 0
    images_per_s: float = 0.0
    p50_s: float = 0.0
    p99_s: float = 0.0
    p99_lower_bound: bool = False
    occupancy: float = 0.0
    rows_steps_per_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def epoch(value: str | None) -> float | None:
    return None if value is None else datetime.fromisoformat(value).timestamp()


async def run_job(client: httpx.AsyncClient, body: dict, record: JobRecord, poll_s: float) -> None:
    try:
        answer = await client.post("/generate", json=body)
        job = answer.json()
        if answer.status_code >= 400:
            record.status = f"http {answer.status_code}"
            return
        record.job_id = job["id"]
        record.created_at = epoch(job.get("created_at"))
        while job["status"] not in TERMINAL:
            await asyncio.sleep(poll_s)
            job = (await client.get(f"/jobs/{record.job_id}")).json()
        record.status = job["status"]
        record.done_at = epoch(job.get("completed_at")) or time.time()
    except (httpx.HTTPError, asyncio.CancelledError) as exc:
        record.status = f"error {type(exc).__name__}"


def worker_counters(redis: Redis, key: str) -> dict[str, float]:
    raw = redis.hgetall(key)
    return {k.decode(): float(v) for k, v in raw.items() if k.decode() != "mode"}


async def open_loop(
    base_url: str,
    requests: list[dict],
    rate: float,
    duration: float,
    warmup: float,
    drain: float,
    redis: Redis,
    stats_key: str,
    seed: int,
    poll_s: float = 0.5,
) -> tuple[list[JobRecord], dict[str, float], dict[str, float], float, float]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        tasks: list[asyncio.Task] = []
        records: list[JobRecord] = []
        start = time.time()
        at, index, counters_start, t_start = 0.0, 0, {}, start
        while at < duration:
            now = time.time() - start
            if at > now:
                await asyncio.sleep(at - now)
            if not counters_start and at >= warmup:
                counters_start, t_start = worker_counters(redis, stats_key), time.time()
            body = requests[index % len(requests)]
            index += 1
            record = JobRecord(sent_at=time.time(), images=body["n"])
            records.append(record)
            tasks.append(asyncio.create_task(run_job(client, body, record, poll_s)))
            at += rng.expovariate(rate)
        counters_end, t_end = worker_counters(redis, stats_key), time.time()
        await asyncio.wait(tasks, timeout=drain)
        pending = [r for r in records if r.done_at is None and r.job_id]
        for task in tasks:
            task.cancel()
        for record in pending:  # leave nothing queued for the next point
            await client.post(f"/jobs/{record.job_id}/cancel")
    return records, counters_start, counters_end, t_start - start, t_end - start


def summarise(
    point: Point,
    records: list[JobRecord],
    start: float,
    c0: dict[str, float],
    c1: dict[str, float],
    window: tuple[float, float],
) -> Point:
    t0 = start + window[0]
    t1 = start + window[1]
    measured = [r for r in records if r.sent_at >= t0]
    now = time.time()
    latencies = [r.latency if r.latency is not None else now - r.sent_at for r in measured]
    point.sent = len(records)
    point.completed = sum(1 for r in measured if r.status == "succeeded")
    point.incomplete = sum(1 for r in measured if r.done_at is None)
    done_in_window = [r for r in records if r.done_at is not None and t0 <= r.done_at <= t1]
    point.images_per_s = sum(r.images for r in done_in_window) / max(t1 - t0, 1e-9)
    if latencies:
        ordered = sorted(latencies)
        point.p50_s = statistics.median(ordered)
        point.p99_s = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        point.p99_lower_bound = point.incomplete > 0
    calls = c1.get("network_calls", 0) - c0.get("network_calls", 0)
    rows = c1.get("rows_total", 0) - c0.get("rows_total", 0)
    max_rows = c1.get("max_rows", 1) or 1
    point.occupancy = rows / (calls * max_rows) if calls else 0.0
    elapsed = (c1.get("time", 0) - c0.get("time", 0)) or (t1 - t0)
    point.rows_steps_per_s = rows / elapsed if elapsed > 0 else 0.0
    network_s = c1.get("network_s", 0) - c0.get("network_s", 0)
    step_s = c1.get("step_s", 0) - c0.get("step_s", 0)
    point.extra = {
        # share of the worker's wall time spent in network calls / in whole denoising steps
        "network_share": network_s / elapsed if elapsed > 0 else 0.0,
        "step_share": step_s / elapsed if elapsed > 0 else 0.0,
        # what the network itself delivered under this run's contention, at the batches it got
        "network_rows_per_s": rows / network_s if network_s > 0 else 0.0,
    }
    return point


# --- the run ------------------------------------------------------------------------------------
def prepare_zoo(args: argparse.Namespace, workdir: Path) -> tuple[Path, str]:
    """The zoo to serve: the given one, or a temporary one with a random-weight U-Net built from
    the digits-ddpm recipe (serving speed does not depend on the weights' values)."""
    if not args.synthetic:
        return Path(args.zoo), args.model
    from models.nets.unet import UNet, UNetConfig
    from models.registry import WEIGHTS_FILE, save_weights, write_entry

    recipe = json.loads((ROOT / "models" / "recipes" / "digits-ddpm.json").read_text())
    unet = recipe["unet"] | json.loads(args.unet or "{}")
    torch.manual_seed(0)
    net = UNet(UNetConfig.from_dict(unet))
    zoo = workdir / "zoo"
    folder = zoo / "bench-ddpm"
    folder.mkdir(parents=True)
    save_weights(net, folder / WEIGHTS_FILE)
    entry = dict(recipe["entry"])
    entry.pop("classifier", None)
    entry.update(
        name="bench-ddpm",
        dataset="digits",
        schedule=recipe["schedule"],
        network={"unet": unet},
        files={"weights": WEIGHTS_FILE},
    )
    write_entry(folder, entry)
    return zoo, "bench-ddpm"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-ddpm")
    parser.add_argument("--zoo", default=str(ROOT / "models" / "zoo"))
    parser.add_argument("--synthetic", action="store_true", help="random-weight digits-ddpm U-Net")
    parser.add_argument("--unet", default=None, help="JSON overrides of the synthetic U-Net")
    parser.add_argument("--loads", type=float, nargs="+", default=[0.3, 0.6, 0.9])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--duration", type=float, default=90.0, help="arrival window per point, s")
    parser.add_argument("--warmup", type=float, default=15.0, help="not measured, s")
    parser.add_argument("--drain", type=float, default=60.0, help="wait for stragglers, s")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--long-fraction", type=float, default=0.05, help="share of 1000-step jobs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "continuous.json"))
    parser.add_argument(
        "--from-json", nargs="+", default=None, help="only redraw table and plot from results"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        result = merge_results([json.loads(Path(p).read_text()) for p in args.from_json])
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if len(args.from_json) > 1:
            out.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, out.with_name(out.stem + "_latency.png"))
        print(markdown_table(result))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    workdir = Path(tempfile.mkdtemp(prefix="bench-continuous-"))
    zoo, model = prepare_zoo(args, workdir)
    from models.catalog import load_catalog

    entry = load_catalog(zoo)[model]
    classes = len(entry.conditioning.classes) if entry.conditioning else 1

    print(f"ceiling of {model} (torch threads: {torch.get_num_threads()}) …", flush=True)
    ceiling = measure_ceiling(entry, args.max_batch)
    print(json.dumps(ceiling), flush=True)
    rng = random.Random(args.seed)
    requests = [sample_request(rng, model, classes, args.long_fraction) for _ in range(5000)]
    mean_work = statistics.fmean(work_of(r) for r in requests)
    capacity = ceiling["ceiling"] / mean_work  # requests/s the bare network could serve
    print(
        f"ceiling {ceiling['ceiling']:.0f} rows·steps/s at batch {ceiling['best_batch']}; "
        f"mean request {mean_work:.0f} rows·steps → capacity {capacity:.3f} req/s",
        flush=True,
    )

    prefix = f"cbbench-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = os.environ | {
        "DDSERVE_REDIS_URL": args.redis_url,
        "DDSERVE_KEY_PREFIX": prefix,
        "DDSERVE_ZOO_DIR": str(zoo),
        "DDSERVE_MODELS": model,
        "DDSERVE_AUTH_ENABLED": "false",
        "DDSERVE_RATE_LIMIT_PER_MINUTE": "0",
        "DDSERVE_MAX_QUEUE_LENGTH": "100000",
        "DDSERVE_STORAGE_DIR": str(workdir / "images"),
        "DDSERVE_MAX_BATCH": str(args.max_batch),
        "DDSERVE_LOG_LEVEL": "WARNING",
        "DDSERVE_JOB_DEADLINE_S": "3600",
        "DDSERVE_HEARTBEAT_S": "1",
    }
    if args.threads:
        env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    redis = Redis.from_url(args.redis_url)
    base_url = f"http://127.0.0.1:{port}"
    gateway = start(["serve", "--port", str(port)], env, workdir / "gateway.log")
    points: list[Point] = []
    try:
        wait_for(lambda: httpx.get(f"{base_url}/healthz").status_code == 200, 60, "the gateway")
        for load in args.loads:
            for mode in args.modes:
                name = f"{prefix}-{mode}-{load}"
                worker = start(
                    ["worker", "--models", model, "--batching", mode, "--name", name],
                    env,
                    workdir / f"worker-{mode}-{load}.log",
                )
                stats_key = f"{prefix}:worker-stats:{name}"
                try:
                    wait_for(lambda key=stats_key: redis.exists(key), 120, f"worker {name}")
                    rate = load * capacity
                    print(f"load {load:.2f} ({rate:.3f} req/s), {mode} …", flush=True)
                    wall0 = time.time()
                    records, c0, c1, w0, w1 = asyncio.run(
                        open_loop(
                            base_url,
                            requests,
                            rate,
                            args.duration,
                            args.warmup,
                            args.drain,
                            redis,
                            stats_key,
                            args.seed + int(load * 1000),
                        )
                    )
                    point = summarise(Point(mode, load, rate), records, wall0, c0, c1, (w0, w1))
                    points.append(point)
                    print(json.dumps(asdict(point)), flush=True)
                finally:
                    stop(worker)
    finally:
        stop(gateway)
        for key in redis.scan_iter(match=f"*{prefix}*", count=1000):
            redis.delete(key)

    ceiling_after = measure_ceiling(entry, args.max_batch)  # the machine may have changed
    print(json.dumps(ceiling_after), flush=True)
    result = {
        "model": model,
        "synthetic": args.synthetic,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "max_batch": args.max_batch,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "long_fraction": args.long_fraction,
        "ceiling": ceiling,
        "ceiling_after": ceiling_after,
        "mean_request_rows_steps": mean_work,
        "capacity_req_s": capacity,
        "points": [asdict(p) for p in points],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_name(out.stem + "_latency.png"))
    print(markdown_table(result))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs (e.g. two ranges of load) as one result; the ceiling is the best measured."""
    merged = dict(results[0])
    merged["points"] = [p for r in results for p in r["points"]]
    merged["runs"] = [{k: v for k, v in r.items() if k != "points"} for r in results]
    best = max(
        (r[key] for r in results for key in ("ceiling", "ceiling_after") if key in r),
        key=lambda c: c["ceiling"],
    )
    merged["ceiling"] = merged["ceiling_after"] = best
    return merged


def markdown_table(result: dict[str, Any]) -> str:
    rows = [
        "| offered load | mode | images/s | p50 latency (s) | p99 latency (s) | occupancy | "
        "rows·steps/s (% of ceiling) | network share of worker time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ceiling = max(result["ceiling"]["ceiling"], result["ceiling_after"]["ceiling"])
    for p in result["points"]:
        p99 = f"{'≥' if p['p99_lower_bound'] else ''}{p['p99_s']:.1f}"
        rows.append(
            f"| {p['load']:.2f} ({p['offered_req_s']:.2f} req/s) | {p['mode']} | "
            f"{p['images_per_s']:.2f} | {p['p50_s']:.1f} | {p99} | {p['occupancy']:.2f} | "
            f"{p['rows_steps_per_s']:.0f} ({100 * p['rows_steps_per_s'] / ceiling:.0f} %) | "
            f"{100 * p['extra'].get('network_share', 0):.0f} % |"
        )
    return "\n".join(rows)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colours = {"none": "tab:gray", "request": "tab:orange", "continuous": "tab:blue"}
    for mode in MODES:
        points = sorted(
            (p for p in result["points"] if p["mode"] == mode), key=lambda p: p["offered_req_s"]
        )
        if not points:
            continue
        loads = [p["offered_req_s"] for p in points]
        colour = colours[mode]
        axes[0].plot(
            loads, [p["p99_s"] for p in points], marker="o", color=colour, label=f"{mode} p99"
        )
        axes[0].plot(
            loads,
            [p["p50_s"] for p in points],
            marker=".",
            linestyle="--",
            color=colour,
            label=f"{mode} p50",
        )
        axes[1].plot(
            loads, [p["images_per_s"] for p in points], marker="o", color=colour, label=mode
        )
    axes[0].set(xlabel="offered load (requests/s)", ylabel="latency (s)", yscale="log")
    axes[0].set_title("latency against load")
    axes[1].set(xlabel="offered load (requests/s)", ylabel="throughput (images/s)")
    axes[1].set_title("throughput against load")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{result['model']} on {result['device']} ({result['torch_threads']} threads), "
        f"max_batch {result['max_batch']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
