"""Storing finished images on the stepping thread against the engine's store threads, side by side.

Two continuous-batching engines in one process, each kept saturated with the continuous-batching
benchmark's request mix (`bench_continuous.sample_request`) on the random-weight stand-in U-Net,
store their images in a local directory — one on its stepping thread (`store_threads=0`), one on
two store threads (the worker's default). A storage write can be given an extra latency
(`--put-latency-ms`, a sleep that releases the GIL as a network wait does), standing in for an
S3 request per image. Windows of each engine alternate (ABBA) so that the machine's drift hits
both alike; each window reports rows·steps/s and images/s, and the ratio store threads / inline.

    .venv/bin/python -m benchmarks.bench_store_threads [--put-latency-ms 0 5 20] [--windows 8]

Not a test: run it by hand (pin it with `taskset -c 0` to see one CPU shared by every thread).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.saturated_engine import STAND_IN, SaturatedEngine, stand_in_pool
from ddserve.storage.local import LocalStorage
from workers.model_pool import ModelPool


class SlowStorage(LocalStorage):
    """Local files, each write delayed by `latency_s` (a network round trip: the GIL is free)."""

    def __init__(self, root: Path, latency_s: float) -> None:
        super().__init__(root, "bench", 60)
        self.latency_s = latency_s

    def put(self, key: str, data: bytes, content_type: str) -> None:
        if self.latency_s:
            time.sleep(self.latency_s)
        super().put(key, data, content_type)


def compare(
    pool: ModelPool, model: str, latency_ms: float, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    engines = {
        threads: SaturatedEngine(
            pool,
            model,
            SlowStorage(workdir / f"{latency_ms}-{threads}", latency_ms / 1000.0),
            max_batch=args.max_batch,
            store_threads=threads,
            seed=args.seed,
        )
        for threads in (0, 2)
    }
    for engine in engines.values():
        engine.run(args.warmup_rounds)
    windows = []
    for window in range(args.windows):
        order = (0, 2) if window % 2 == 0 else (2, 0)
        measured = {threads: engines[threads].run(args.rounds) for threads in order}
        windows.append(
            {
                "inline": measured[0],
                "store_threads": measured[2],
                "ratio": measured[2]["rows_steps_per_s"] / measured[0]["rows_steps_per_s"],
            }
        )
    for engine in engines.values():
        engine.close()
    ratios = [w["ratio"] for w in windows]
    return {
        "put_latency_ms": latency_ms,
        "windows": windows,
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "images_per_s_inline": statistics.median(w["inline"]["images_per_s"] for w in windows),
        "images_per_s_threads": statistics.median(
            w["store_threads"]["images_per_s"] for w in windows
        ),
    }


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        workdir = Path(tmp)
        pool, model = stand_in_pool(workdir, args.unet)
        for latency in args.put_latency_ms:
            result = compare(pool, model, latency, workdir, args)
            results.append(result)
            print(
                f"put latency {latency:g} ms: store threads / inline, rows·steps/s: median "
                f"{result['median_ratio']:.2f}× (windows {result['min_ratio']:.2f}–"
                f"{result['max_ratio']:.2f}×); images/s {result['images_per_s_inline']:.1f} "
                f"inline, {result['images_per_s_threads']:.1f} with store threads",
                flush=True,
            )
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--put-latency-ms", type=float, nargs="+", default=[0.0, 5.0, 20.0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=150, help="rounds per window")
    parser.add_argument("--warmup-rounds", type=int, default=300)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--unet", default=STAND_IN, help="JSON overrides of the stand-in U-Net")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    return parser.parse_args()


if __name__ == "__main__":
    raise SystemExit(main())
