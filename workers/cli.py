"""`ddserve worker`: run the batching worker for some models against the configured Redis."""

from __future__ import annotations

import argparse

from ddserve.logs import configure_logging  # torch-free; the gateway's format and request ids
from ddserve.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models", default=None, help="comma-separated models (default: DDSERVE_MODELS, else all)"
    )
    parser.add_argument(
        "--batching",
        choices=["continuous", "request", "none"],
        default=None,
        help="batching mode (default: DDSERVE_BATCHING)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="network rows per call (a guided image counts two)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: DDSERVE_TORCH_THREADS, else every core)",
    )
    parser.add_argument("--name", default=None, help="worker name (default: random)")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: DDSERVE_DEVICE, else auto)"
    )
    parser.add_argument(
        "--devices",
        choices=["all"],
        default=None,
        help="all: one worker process per CUDA device (cuda:0 … cuda:N-1), each named NAME-gpuI",
    )
    parser.add_argument("--burst", action="store_true", help="quit once the queues are empty")


def run(args: argparse.Namespace) -> int:
    if args.devices == "all":
        from workers.per_device import run_per_device

        return run_per_device(args)
    from redis import Redis

    from workers.redis_wait import wait_for_redis
    from workers.threads import apply_threads
    from workers.worker import BatchingWorker

    overrides = {
        key: value
        for key, value in (
            ("models", args.models),
            ("batching", args.batching),
            ("max_batch", args.max_batch),
            ("torch_threads", args.threads),
            ("device", args.device),
        )
        if value is not None
    }
    settings = Settings(**overrides)
    configure_logging(settings.log_level, settings.log_json)
    if settings.retain_freed_memory:
        from workers.allocator import retain_freed_memory

        retain_freed_memory()  # before the models load: the process is the worker's alone
    if settings.redis_url is None:
        raise SystemExit(
            "ddserve worker needs DDSERVE_REDIS_URL; without Redis, `ddserve serve` runs its own "
            "worker thread (embedded mode)"
        )
    apply_threads(settings, embedded=False)
    connection = Redis.from_url(settings.redis_url)
    wait_for_redis(connection)  # started before Redis: wait rather than crash in registration
    worker = BatchingWorker(settings, connection, name=args.name)
    worker.work(burst=args.burst)
    return 0
