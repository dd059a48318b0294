"""The sampler's own cost per step of a continuous-batching running set, without the network.

A `DenoisingBatch` kept full (up to `--rows` network rows) with the continuous-batching benchmark's
request mix (`bench_continuous.sample_request`: DDIM 10–100 steps, 5 % DDPM-1000, half with
classifier-free guidance, clipped x̂_0), one image per sample, finished samples replaced at once.
The network is a stub (one multiply), so the time per step is the bookkeeping every real step
pays on top of its network call: stacking timesteps and coefficients, the guided rows, noise from
each sample's own generator, the update, retiring finished samples.

With `--engine`, the same for a whole scheduling round of the worker's engine
(`benchmarks.saturated_engine`: jobs of that mix, n images each, admission, the non-finite checks,
progress, finished images handed to the store threads and written to local files), still with the
stub network: the fixed CPU cost a saturated worker adds to every network call.

    .venv/bin/python -m benchmarks.bench_running_set [--rows 64] [--steps 2000] [--repeats 5]
    .venv/bin/python -m benchmarks.bench_running_set --engine [--store-threads 2]

Prints the median µs per step over the repeats. Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_continuous import sample_request
from benchmarks.saturated_engine import SaturatedEngine, stand_in_pool
from ddserve.params import guidance_weight
from ddserve.storage.local import LocalStorage
from models.diffusion.noise import sample_generator
from models.diffusion.sampler import DenoisingBatch, Sample, SamplerSettings
from models.diffusion.schedule import NoiseSchedule

SHAPE = (1, 16, 16)  # the synthetic digits U-Net's sample
NULL_CLASS = 10


def stub_network(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    return x * 0.5


def new_sample(rng: random.Random) -> Sample:
    request = sample_request(rng, "stub", classes=10, long_fraction=0.05)
    settings = SamplerSettings(
        sampler=request["sampler"],
        num_inference_steps=request["num_inference_steps"],
        guidance_scale=guidance_weight(request["guidance_scale"]),  # the library's w = s − 1
        clip_denoised=True,
    )
    return Sample(
        settings=settings,
        generator=sample_generator(request["seed"], 0),
        cond=torch.tensor(request["class_label"]),
    )


def microseconds_per_step(rows: int, steps: int, seed: int) -> tuple[float, int]:
    rng = random.Random(seed)
    batch = DenoisingBatch(
        stub_network,
        NoiseSchedule.create("linear", 1000),
        SHAPE,
        null_condition=torch.tensor(NULL_CLASS),
    )

    def step() -> None:
        while batch.rows < rows - 1:  # room for a guided sample's two rows
            batch.add([new_sample(rng)])
        batch.step()

    for _ in range(steps // 4):  # warm-up: the long DDPM samples accumulate, as in the worker
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e6, len(batch)


def engine_microseconds_per_round(rows: int, rounds: int, seed: int, store_threads: int) -> float:
    """µs per round of a saturated engine over the stand-in model whose network is the stub."""
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        pool, model = stand_in_pool(Path(tmp))
        pool.get(model).denoiser.network = stub_network  # type: ignore[union-attr]
        storage = LocalStorage(Path(tmp) / "images", "bench", 60)
        engine = SaturatedEngine(
            pool, model, storage, max_batch=rows, store_threads=store_threads, seed=seed
        )
        try:
            engine.run(rounds // 4)  # warm-up: the long DDPM jobs accumulate, as in the worker
            return engine.run(rounds)["us_per_round"]
        finally:
            engine.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engine", action="store_true", help="whole engine rounds")
    parser.add_argument("--store-threads", type=int, default=2, help="with --engine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.engine:
        rounds = [
            engine_microseconds_per_round(args.rows, args.steps, seed, args.store_threads)
            for seed in range(args.repeats)
        ]
        print(
            f"engine rounds of up to {args.rows} rows, {args.store_threads} store threads, stub "
            f"network: {statistics.median(rounds):.0f} µs per round (median of {args.repeats}; "
            f"range {min(rounds):.0f}–{max(rounds):.0f})"
        )
        return 0
    runs = [microseconds_per_step(args.rows, args.steps, seed) for seed in range(args.repeats)]
    per_step = [us for us, _ in runs]
    print(
        f"running set of up to {args.rows} rows ({runs[-1][1]} samples at the end): "
        f"{statistics.median(per_step):.0f} µs of sampler bookkeeping per step "
        f"(median of {args.repeats}; range {min(per_step):.0f}–{max(per_step):.0f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
