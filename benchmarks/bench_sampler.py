"""DDIM-50 sampling throughput and the sampler's overhead over bare network calls (issue: diffusion core).

For each U-Net of the zoo and each batch size, two timings side by side, interleaved round by round so
that the machine's noise hits both alike:
- bare: the same 50 network calls the sampler makes (same batch, same timesteps), nothing else;
- sampler: `models.diffusion.sampler.sample(...)` with DDIM, 50 steps, η = 0.
Overhead = sampler / bare − 1 (median over rounds). Not a timed test: run it by hand.

    .venv/bin/python benchmarks/bench_sampler.py [--batches 1 8 64 256] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from models.diffusion.sampler import SamplerSettings, sample
from models.diffusion.schedule import NoiseSchedule
from models.diffusion.timesteps import timestep_sequence
from models.nets.unet import UNet, UNetConfig, count_parameters

RECIPES = Path(__file__).resolve().parent.parent / "models" / "recipes"
STEPS = 50


def zoo_unets() -> dict[str, UNetConfig]:
    configs = {}
    for name in ("digits-ddpm", "shapes-ldm"):
        path = RECIPES / f"{name}.json"
        if path.exists():
            configs[name] = UNetConfig.from_dict(json.loads(path.read_text())["unet"])
    return configs


def time_bare(net: UNet, x: torch.Tensor, cond: torch.Tensor | None, timesteps: list[int]) -> float:
    start = time.perf_counter()
    for t in timesteps:
        net(x, torch.full((x.shape[0],), t, dtype=torch.long), cond)
    return time.perf_counter() - start


def time_sampler(net: UNet, schedule: NoiseSchedule, x: torch.Tensor, cond: torch.Tensor | None) -> float:
    start = time.perf_counter()
    sample(net, schedule, x, SamplerSettings("ddim", STEPS), cond=cond, null_condition=net.null_condition())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    schedule = NoiseSchedule.create("linear", 1000)
    timesteps = timestep_sequence(1000, STEPS, "leading")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, DDIM-{STEPS}, η = 0")
    print("| model | params | batch | sampler images/s | bare images/s | overhead |")
    print("|---|---|---|---|---|---|")
    for name, config in zoo_unets().items():
        net = UNet(config).eval().to(memory_format=torch.channels_last)
        shape = (config.in_channels, config.image_size, config.image_size)
        for batch in args.batches:
            g = torch.Generator().manual_seed(0)
            x = torch.randn((batch, *shape), generator=g)
            cond = None
            if config.num_classes is not None:
                cond = torch.randint(0, config.num_classes, (batch,), generator=g)
            elif config.vocab_size is not None:
                cond = torch.randint(1, config.vocab_size, (batch, config.context_len), generator=g)
            bare, sampled = [], []
            with torch.inference_mode():
                net(x, torch.zeros(batch, dtype=torch.long), cond)  # warm-up
                for _ in range(args.rounds):
                    bare.append(time_bare(net, x, cond, timesteps))
                    sampled.append(time_sampler(net, schedule, x, cond))
            b, s = statistics.median(bare), statistics.median(sampled)
            print(
                f"| {name} | {count_parameters(net) / 1e6:.2f} M | {batch} | {batch / s:.1f} | "
                f"{batch / b:.1f} | {100 * (s / b - 1):+.1f} % |",
                flush=True,
            )


if __name__ == "__main__":
    main()
