"""Continuous batching against request-level batching and no batching, over HTTP, open loop.

What it measures (issue: continuous batching), in one run on this machine:
- the ceiling: the bare network's rows·steps/s (rows per second of network calls) at its best batch
  size, measured in a process on the worker's CPUs with the worker's thread count and allocator
  setting (`DDSERVE_RETAIN_FREED_MEMORY`);
- for each offered load (a fraction of the capacity that ceiling implies for the request mix) and
  each batching mode (`none`, `request`, `continuous`): throughput (images/s), p50 and p99 latency
  (POST to finished job, seen by the client), the mean batch occupancy (rows per network call over
  `max_batch`, from the worker's published counters) and the rows·steps/s the worker sustained;
- with `--paired-segments N`, afterwards: a saturated continuous-batching worker's rows·steps/s
  over N running segments, each compared with ceiling probes taken just before and just after it on the
  worker's CPUs, the worker paused meanwhile (seconds apart, so the machine's drift cancels), and
  pooled over the run (`pooled`);

Set-up: a Redis server, one gateway process (`ddserve serve`, auth off) and one worker process per
(load, mode) point (`ddserve worker --batching MODE`), all on this machine. The client sends
requests at Poisson arrival times regardless of completions (open loop: a slow server builds a
queue, as real traffic does) and polls `GET /jobs/{id}` every `--poll` seconds; latency comes from
the job's own timestamps, so the poll interval does not change it.

Isolation (`--worker-cpus`, default CPU 0 on a machine with two or more): the worker runs on its
own CPUs, and the gateway, the client and a private Redis server (started on a free port unless
`--redis-url` names one) on the others — as in a deployment, where a GPU worker has its accelerator
to itself and the gateway runs elsewhere. The ceiling is measured in a separate process pinned to
the worker's CPUs with its thread count, before every point and after the last, so each point is
compared with the ceilings measured just before and just after it (the higher of the two: this
machine's speed drifts during a run).

The request mix ("realistic"): num_inference_steps uniform in [10, 100], with probability 5 % 1000
(DDPM); n uniform in 1..8; half of the requests with classifier-free guidance (guidance_scale s = 4,
i.e. the sampling library's w = 3; two rows per image), the others with s = 1 (none); classes
uniform.

    .venv/bin/python benchmarks/bench_continuous.py --synthetic            # random-weight U-Net
    .venv/bin/python benchmarks/bench_continuous.py --model digits-ddpm    # a zoo model

With `--settings SAMPLER:STEPS …` (issue #22's serving figure) every request of the mix uses that
sampler and step count instead (no 1000-step jobs), one setting after the other at each load, each
load a fraction of that setting's own capacity; the table then compares their images/s side by side
(`settings_summary`): e.g. `--settings ddim:50 ddim:10 unipc:5 --modes continuous`.

Writes benchmarks/results/continuous.json and continuous_latency.png and prints a Markdown table.
Not a test: it takes minutes and wants the machine to itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import torch
from redis import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: this checkout
from benchmarks.support import free_port, random_ddpm_zoo
from ddserve.params import KARRAS_SAMPLERS, NO_GUIDANCE, ORDER_SAMPLERS, SAMPLERS
from ddserve.settings import Settings
from ddserve.spec import GenerateSpec
from workers.allocator import retain_freed_memory

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODES = ("none", "request", "continuous")
SATURATED = 0.95  # occupancy from which a paired segment counts as saturated
TERMINAL = {"succeeded", "failed", "canceled"}


# --- the request mix ----------------------------------------------------------------------------
def sample_request(
    rng: random.Random,
    model: str,
    classes: int,
    long_fraction: float,
    setting: tuple[str, int] | None = None,
) -> dict:
    """One request body of the mix (`POST /generate`); guidance_scale is the public s. With a
    `setting` (sampler, steps) every request uses it; the rest of the mix draws the same."""
    long = rng.random() < long_fraction
    guided = rng.random() < 0.5
    n = rng.randint(1, 8)  # drawn in the order of the first version: same mix, same seed
    sampler, steps = ("ddpm", 1000) if long else ("ddim", rng.randint(10, 100))
    if setting is not None:
        sampler, steps = setting
    return {
        "model": model,
        "n": n,
        "sampler": sampler,
        "num_inference_steps": steps,
        "class_label": rng.randrange(classes),
        "guidance_scale": 4.0 if guided else 1.0,  # s: 1 = no guidance
        "seed": rng.randrange(2**31),
    }


def parse_setting(text: str) -> tuple[str, int]:
    """`--settings` item "SAMPLER:STEPS" (e.g. "unipc:5")."""
    sampler, _, steps = text.partition(":")
    if sampler not in SAMPLERS or not steps.isdigit():
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected SAMPLER:STEPS, SAMPLER one of {SAMPLERS}"
        )
    return sampler, int(steps)


def setting_name(setting: tuple[str, int] | None) -> str:
    return "mix" if setting is None else f"{setting[0]}-{setting[1]}"


def work_of(request: dict) -> float:
    """Rows·steps a request costs: n · (2 if guided) · steps."""
    rows = request["n"] * (2 if request["guidance_scale"] > NO_GUIDANCE else 1)
    return float(rows * request["num_inference_steps"])


def job_spec(request: dict) -> GenerateSpec:
    """The job spec the gateway would queue for a request of the mix (every field resolved as
    `service.normalize` resolves it for the digits-ddpm card), for benchmarks that feed an engine
    directly."""
    return GenerateSpec(
        model=request["model"],
        n=request["n"],
        sampler=request["sampler"],
        num_inference_steps=request["num_inference_steps"],
        eta=0.0,
        use_karras_sigmas=False if request["sampler"] in KARRAS_SAMPLERS else None,
        solver_order=2 if request["sampler"] in ORDER_SAMPLERS else None,
        class_label=request["class_label"],
        guidance_scale=request["guidance_scale"],
        classifier_scale=0.0,
        clip_denoised=True,
        seed=request["seed"],
    )


# --- the ceiling --------------------------------------------------------------------------------
def bare_network(entry: Any) -> torch.nn.Module:
    from models.registry import load_network

    return load_network(entry, "cuda" if torch.cuda.is_available() else "cpu")


def rows_per_second(net: torch.nn.Module, entry: Any, batch: int, seconds: float) -> float:
    """rows/s of back-to-back bare network calls over `batch` rows (random x, t and classes)."""
    device = next(net.parameters()).device
    c, h = entry.network["unet"]["in_channels"], entry.network["unet"]["image_size"]
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
    return batch * calls / (time.perf_counter() - start)


def measure_ceiling(entry: Any, max_batch: int, seconds: float = 1.5) -> dict[str, Any]:
    """rows/s of bare network calls at batch sizes 1, 2, 4, … max_batch."""
    net = bare_network(entry)
    per_batch = {}
    batch = 1
    while batch <= max_batch:
        per_batch[batch] = rows_per_second(net, entry, batch, seconds)
        batch *= 2
    best = max(per_batch, key=per_batch.__getitem__)
    return {"rows_per_s": per_batch, "best_batch": best, "ceiling": per_batch[best]}


def best_batch(ceilings: list[dict[str, Any]]) -> int:
    """The batch size with the highest mean rate over the ceilings measured so far (one noisy
    ceiling alone may crown a neighbour of the true best)."""
    sizes = [str(size) for size in ceilings[0]["rows_per_s"]]  # keys are str after JSON
    mean = {
        size: statistics.fmean(float(c["rows_per_s"][size]) for c in ceilings) for size in sizes
    }
    return int(max(mean, key=mean.__getitem__))


def serve_ceiling(entry: Any) -> None:
    """`--ceiling-server`: answer each stdin line "BATCH SECONDS" with the rows/s of bare calls."""
    net = bare_network(entry)
    for line in sys.stdin:
        batch, seconds = line.split()
        print(rows_per_second(net, entry, int(batch), float(seconds)), flush=True)


def ceiling_command(mode: str, zoo: Path, model: str, threads: int) -> list[str]:
    """This module as a ceiling process (`--ceiling-only` or `--ceiling-server`)."""
    command = [sys.executable, "-m", "benchmarks.bench_continuous", mode]
    return [*command, "--zoo", str(zoo), "--model", model, "--threads", str(threads)]


def measure_ceiling_pinned(
    zoo: Path, model: str, max_batch: int, cpus: set[int] | None, threads: int
) -> dict[str, Any]:
    """`measure_ceiling` in a fresh process on the worker's CPUs with its thread count (what the
    worker's network calls could do there, with nothing else on those CPUs)."""
    done = subprocess.run(
        [*ceiling_command("--ceiling-only", zoo, model, threads), "--max-batch", str(max_batch)],
        cwd=ROOT,
        env=os.environ | thread_env(threads),
        preexec_fn=pinning(cpus),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- sustained throughput against the ceiling, seconds apart -------------------------------------
class CeilingProbe:
    """A process on the worker's CPUs that times the bare network when asked and otherwise sleeps
    on its stdin, so that the ceiling can be measured within seconds of the worker's own rate."""

    def __init__(self, zoo: Path, model: str, cpus: set[int] | None, threads: int) -> None:
        self.process = subprocess.Popen(
            ceiling_command("--ceiling-server", zoo, model, threads),
            cwd=ROOT,
            env=os.environ | thread_env(threads),
            preexec_fn=pinning(cpus),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def measure(self, batch: int, seconds: float) -> float:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{batch} {seconds}\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(30)


def next_publish(redis: Redis, key: str, after: float, timeout: float = 10.0) -> dict[str, float]:
    """The worker's counters from its first publication (one per heartbeat) later than `after`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counters = worker_counters(redis, key)
        if counters.get("time", 0.0) > after:
            return counters
        time.sleep(0.02)
    raise RuntimeError(f"the worker published no counters after {after}")


def paired_segments(
    worker: subprocess.Popen,
    probe: CeilingProbe,
    redis: Redis,
    stats_key: str,
    batch: int,
    segments: int,
    run_s: float,
    probe_s: float,
) -> list[dict[str, float]]:
    """Alternate a saturated worker's running segments with ceiling probes on its CPUs.

    The worker is paused (SIGSTOP) while the probe times the bare network at `batch` rows for
    `probe_s`; then it runs for `run_s`, and its rate is taken between two of its own counter
    publications inside that segment. Each segment is compared with the probes just before and
    just after it, seconds apart rather than minutes: this machine's speed drifts by tens of
    percent over minutes."""

    def probe_paused() -> float:
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            return probe.measure(batch, probe_s)
        finally:
            os.kill(worker.pid, signal.SIGCONT)

    pairs = []
    before = probe_paused()
    for _ in range(segments):
        resumed = time.time()
        # The second publication after resuming: a network call the pause cut in two has ended
        # by then, so the pause is in no counter of the window.
        first = next_publish(redis, stats_key, after=resumed)
        start = next_publish(redis, stats_key, after=first["time"])
        time.sleep(max(0.0, run_s - (time.time() - resumed)))
        end = next_publish(redis, stats_key, after=time.time())
        after = probe_paused()
        elapsed = end["time"] - start["time"]
        rows = end["rows_total"] - start["rows_total"]
        calls = end["network_calls"] - start["network_calls"]
        pairs.append(
            {
                "seconds": elapsed,
                "rows_steps_per_s": rows / elapsed,
                "ceiling_before": before,
                "ceiling_after": after,
                "ratio": rows / elapsed / max(before, after),
                "occupancy": rows / (calls * end.get("max_batch", 1)) if calls else 0.0,
                "network_share": (end["network_s"] - start["network_s"]) / elapsed,
            }
        )
        print(f"segment: {json.dumps(pairs[-1])}", flush=True)
        before = after
    return pairs


def run_paired(
    args: argparse.Namespace,
    env: dict[str, str],
    workdir: Path,
    served: tuple[Path, str],
    worker_cpus: set[int] | None,
    redis: Redis,
    base_url: str,
    requests: list[dict],
    rate: float,
    probe_batch: int,
) -> dict[str, Any]:
    """A continuous-batching worker kept saturated by the open-loop client while
    `paired_segments` alternates its running segments with ceiling probes at `probe_batch` rows
    (the bare network's best batch size)."""
    zoo, model = served
    name = f"{env['DDSERVE_KEY_PREFIX']}-paired"
    worker = start(
        ["worker", "--models", model, "--batching", "continuous", "--name", name],
        env,
        workdir / "worker-paired.log",
        worker_cpus,
    )
    stats_key = f"{env['DDSERVE_KEY_PREFIX']}:worker-stats:{name}"
    probe = CeilingProbe(zoo, model, worker_cpus, args.threads)
    done = threading.Event()
    found: list[dict[str, float]] = []
    failed: list[BaseException] = []

    def segments() -> None:
        try:
            time.sleep(args.warmup)  # let the queue build up first
            found.extend(
                paired_segments(
                    worker,
                    probe,
                    redis,
                    stats_key,
                    probe_batch,
                    args.paired_segments,
                    args.segment,
                    args.probe,
                )
            )
        except BaseException as exc:
            failed.append(exc)
        finally:
            done.set()

    try:
        wait_for(lambda: redis.exists(stats_key), 120, f"worker {name}")
        thread = threading.Thread(target=segments, name="paired-segments", daemon=True)
        thread.start()
        longest = args.warmup + args.paired_segments * (args.segment + 30.0)
        asyncio.run(
            open_loop(
                base_url,
                requests,
                rate,
                longest,
                args.warmup,
                0.0,
                redis,
                stats_key,
                args.seed + 7,
                args.poll,
                until=done,
            )
        )
        thread.join()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGCONT)
        stop(worker)
        probe.close()
    if failed:
        raise failed[0]
    # Only segments the client kept saturated say what the worker sustains (a slow first ceiling
    # makes the offered load too light for a machine that then speeds up).
    saturated = [pair for pair in found if pair["occupancy"] >= SATURATED]
    ratios = sorted(pair["ratio"] for pair in saturated) or [float("nan")]
    return {
        "batch": probe_batch,
        "max_batch": args.max_batch,
        "segment_s": args.segment,
        "probe_s": args.probe,
        "pairs": found,
        "saturated": len(saturated),
        "median_ratio": statistics.median(ratios),
        "min_ratio": ratios[0],
        "max_ratio": ratios[-1],
        **pooled(found),
    }


def pooled(pairs: list[dict[str, float]]) -> dict[str, float]:
    """Sustained and ceiling over the whole paired run: the saturated segments' rows·steps over
    their seconds, against the mean of the probes taken next to them (each probe once).

    Probes and segments alternate at a fixed rhythm, so both sample the machine's drift alike and
    the ratio of the two means has no bias from it. Each segment against the higher of its two
    probes (`ratio`) is the stricter figure: on a machine whose speed wanders by ±15 % within
    seconds, the higher of two short probes lies above the speed the segment ran at."""
    saturated = [i for i, pair in enumerate(pairs) if pair["occupancy"] >= SATURATED]
    if not saturated:
        return {"pooled_sustained": math.nan, "pooled_ceiling": math.nan, "pooled_ratio": math.nan}
    # Probe k was taken before segment k (and after segment k - 1).
    readings = [pairs[0]["ceiling_before"], *(pair["ceiling_after"] for pair in pairs)]
    used = sorted({k for i in saturated for k in (i, i + 1)})
    seconds = sum(pairs[i]["seconds"] for i in saturated)
    sustained = sum(pairs[i]["rows_steps_per_s"] * pairs[i]["seconds"] for i in saturated) / seconds
    ceiling = statistics.fmean(readings[k] for k in used)
    return {
        "pooled_sustained": sustained,
        "pooled_ceiling": ceiling,
        "pooled_ratio": sustained / ceiling,
        "probes_used": len(used),
    }


def paired_summary(paired: dict[str, Any]) -> str:
    nan = math.nan  # results written before the pooled figures existed
    pairs = [p for p in paired["pairs"] if p["occupancy"] >= SATURATED] or paired["pairs"]
    shares = [p["network_share"] for p in pairs]
    occupancy = [p["occupancy"] for p in pairs]
    return (
        f"paired: {paired['saturated']} of {len(paired['pairs'])} segments of "
        f"{paired['segment_s']:g} s at load {paired['load']:.2f} saturated "
        f"(occupancy >= {SATURATED}): sustained / ceiling (the higher probe around each "
        f"segment, batch {paired['batch']}) "
        f"median {100 * paired['median_ratio']:.0f} %, range {100 * paired['min_ratio']:.0f}–"
        f"{100 * paired['max_ratio']:.0f} %; pooled: {paired.get('pooled_sustained', nan):.0f} "
        f"rows·steps/s against a mean probe of {paired.get('pooled_ceiling', nan):.0f} = "
        f"{100 * paired.get('pooled_ratio', nan):.0f} %; "
        f"occupancy {min(occupancy):.3f}–{max(occupancy):.3f}; "
        f"network share {100 * min(shares):.0f}–{100 * max(shares):.0f} %"
    )


# --- processes ----------------------------------------------------------------------------------
def split_cpus(spec: str) -> tuple[set[int] | None, set[int] | None]:
    """(worker CPUs, everyone else's) from `--worker-cpus`: "auto" = CPU 0 against the rest when the
    machine has two or more, "none" = no pinning, else a comma-separated list."""
    available = os.sched_getaffinity(0)
    if spec == "none" or (spec == "auto" and len(available) < 2):
        return None, None
    worker = {min(available)} if spec == "auto" else {int(c) for c in spec.split(",")}
    others = available - worker
    if not worker <= available or not others:
        raise SystemExit(f"--worker-cpus {spec}: needs a subset of {sorted(available)} leaving one")
    return worker, others


def pinning(cpus: set[int] | None) -> Any:
    """A preexec_fn that moves the child onto `cpus` (its threads inherit it); None: no pinning."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def thread_env(threads: int) -> dict[str, str]:
    if not threads:
        return {}
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def start_redis(workdir: Path, cpus: set[int] | None) -> tuple[subprocess.Popen, str]:
    """A private Redis server (no persistence) on a free port, on the non-worker CPUs."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    process = subprocess.Popen(
        [*command, "--save", "", "--appendonly", "no"],
        stdout=(workdir / "redis.log").open("w"),
        stderr=subprocess.STDOUT,
        preexec_fn=pinning(cpus),
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    wait_for(lambda: Redis.from_url(url).ping(), 30, "the private Redis server")
    return process, url


def start(
    args: list[str], env: dict[str, str], log: Path, cpus: set[int] | None = None
) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "ddserve.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        preexec_fn=pinning(cpus),
        start_new_session=True,
    )


def stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    stop_all([process], timeout)


def stop_all(processes: list[subprocess.Popen], timeout: float = 30.0) -> None:
    """SIGTERM to every process at once, then wait for each (killed past `timeout`): their
    graceful shutdowns overlap instead of adding up."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
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
    setting: str = "mix"  # the request mix, or SAMPLER-STEPS for every request (--settings)
    sent: int = 0
    completed: int = 0
    incomplete: int = 0
    images_per_s: float = 0.0
    p50_s: float = 0.0
    p99_s: float = 0.0
    p99_lower_bound: bool = False
    occupancy: float = 0.0
    rows_steps_per_s: float = 0.0
    # The higher of the ceilings measured just before and just after this point (rows·steps/s).
    ceiling: float = 0.0
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
    until: threading.Event | None = None,
) -> tuple[list[JobRecord], dict[str, float], dict[str, float], float, float]:
    """Send `requests` at Poisson times for `duration` s (or until `until` is set), wait up to
    `drain` s for them, cancel what is left; the worker's counters at `warmup` and at the end."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        tasks: list[asyncio.Task] = []
        records: list[JobRecord] = []
        start = time.time()
        at, index, counters_start, t_start = 0.0, 0, {}, start
        while at < duration and not (until is not None and until.is_set()):
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
    max_batch = c1.get("max_batch", 1) or 1
    point.occupancy = rows / (calls * max_batch) if calls else 0.0
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
    zoo = random_ddpm_zoo(workdir / "zoo", "bench-ddpm", json.loads(args.unet or "{}"))
    return zoo, "bench-ddpm"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-ddpm")
    parser.add_argument("--zoo", default=str(ROOT / "models" / "zoo"))
    parser.add_argument("--synthetic", action="store_true", help="random-weight digits-ddpm U-Net")
    parser.add_argument("--unet", default=None, help="JSON overrides of the synthetic U-Net")
    parser.add_argument("--loads", type=float, nargs="*", default=[0.3, 0.6, 0.9])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--duration", type=float, default=90.0, help="arrival window per point, s")
    parser.add_argument("--warmup", type=float, default=15.0, help="not measured, s")
    parser.add_argument("--drain", type=float, default=60.0, help="wait for stragglers, s")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--long-fraction", type=float, default=0.05, help="share of 1000-step jobs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument(
        "--worker-cpus",
        default="auto",
        help='CPUs of the worker (comma-separated), "auto" = CPU 0 if there are 2+, "none"',
    )
    parser.add_argument("--poll", type=float, default=2.0, help="client's status poll interval, s")
    parser.add_argument(
        "--redis-url", default=None, help="use this Redis (default: a private redis-server)"
    )
    parser.add_argument("--ceiling-only", action="store_true", help="print the ceiling's JSON")
    parser.add_argument("--ceiling-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--paired-segments",
        type=int,
        default=0,
        help="then: this many segments of a saturated continuous worker, each between two "
        "ceiling probes taken seconds apart (the worker paused meanwhile)",
    )
    parser.add_argument("--paired-load", type=float, default=1.3)
    parser.add_argument("--segment", type=float, default=12.0, help="running segment, s")
    parser.add_argument("--probe", type=float, default=3.0, help="each ceiling probe, s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--settings",
        nargs="+",
        type=parse_setting,
        default=None,
        help="SAMPLER:STEPS for every request, one setting after another at each load",
    )
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
    from models.catalog import load_catalog

    if (args.ceiling_only or args.ceiling_server) and Settings().retain_freed_memory:
        # The worker's allocator setting (DDSERVE_RETAIN_FREED_MEMORY, inherited from this
        # environment): the ceiling times the same network code on the same heap policy.
        retain_freed_memory()
    if args.ceiling_only:
        entry = load_catalog(Path(args.zoo))[args.model]
        print(json.dumps(measure_ceiling(entry, args.max_batch)), flush=True)
        return 0
    if args.ceiling_server:
        serve_ceiling(load_catalog(Path(args.zoo))[args.model])
        return 0

    worker_cpus, other_cpus = split_cpus(args.worker_cpus)
    if other_cpus:
        os.sched_setaffinity(0, other_cpus)  # the client; the gateway and Redis inherit it
    workdir = Path(tempfile.mkdtemp(prefix="bench-continuous-"))
    zoo, model = prepare_zoo(args, workdir)
    entry = load_catalog(zoo)[model]
    classes = len(entry.conditioning.classes) if entry.conditioning else 1

    def ceiling_now() -> dict[str, Any]:
        found = measure_ceiling_pinned(zoo, model, args.max_batch, worker_cpus, args.threads)
        print(f"ceiling: {json.dumps(found)}", flush=True)
        return found

    print(
        f"ceiling of {model} (torch threads: {args.threads or 'default'}, worker CPUs: "
        f"{sorted(worker_cpus) if worker_cpus else 'any'}) …",
        flush=True,
    )
    ceiling = ceiling_now()
    ceilings = [ceiling]
    settings: list[tuple[str, int] | None] = list(args.settings or [None])
    mixes: dict[str, tuple[list[dict], float]] = {}  # setting → (its requests, its capacity)
    for setting in settings:
        rng = random.Random(args.seed)  # the same n, guidance and classes for every setting
        long_fraction = args.long_fraction if setting is None else 0.0
        requests = [
            sample_request(rng, model, classes, long_fraction, setting) for _ in range(5000)
        ]
        mean_work = statistics.fmean(work_of(r) for r in requests)
        capacity = ceiling["ceiling"] / mean_work  # requests/s the bare network could serve
        mixes[setting_name(setting)] = (requests, capacity)
        print(
            f"{setting_name(setting)}: ceiling {ceiling['ceiling']:.0f} rows·steps/s at batch "
            f"{ceiling['best_batch']}; mean request {mean_work:.0f} rows·steps → capacity "
            f"{capacity:.3f} req/s",
            flush=True,
        )
    requests, capacity = mixes[setting_name(settings[0])]

    prefix = f"cbbench-{uuid.uuid4().hex[:8]}"
    port = free_port()
    redis_server = None
    redis_url = args.redis_url
    if redis_url is None:
        redis_server, redis_url = start_redis(workdir, other_cpus)
    env = (
        os.environ
        | {
            "DDSERVE_REDIS_URL": redis_url,
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
        | thread_env(args.threads)
    )
    redis = Redis.from_url(redis_url)
    base_url = f"http://127.0.0.1:{port}"
    gateway = start(["serve", "--port", str(port)], env, workdir / "gateway.log")
    points: list[Point] = []
    paired: dict[str, Any] | None = None
    try:
        wait_for(lambda: httpx.get(f"{base_url}/healthz").status_code == 200, 60, "the gateway")
        points_to_run = [(ld, st, md) for ld in args.loads for st in settings for md in args.modes]
        for load, setting, mode in points_to_run:
            label = setting_name(setting)
            point_requests, point_capacity = mixes[label]
            if points:
                ceilings.append(ceiling_now())  # after the previous point, before this one
            name = f"{prefix}-{mode}-{load}-{label}"
            worker = start(
                ["worker", "--models", model, "--batching", mode, "--name", name],
                env,
                workdir / f"worker-{mode}-{load}-{label}.log",
                worker_cpus,
            )
            stats_key = f"{prefix}:worker-stats:{name}"
            try:
                wait_for(lambda key=stats_key: redis.exists(key), 120, f"worker {name}")
                rate = load * point_capacity
                print(f"load {load:.2f} ({rate:.3f} req/s), {label}, {mode} …", flush=True)
                wall0 = time.time()
                records, c0, c1, w0, w1 = asyncio.run(
                    open_loop(
                        base_url,
                        point_requests,
                        rate,
                        args.duration,
                        args.warmup,
                        args.drain,
                        redis,
                        stats_key,
                        args.seed + int(load * 1000),
                        args.poll,
                    )
                )
                point = summarise(Point(mode, load, rate, label), records, wall0, c0, c1, (w0, w1))
                points.append(point)
                print(json.dumps(asdict(point)), flush=True)
            finally:
                stop(worker)
        if args.paired_segments:
            ceilings.append(ceiling_now())  # after the last point
            rate = args.paired_load * capacity
            print(f"paired segments at load {args.paired_load:.2f} ({rate:.3f} req/s) …")
            probe_batch = best_batch(ceilings)
            paired = run_paired(
                args,
                env,
                workdir,
                (zoo, model),
                worker_cpus,
                redis,
                base_url,
                requests,
                rate,
                probe_batch,
            )
            paired |= {"load": args.paired_load, "offered_req_s": rate}
            print(paired_summary(paired), flush=True)
    finally:
        stop(gateway)
        for key in redis.scan_iter(match=f"*{prefix}*", count=1000):
            redis.delete(key)
        if redis_server is not None:
            stop(redis_server)

    if not args.paired_segments:
        ceilings.append(ceiling_now())
    for i, point in enumerate(points):
        before, after = ceilings[i]["ceiling"], ceilings[i + 1]["ceiling"]
        point.ceiling = max(before, after)
        point.extra |= {"ceiling_before": before, "ceiling_after": after}
    ceiling_after = ceilings[-1]
    result = {
        "model": model,
        "synthetic": args.synthetic,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "retain_freed_memory": Settings().retain_freed_memory,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "worker_cpus": sorted(worker_cpus) if worker_cpus else None,
        "other_cpus": sorted(other_cpus) if other_cpus else None,
        "poll_s": args.poll,
        "max_batch": args.max_batch,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "long_fraction": args.long_fraction,
        "ceiling": ceiling,
        "ceiling_after": ceiling_after,
        "ceilings": [c["ceiling"] for c in ceilings],
        "paired": paired,
        "mean_request_rows_steps": ceiling["ceiling"] / capacity,  # the first setting's
        "capacity_req_s": capacity,
        "settings": {name: {"capacity_req_s": c} for name, (_, c) in mixes.items()},
        "points": [asdict(p) for p in points],
    }
    if args.settings:
        result["settings_summary"] = settings_summary(result)
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


def settings_summary(result: dict[str, Any]) -> dict[str, Any]:
    """`--settings`: at each load and mode, each setting's images/s and latency, and its images/s
    over every other setting's — raw, and with each point divided by the ceiling measured around
    it (the machine's drift between the points cancels)."""
    summary: dict[str, Any] = {}
    for p in result["points"]:
        at = summary.setdefault(f"load {p['load']:g} {p['mode']}", {})
        at[p["setting"]] = {
            "images_per_s": p["images_per_s"],
            "p50_s": p["p50_s"],
            "p99_s": p["p99_s"],
            "p99_lower_bound": p["p99_lower_bound"],
            "images_per_s_per_ceiling": p["images_per_s"] / p["ceiling"] if p["ceiling"] else 0.0,
        }
    for at in summary.values():
        for name, row in at.items():
            row["ratio"] = {
                other: {
                    "images_per_s": row["images_per_s"] / o["images_per_s"],
                    "ceiling_normalised": row["images_per_s_per_ceiling"]
                    / o["images_per_s_per_ceiling"],
                    "p99": row["p99_s"] / o["p99_s"] if o["p99_s"] else None,
                }
                for other, o in at.items()
                if other != name and o["images_per_s"] > 0 and o["images_per_s_per_ceiling"] > 0
            }
    return summary


def markdown_table(result: dict[str, Any]) -> str:
    rows = [
        "| offered load | mode | images/s | p50 latency (s) | p99 latency (s) | occupancy | "
        "rows·steps/s (% of ceiling) | network share of worker time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    run_ceiling = max(result["ceiling"]["ceiling"], result["ceiling_after"]["ceiling"])
    for p in result["points"]:
        ceiling = p.get("ceiling") or run_ceiling  # older results have one pair per run
        p99 = f"{'≥' if p['p99_lower_bound'] else ''}{p['p99_s']:.1f}"
        rows.append(
            f"| {p['load']:.2f} ({p['offered_req_s']:.2f} req/s) | {p['mode']}"
            f"{'' if p.get('setting', 'mix') == 'mix' else ', ' + p['setting']} | "
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
    lines = sorted({(p["mode"], p.get("setting", "mix")) for p in result["points"]})
    palette = iter(["tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:olive"])
    for mode, setting in lines:
        points = sorted(
            (
                p
                for p in result["points"]
                if (p["mode"], p.get("setting", "mix")) == (mode, setting)
            ),
            key=lambda p: p["offered_req_s"],
        )
        label = mode if setting == "mix" else f"{mode} {setting}"
        colour = colours[mode] if setting == "mix" else next(palette, "black")
        loads = [p["offered_req_s"] for p in points]
        axes[0].plot(
            loads, [p["p99_s"] for p in points], marker="o", color=colour, label=f"{label} p99"
        )
        axes[0].plot(
            loads,
            [p["p50_s"] for p in points],
            marker=".",
            linestyle="--",
            color=colour,
            label=f"{label} p50",
        )
        axes[1].plot(
            loads, [p["images_per_s"] for p in points], marker="o", color=colour, label=label
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
