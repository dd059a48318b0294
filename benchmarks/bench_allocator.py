"""The bare network with glibc's default heap against the worker's retained heap, side by side.

`workers/allocator.py` keeps memory the network frees in the process's heap. This times the same
U-Net (the continuous-batching benchmark's synthetic one unless `--unet` says otherwise) in two
processes pinned to the same CPU — one with the default heap, one after `retain_freed_memory()` —
alternating short windows between them so that the machine's drift hits both alike, and reports
per window the rows/s and the share of the process's CPU time spent in the kernel (page faults).

    .venv/bin/python benchmarks/bench_allocator.py [--batch 32] [--windows 8] [--seconds 2]

Writes benchmarks/results/allocator.json. Not a test: run it by hand, with the machine to itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SYNTHETIC = {"base_channels": 8, "channel_mults": [1, 2], "attention_resolutions": []}


def serve(unet: dict, batch: int, retain: bool) -> None:
    """`--serve`: answer each stdin line SECONDS with "rows/s kernel-share" of bare calls."""
    if retain:
        from workers.allocator import retain_freed_memory

        assert retain_freed_memory(), "the retained heap needs glibc"
    import time

    import torch

    from models.nets.unet import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig.from_dict(unet)).eval()
    size, channels = unet["image_size"], unet["in_channels"]
    x = torch.randn(batch, channels, size, size)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, 10, (batch,))
    with torch.no_grad():
        net(x, t, y)  # warm-up
        for line in sys.stdin:
            seconds = float(line)
            calls, cpu, start = 0, os.times(), time.perf_counter()
            while time.perf_counter() - start < seconds:
                net(x, t, y)
                calls += 1
            elapsed, used = time.perf_counter() - start, os.times()
            kernel = (used.system - cpu.system) / max(
                1e-9, used.user - cpu.user + used.system - cpu.system
            )
            print(f"{batch * calls / elapsed} {kernel}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--windows", type=int, default=8, help="windows per heap policy")
    parser.add_argument("--seconds", type=float, default=2.0, help="one window, s")
    parser.add_argument("--cpu", type=int, default=0, help="the CPU both processes run on")
    parser.add_argument("--unet", default=None, help="JSON overrides of the digits-ddpm U-Net")
    parser.add_argument("--serve", choices=["default", "retained"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "allocator.json"))
    args = parser.parse_args()
    recipe = json.loads((ROOT / "models" / "recipes" / "digits-ddpm.json").read_text())
    unet = recipe["unet"] | (json.loads(args.unet) if args.unet else SYNTHETIC)
    if args.serve:
        serve(unet, args.batch, args.serve == "retained")
        return 0

    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    processes = {
        policy: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.bench_allocator",
                "--serve",
                policy,
                "--batch",
                str(args.batch),
                "--unet",
                json.dumps(unet),
            ],
            cwd=ROOT,
            env=env,
            preexec_fn=lambda: os.sched_setaffinity(0, {args.cpu}),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for policy in ("default", "retained")
    }
    windows: dict[str, list[tuple[float, float]]] = {policy: [] for policy in processes}
    try:
        for _ in range(args.windows):
            for policy, process in processes.items():  # alternate: drift hits both alike
                assert process.stdin is not None and process.stdout is not None
                process.stdin.write(f"{args.seconds}\n")
                process.stdin.flush()
                rate, kernel = map(float, process.stdout.readline().split())
                windows[policy].append((rate, kernel))
    finally:
        for process in processes.values():
            if process.stdin is not None:
                process.stdin.close()
            process.wait(30)
    summary = {
        policy: {
            "rows_per_s_median": statistics.median(r for r, _ in found),
            "kernel_share_median": statistics.median(k for _, k in found),
        }
        for policy, found in windows.items()
    }
    ratios = [r / d for (r, _), (d, _) in zip(windows["retained"], windows["default"], strict=True)]
    result = {
        "unet": unet,
        "batch": args.batch,
        "torch_threads": 1,
        "seconds_per_window": args.seconds,
        "windows": windows,
        "summary": summary,
        "speedup_median": statistics.median(ratios),
        "speedup_range": [min(ratios), max(ratios)],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for policy, figures in summary.items():
        print(
            f"{policy:>8} heap: {figures['rows_per_s_median']:.0f} rows/s, "
            f"{100 * figures['kernel_share_median']:.0f} % of CPU time in the kernel"
        )
    print(
        f"retained / default, window by window: median {result['speedup_median']:.2f}x "
        f"(range {min(ratios):.2f}–{max(ratios):.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
