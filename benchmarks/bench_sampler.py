"""DDIM-50 sampling throughput and the sampler's overhead over bare network calls (issue: diffusion core).

For each U-Net of the zoo and each batch size, two timings side by side, interleaved round by round so
that the machine's noise hits both alike:
- bare: the same 50 network calls the sampler makes (same batch, same timesteps), nothing else;
- sampler: `models.diffusion.sampler.sample(...)` with DDIM, 50 steps, η = 0.
Two overheads (medians over rounds):
- side by side: sampler / bare − 1 — what a user sees, but on a noisy machine it also carries
  the drift between the two runs;
- own time: the sampler's time outside its network calls (timed inside the same run) over the time
  in them — the cost of the sampler itself, immune to that drift.
Not a timed test: run it by hand.

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


class TimedNetwork:
    """The network, with the wall time spent inside its calls added up."""

    def __init__(self, net: UNet) -> None:
        self.net = net
        self.seconds = 0.0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        start = time.perf_counter()
        out = self.net(x, t, cond)
        self.seconds += time.perf_counter() - start
        return out


def time_sampler(
    net: UNet, schedule: NoiseSchedule, x: torch.Tensor, cond: torch.Tensor | None
) -> tuple[float, float]:
    """(total seconds, seconds inside the network calls) of one DDIM-50 run."""
    timed = TimedNetwork(net)
    start = time.perf_counter()
    settings = SamplerSettings("ddim", STEPS)
    sample(timed, schedule, x, settings, cond=cond, null_condition=net.null_condition())
    return time.perf_counter() - start, timed.seconds


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
    print(
        "| model | params | batch | sampler images/s | bare images/s | overhead side by side "
        "| sampler's own time |"
    )
    print("|---|---|---|---|---|---|---|")
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
            bare, sampled, own = [], [], []
            with torch.inference_mode():
                net(x, torch.zeros(batch, dtype=torch.long), cond)  # warm-up
                for _ in range(args.rounds):
                    bare.append(time_bare(net, x, cond, timesteps))
                    total, inside = time_sampler(net, schedule, x, cond)
                    sampled.append(total)
                    own.append((total - inside) / inside)
            b, s = statistics.median(bare), statistics.median(sampled)
            print(
                f"| {name} | {count_parameters(net) / 1e6:.2f} M | {batch} | {batch / s:.1f} | "
                f"{batch / b:.1f} | {100 * (s / b - 1):+.1f} % | "
                f"{100 * statistics.median(own):.1f} % |",
                flush=True,
            )


if __name__ == "__main__":
    main()
