"""Network calls per second of the zoo's U-Nets in float32, bfloat16 and compiled, side by side.

For each shipped diffusion model (digits-ddpm, shapes-ldm: their weights, on the CPU unless
`--device cuda`) and each batch size, four denoisers as a worker builds them
(`workers.model_pool.Denoiser`): float32 eager, bfloat16 eager, float32 `torch.compile`d and
bfloat16 compiled (inductor, one graph per batch size, compiled before timing). Rounds interleave
the four so that a noisy machine's drift hits them alike; the table gives the median images/s of a
DDIM-`--steps` run (batch / (steps × seconds per call)) and each mode's ratio to float32 eager, and
the largest difference of each mode's output from float32's on the same input (bf16's precision).

    .venv/bin/python benchmarks/bench_precision.py [--batches 1 8 32] [--rounds 5] [--threads 1]
        [--json benchmarks/results/precision.json]

Not a timed test: run it by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from models.catalog import load_catalog
from models.registry import load_network
from workers.model_pool import Denoiser

MODELS = ("digits-ddpm", "shapes-ldm")
MODES = {
    "fp32": (torch.float32, False),
    "bf16": (torch.bfloat16, False),
    "fp32+compile": (torch.float32, True),
    "bf16+compile": (torch.bfloat16, True),
}


def denoisers(name: str, device: torch.device, modes: list[str]) -> dict[str, Denoiser]:
    entry = load_catalog()[name]
    out = {}
    for mode in modes:
        dtype, compiled = MODES[mode]
        network = load_network(entry, device).eval().requires_grad_(False).to(dtype)
        if compiled:
            network = torch.compile(network, dynamic=False)
        out[mode] = Denoiser(network, channels_last=device.type == "cuda", dtype=dtype)
    return out


def inputs(name: str, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    entry = load_catalog()[name]
    unet = entry.network["unet"]
    shape = (batch, int(unet["in_channels"]), int(unet["image_size"]), int(unet["image_size"]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    conditioning = entry.conditioning
    if conditioning is not None and conditioning.type == "text":
        length = conditioning.context_len or len(conditioning.vocabulary or [])
        cond = torch.randint(1, len(conditioning.vocabulary or [2]), (batch, length), generator=g)
    else:
        cond = torch.randint(0, 10, (batch,), generator=g)
    return x, t, cond.to(device)


def seconds_per_call(denoiser: Denoiser, args: tuple[torch.Tensor, ...], calls: int) -> float:
    denoiser(*args)  # warm (and compile) outside the timing
    start = time.perf_counter()
    for _ in range(calls):
        denoiser(*args)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5, help="network calls per timing")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per image (images/s)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for name in args.models:
        modes = denoisers(name, device, ["fp32", *[m for m in args.modes if m != "fp32"]])
        for batch in args.batches:
            x = inputs(name, batch, device)
            reference = modes["fp32"](*x)
            error = {m: float((d(*x) - reference).abs().max()) for m, d in modes.items()}
            timings: dict[str, list[float]] = {m: [] for m in modes}
            for _ in range(args.rounds):
                for mode, denoiser in modes.items():
                    timings[mode].append(seconds_per_call(denoiser, x, args.calls))
            base = statistics.median(timings["fp32"])
            for mode in modes:
                per_call = statistics.median(timings[mode])
                rows.append(
                    {
                        "model": name,
                        "batch": batch,
                        "mode": mode,
                        "ms_per_call": round(per_call * 1000, 2),
                        "images_per_s": round(batch / (args.steps * per_call), 2),
                        "vs_fp32": round(base / per_call, 2),
                        "max_abs_diff_vs_fp32": round(error[mode], 4),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"| model | batch | mode | ms/call | images/s (DDIM-{args.steps}) | × fp32 | max |Δ| |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['mode']} | {r['ms_per_call']} | "
            f"{r['images_per_s']} | {r['vs_fp32']}× | {r['max_abs_diff_vs_fp32']} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
