"""Redis round trips a batching worker makes per job and per scheduling round, and how long it takes
to drain a burst: a round's writes sent together (`BatchingWorker.flush_step`) beside the same
writes sent one by one, in one run.

`--jobs` one-image DDIM requests (`--steps` steps, a class label, no guidance) are enqueued at once,
as the gateway enqueues them, on the real Redis server, and one batching worker (in a thread of this
process, continuous batching, `--progress-every` as `DDSERVE_PROGRESS_EVERY`) drains them. Every
Redis round trip is counted on the client side (one `send_packed_command` per command or pipeline)
per thread: the worker's stepping thread (dequeue, start, and whatever it still waits for), its
round I/O thread (a round's writes and the cancel-set read, sent while the network steps:
`BatchingWorker.run_round`) and its heartbeat thread. The
network is a tiny random U-Net (8×8 images), so that Redis, not the network, is what the drain
time measures. Keys live under a private prefix and are deleted afterwards.

Two modes, alternated run by run (`--repeats` runs of each):
- `round`: the worker as shipped: a round's progress writes, successes and outcome counts go in one
  pipeline, or one ownership check and one transaction (`workers.step_writes`);
- `one-by-one`: the same writes, each sent when it is made, as the worker sent them before rounds
  were batched (commit 4a613ef): a progress write is one HSET, a success is the ownership check and
  RQ's own success path (`rq_bridge.finish_success`), and each outcome count is one more pipeline.

    .venv/bin/python benchmarks/bench_worker_redis.py [--jobs 64] [--steps 50] [--repeats 3]
        [--progress-every 5] [--added-latency-ms 0] [--redis-url redis://127.0.0.1:6379/0]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ddserve.job_metrics import JobOutcome
    from workers.step_writes import Success
    from workers.worker import BatchingWorker

MODEL = "bench-tiny"
MODES = ("round", "one-by-one")


def one_by_one_writes(worker: BatchingWorker) -> Any:
    """The `one-by-one` mode's `StepWrites`: every write sent when it is made (see the module
    docstring); `flush_step` then finds nothing to send."""
    from ddserve.job_metrics import record_outcome
    from workers import rq_bridge
    from workers.step_writes import StepWrites

    class OneByOneWrites(StepWrites):
        def save_meta(self, held: Any) -> None:
            held.job.save_meta()

        def succeed(self, success: Success) -> None:
            item = success.item  # its meta was saved just before (`RQJobs.succeed`)
            finish = lambda: rq_bridge.finish_success(  # noqa: E731
                worker, item.job, item.queue, item.execution, item.value
            )
            if worker.jobs.finish(success.held, finish) == "done":
                self.count(success.outcome())

        def count(self, outcome: JobOutcome) -> None:
            pipe = worker.connection.pipeline(transaction=False)
            record_outcome(pipe, self.prefix, outcome)
            pipe.execute()

    return OneByOneWrites(worker.settings.key_prefix)


def write_zoo(root: Path) -> Path:
    """A zoo with one tiny class-conditional U-Net (random weights: speed needs no training)."""
    import torch

    from models.nets.unet import UNet, UNetConfig
    from models.registry import WEIGHTS_FILE, save_weights, write_entry

    torch.manual_seed(0)
    net = UNet(
        UNetConfig(
            in_channels=1,
            image_size=8,
            base_channels=8,
            channel_mults=(1,),
            num_res_blocks=1,
            attention_resolutions=(),
            heads=2,
            num_classes=10,
        )
    )
    folder = root / MODEL
    folder.mkdir(parents=True)
    save_weights(net, folder / WEIGHTS_FILE)
    write_entry(
        folder,
        {
            "name": MODEL,
            "kind": "diffusion",
            "tasks": ["generate"],
            "dataset": "digits",
            "image": {"channels": 1, "height": 8, "width": 8},
            "conditioning": {"type": "class", "classes": [str(i) for i in range(10)]},
            "schedule": {"kind": "linear", "num_timesteps": 1000},
            "samplers": ["ddim"],
            "defaults": {"sampler": "ddim", "num_inference_steps": 50, "guidance_scale": 1.0},
            "network": {"unet": net.config.to_dict()},
            "files": {"weights": WEIGHTS_FILE},
        },
    )
    return root


@dataclass
class RedisUse:
    """Round trips and seconds spent in Redis I/O (sending, then waiting for and reading the
    replies), by thread name."""

    trips: Counter[str] = field(default_factory=Counter)
    seconds: Counter[str] = field(default_factory=Counter)


@contextmanager
def counted_round_trips(added_latency_s: float = 0.0) -> Iterator[RedisUse]:
    """Count Redis round trips and time Redis I/O by thread name while the block runs (redis-py
    sends each command, and each pipeline, with one `send_packed_command`, then reads each reply
    with `read_response`). `added_latency_s` is slept once per round trip, as a network between
    worker and Redis would add (0: this machine's loopback)."""
    from redis.connection import AbstractConnection

    use = RedisUse()
    lock = threading.Lock()
    send, read = AbstractConnection.send_packed_command, AbstractConnection.read_response

    def timed(name: str, started: float, trip: bool) -> None:
        with lock:
            use.seconds[name] += time.perf_counter() - started
            if trip:
                use.trips[name] += 1

    def counting_send(self: Any, command: Any, check_health: bool = True) -> None:
        started = time.perf_counter()
        if added_latency_s:
            time.sleep(added_latency_s)
        try:
            send(self, command, check_health)
        finally:
            timed(threading.current_thread().name, started, True)

    def timed_read(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return read(self, *args, **kwargs)
        finally:
            timed(threading.current_thread().name, started, False)

    AbstractConnection.send_packed_command = counting_send  # type: ignore[method-assign]
    AbstractConnection.read_response = timed_read  # type: ignore[method-assign]
    try:
        yield use
    finally:
        AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
        AbstractConnection.read_response = read  # type: ignore[method-assign]


def request(seed: int, steps: int) -> dict[str, Any]:
    """The job spec's JSON form, as the gateway enqueues it (every field resolved)."""
    from ddserve.spec import GenerateSpec

    return GenerateSpec(
        model=MODEL,
        n=1,
        sampler="ddim",
        num_inference_steps=steps,
        eta=0.0,
        class_label=seed % 10,
        guidance_scale=1.0,  # s = 1: no guidance
        classifier_scale=0.0,
        clip_denoised=True,
        seed=seed,
    ).to_json()


def one_run(
    redis_url: str,
    zoo: Path,
    scratch: Path,
    jobs: int,
    steps: int,
    progress_every: int,
    mode: str,
    added_latency_s: float = 0.0,
) -> dict[str, float]:
    """Enqueue `jobs` at once, let one worker (writing as `mode` says) drain them; round trips,
    scheduling rounds and drain time."""
    from redis import Redis
    from rq.queue import Queue

    from ddserve.jobs import JOB_FUNCTION, queue_name
    from ddserve.settings import Settings
    from workers.embedded import start_worker_thread
    from workers.model_pool import ModelPool

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        redis_url=redis_url,
        key_prefix=prefix,
        zoo_dir=zoo,
        models=MODEL,
        storage_dir=scratch / "images",
        progress_every=progress_every,
        redis_interval_ms=0,  # an exchange every round: what the README's table compares
        device="cpu",
        log_level="WARNING",
    )
    connection = Redis.from_url(redis_url)
    queue = Queue(queue_name(prefix, MODEL), connection=connection)
    ids: list[str] = []
    name = f"{prefix}-worker"
    try:
        handle = start_worker_thread(
            settings, Redis.from_url(redis_url), pool=ModelPool(settings), name=name
        )
        if not handle.ready.wait(120) or handle.error is not None:
            raise RuntimeError(f"the worker did not start: {handle.error}")
        worker = handle.worker
        assert worker is not None
        if mode == "one-by-one":
            # The jobs write into it and the exchange sends it: both get the one-by-one buffer.
            worker.jobs.writes = worker.exchange.writes = one_by_one_writes(worker)
        rounds = [0]
        step = worker.engine.step  # once per scheduling round (`BatchingWorker.run_round`)

        def counted_round() -> None:
            rounds[0] += 1
            step()

        worker.engine.step = counted_round  # type: ignore[method-assign]
        time.sleep(1.5)  # the worker is now in its blocking dequeue
        with counted_round_trips(added_latency_s) as use:
            pipe = connection.pipeline()
            for seed in range(jobs):
                job = queue.enqueue_call(
                    JOB_FUNCTION,
                    kwargs={"request": request(seed, steps)},
                    result_ttl=600,
                    failure_ttl=600,
                    pipeline=pipe,
                )
                ids.append(job.id)
            started = time.perf_counter()
            pipe.execute()
            while True:
                check = connection.pipeline(transaction=False)
                for job_id in ids:
                    check.hget(f"rq:job:{job_id}", "status")
                statuses = [s.decode() if s else "gone" for s in check.execute()]
                if all(s in ("finished", "failed", "stopped", "canceled") for s in statuses):
                    break
                time.sleep(0.005)
            elapsed = time.perf_counter() - started
            io_threads = [k for k in use.trips if k.startswith("round-io-")]
            worker_trips = use.trips["ddserve-worker"] + sum(use.trips[k] for k in io_threads)
            stepping_redis_s = use.seconds["ddserve-worker"]
            worker_redis_s = stepping_redis_s + sum(use.seconds[k] for k in io_threads)
            heartbeat_trips = sum(v for k, v in use.trips.items() if k.startswith("heartbeat-"))
        handle.stop(60)
        if any(s != "finished" for s in statuses):
            raise RuntimeError(f"jobs did not finish: {Counter(statuses)}")
        return {
            "drain_s": elapsed,
            "jobs_per_s": jobs / elapsed,
            "rounds": rounds[0],
            "ms_per_round": 1000 * elapsed / max(1, rounds[0]),
            "worker_round_trips_per_job": worker_trips / jobs,
            "worker_round_trips_per_round": worker_trips / max(1, rounds[0]),
            "worker_redis_ms_per_round": 1000 * worker_redis_s / max(1, rounds[0]),
            "stepping_redis_ms_per_round": 1000 * stepping_redis_s / max(1, rounds[0]),
            "heartbeat_round_trips": heartbeat_trips,
        }
    finally:
        keys = list(connection.scan_iter(match=f"*{prefix}*", count=1000))
        for job_id in ids:
            keys += [f"rq:job:{job_id}", f"rq:results:{job_id}", f"rq:executions:{job_id}"]
            keys += list(connection.scan_iter(match=f"rq:execution:{job_id}*", count=1000))
        connection.srem("rq:workers", f"rq:worker:{name}")
        for start in range(0, len(keys), 500):
            connection.delete(*keys[start : start + 500])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--progress-every", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--added-latency-ms",
        type=float,
        default=0.0,
        help="sleep this long per round trip, as a network to a remote Redis would add",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="bench-worker-redis-"))
    zoo = write_zoo(scratch / "zoo")
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):  # alternate the order: the machine's load drifts
        for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
            run = one_run(
                args.redis_url,
                zoo,
                scratch,
                args.jobs,
                args.steps,
                args.progress_every,
                mode,
                args.added_latency_ms / 1000,
            )
            runs[mode].append(run)
    figures = {
        mode: {key: statistics.median(run[key] for run in runs[mode]) for key in runs[mode][0]}
        for mode in MODES
    }
    print(
        f"{args.jobs} jobs × 1 image × DDIM-{args.steps}, progress every {args.progress_every} "
        f"steps, {args.added_latency_ms:g} ms added per round trip "
        f"(median of {args.repeats} runs per mode):"
    )
    rows = [
        ("worker round trips per job", "worker_round_trips_per_job", "{:.1f}"),
        ("worker round trips per round", "worker_round_trips_per_round", "{:.1f}"),
        ("scheduling rounds", "rounds", "{:.0f}"),
        ("worker's Redis I/O, ms per round", "worker_redis_ms_per_round", "{:.2f}"),
        ("… of it on the stepping thread", "stepping_redis_ms_per_round", "{:.2f}"),
        ("ms per round", "ms_per_round", "{:.1f}"),
        ("drain time (s)", "drain_s", "{:.2f}"),
        ("jobs/s", "jobs_per_s", "{:.1f}"),
        ("heartbeat round trips", "heartbeat_round_trips", "{:.0f}"),
    ]
    print(f"  {'':34} {'one-by-one':>11} {'round':>11} {'ratio':>7}")
    for label, key, form in rows:
        before, after = figures["one-by-one"][key], figures["round"][key]
        ratio = f"{before / after:.2f}" if after else "-"
        print(f"  {label:34} {form.format(before):>11} {form.format(after):>11} {ratio:>7}")
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs})
        )


if __name__ == "__main__":
    main()
