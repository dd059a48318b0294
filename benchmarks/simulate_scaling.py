"""A discrete-event simulation of a ddserve deployment: queueing delay, batch occupancy and Redis load
at 10 / 100 / 1,000 requests/s with 1 / 10 / 100 workers, and the first bottleneck of each.

The model (docs/scaling.md explains each input and where it was measured):
- requests arrive as a Poisson process of rate λ; each asks for one image with a step count drawn
  from a mix (default 60 % 20 steps, 30 % 50, 10 % 100) and classifier-free guidance with
  probability `--guided` (two network rows);
- W workers share one queue (RQ's FIFO list); each runs continuous batching as `workers/engine.py`
  does: at every step boundary it admits waiting jobs while rows are free (`--max-batch`), then
  makes one network call of duration `a + b·rows` (the per-step cost, measured: `--step-fixed-ms`,
  `--step-per-row-ms`), and every running job advances one step;
- Redis: each job costs the commands measured by `benchmarks/redis_cost.py` (submit, the worker's
  share, one status read per `--poll-s` of its life); each busy worker exchanges with Redis at most
  every `--redis-interval-ms`; an idle one heartbeats. Redis's load is compared with what one
  primary sustains (`--redis-ops`, measured with `redis-benchmark` on this machine);
- gateways: `--gateway-ms` of CPU per request (measured: bench_http's Server-Timing) over G cores.
The first bottleneck is the resource with the highest load: the workers' rows (busy time × batch
occupancy: a worker stepping one image is busy but nearly empty), Redis's commands, or the gateways'
CPU (clients that poll `GET /jobs/{id}` every `--poll-s` while they wait). Plain Python, deterministic (seeded).

    .venv/bin/python benchmarks/simulate_scaling.py [--costs benchmarks/results/redis_cost.json]
        [--duration 60] [--json benchmarks/results/scaling.json]
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Job:
    arrived: float
    steps: int
    rows: int
    started: float | None = None
    left: int = 0


@dataclass
class Worker:
    running: list[Job] = field(default_factory=list)
    busy: bool = False
    rows_stepped: int = 0
    steps: int = 0
    busy_time: float = 0.0


@dataclass
class Outcome:
    rate: float
    workers: int
    finished: int
    throughput: float
    queue_p50_s: float
    queue_p99_s: float
    latency_p99_s: float
    occupancy: float
    worker_utilisation: float
    row_load: float
    redis_ops_per_s: float
    redis_utilisation: float
    gateway_utilisation: float
    bottleneck: str
    saturated: bool


def draw_steps(rng: random.Random, mix: list[tuple[float, int]]) -> int:
    pick, total = rng.random(), 0.0
    for share, steps in mix:
        total += share
        if pick <= total:
            return steps
    return mix[-1][1]


def simulate(rate: float, workers: int, args: argparse.Namespace, costs: dict) -> Outcome:
    rng = random.Random(args.seed)
    mix = [(0.6, 20), (0.3, 50), (0.1, 100)]
    fixed, per_row = args.step_fixed_ms / 1000, args.step_per_row_ms / 1000
    queue: deque[Job] = deque()
    pool = [Worker() for _ in range(workers)]
    events: list[tuple[float, int, str, int]] = []  # (time, tiebreak, kind, worker)
    counter = 0
    t, end = 0.0, args.duration
    next_arrival = rng.expovariate(rate)
    waits: list[float] = []
    latencies: list[float] = []
    max_queue = int(rate * args.duration)  # an overloaded system's queue only grows: stop there

    def start_step(index: int, now: float) -> None:
        nonlocal counter
        worker = pool[index]
        rows = sum(job.rows for job in worker.running)
        while queue and rows + queue[0].rows <= args.max_batch:
            job = queue.popleft()
            job.started, job.left = now, job.steps
            worker.running.append(job)
            waits.append(now - job.arrived)
            rows += job.rows
        if not worker.running:
            worker.busy = False
            return
        duration = fixed + per_row * rows
        worker.busy, worker.rows_stepped, worker.steps = (
            True,
            worker.rows_stepped + rows,
            worker.steps + 1,
        )
        worker.busy_time += duration
        counter += 1
        heapq.heappush(events, (now + duration, counter, "step", index))

    while True:
        upcoming = events[0][0] if events else math.inf
        if next_arrival <= upcoming and next_arrival < end:
            t = next_arrival
            steps = draw_steps(rng, mix)
            queue.append(Job(t, steps, 2 if rng.random() < args.guided else 1))
            next_arrival = t + rng.expovariate(rate)
            for index, worker in enumerate(pool):
                if not worker.busy:
                    start_step(index, t)
                    break
            if len(queue) > max_queue:
                break
            continue
        if not events or upcoming > end + args.drain:
            break
        t, _, _, index = heapq.heappop(events)
        worker = pool[index]
        still = []
        for job in worker.running:
            job.left -= 1
            if job.left == 0:
                latencies.append(t - job.arrived)
            else:
                still.append(job)
        worker.running = still
        start_step(index, t)

    span = max(t, 1e-9)
    finished = len(latencies)
    saturated = len(queue) > 0.05 * max(1, finished)
    rows_capacity = sum(w.steps for w in pool) * args.max_batch
    occupancy = sum(w.rows_stepped for w in pool) / rows_capacity if rows_capacity else 0.0
    utilisation = sum(w.busy_time for w in pool) / (span * workers)
    mean_life = statistics.fmean(latencies) if latencies else 0.0
    per_job_ops = (
        costs["submit_per_job"]["commands"]
        + costs["run_per_job"]["commands"]
        + costs["read_per_job"]["commands"] * max(1.0, mean_life / args.poll_s)
    )
    exchanges = workers * (1000.0 / args.redis_interval_ms) * utilisation
    idle_ops = workers * (1 - utilisation) * costs["idle_worker_per_s"]["commands"]
    redis_ops = rate * per_job_ops + exchanges * args.ops_per_exchange + idle_ops
    redis_util = redis_ops / args.redis_ops
    gateway_util = (
        rate * (1 + mean_life / args.poll_s) * args.gateway_ms / 1000 / args.gateway_cores
    )
    # A worker stepping a batch of 1 is busy but far from full: its load is the share of its
    # capacity in rows that it used (busy time × occupancy), which reaches 1 when jobs queue up.
    row_load = utilisation * occupancy
    loads = {"workers (network rows)": row_load, "redis": redis_util, "gateways": gateway_util}
    bottleneck = max(loads, key=lambda k: loads[k])
    return Outcome(
        rate=rate,
        workers=workers,
        finished=finished,
        throughput=round(finished / span, 1),
        queue_p50_s=round(statistics.median(waits), 3) if waits else math.nan,
        queue_p99_s=round(sorted(waits)[int(0.99 * (len(waits) - 1))], 3) if waits else math.nan,
        latency_p99_s=(
            round(sorted(latencies)[int(0.99 * (len(latencies) - 1))], 2) if latencies else math.nan
        ),
        occupancy=round(occupancy, 3),
        worker_utilisation=round(utilisation, 3),
        row_load=round(row_load, 3),
        redis_ops_per_s=round(redis_ops),
        redis_utilisation=round(redis_util, 3),
        gateway_utilisation=round(gateway_util, 3),
        bottleneck=bottleneck,
        saturated=saturated,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--costs", type=Path, default=RESULTS / "redis_cost.json")
    parser.add_argument("--rates", type=float, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--duration", type=float, default=60.0, help="arrival window, s")
    parser.add_argument("--drain", type=float, default=30.0)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--guided", type=float, default=0.5)
    parser.add_argument("--step-fixed-ms", type=float, default=8.0)
    parser.add_argument("--step-per-row-ms", type=float, default=0.25)
    parser.add_argument("--redis-interval-ms", type=float, default=50.0)
    parser.add_argument("--ops-per-exchange", type=float, default=6.0)
    parser.add_argument("--redis-ops", type=float, default=100_000.0)
    parser.add_argument("--poll-s", type=float, default=1.0)
    parser.add_argument("--gateway-ms", type=float, default=1.5)
    parser.add_argument("--gateway-cores", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    costs = json.loads(args.costs.read_text())
    outcomes = [simulate(r, w, args, costs) for r in args.rates for w in args.workers]
    header = (
        "| req/s | workers | done/s | queue p50 | queue p99 | latency p99 | occupancy | "
        "worker busy | row load | Redis ops/s | Redis util | gateway util | first bottleneck |"
    )
    print(header)
    print("|" + "---|" * 13)
    for o in outcomes:
        flag = " (saturated)" if o.saturated else ""
        print(
            f"| {o.rate:g} | {o.workers} | {o.throughput} | {o.queue_p50_s} s | {o.queue_p99_s} s | "
            f"{o.latency_p99_s} s | {o.occupancy:.0%} | {o.worker_utilisation:.0%} | "
            f"{o.row_load:.0%} | "
            f"{o.redis_ops_per_s} | {o.redis_utilisation:.0%} | {o.gateway_utilisation:.0%} | "
            f"{o.bottleneck}{flag} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "outcomes": [o.__dict__ for o in outcomes],
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
