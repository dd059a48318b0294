"""The sampler's own cost per step of a continuous-batching running set, without the network.

A `DenoisingBatch` kept full (up to `--rows` network rows) with the continuous-batching benchmark's
request mix (`bench_continuous.sample_request`: DDIM 10–100 steps, 5 % DDPM-1000, half with
classifier-free guidance, clipped x̂_0), one image per sample, finished samples replaced at once.
The network is a stub (one multiply), so the time per step is the bookkeeping every real step
pays on top of its network call: stacking timesteps and coefficients, the guided rows, noise from
each sample's own generator, the update, retiring finished samples.

    .venv/bin/python benchmarks/bench_running_set.py [--rows 64] [--steps 2000] [--repeats 5]

Prints the median µs per step over the repeats. Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from benchmarks.bench_continuous import sample_request
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
        guidance_scale=request["guidance_scale"],
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
