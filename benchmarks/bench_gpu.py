"""The GPU path in one table (issue #21): denoiser throughput by precision and compile, encoders in
ONNX Runtime vs PyTorch, and the batch the memory probe admits.

Run by `benchmarks/gpu_check.sh` on a CUDA machine (it makes the venv); by hand:

    .venv/bin/python benchmarks/bench_gpu.py [--device cuda] [--budget-s 420] [--json out.json]
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --quick --modes fp32 bf16  # CPU smoke

Rows:
- **denoiser**: digits-ddpm and shapes-ldm (the zoo's weights) and an SD-1.x-shaped
  `UNet2DConditionModel` (random weights; 64×64×4 latents, block widths 320/640/1280/1280, cross
  attention on 77×768 text states — `--quick` shrinks it), each at batch 1 / 8 / 64 in fp32, bf16,
  bf16 + `torch.compile` (one graph per batch, compiled before timing) and bf16 + CUDA graphs
  (inductor's reduce-overhead, `DDSERVE_CUDA_GRAPHS`; CUDA only), called as a worker
  calls them (`workers.model_pool.Denoiser`). Per cell: p50 / p99 ms per network call over
  `--calls` calls and images/s of a DDIM-`--steps` run (batch / (steps × p50)).
- **encoder**: each zoo autoencoder with ONNX files, `encode` of a batch of 64 through ONNX
  Runtime on the device's provider vs the same weights in PyTorch (`TorchCodec`), images/s.
- **max batch**: the rows per call `workers.memory_budget` admits for each denoiser in fp32 at
  `--memory-fraction` of free memory (CUDA only; the CPU is not probed).

Cells are skipped (and say so) once `--budget-s` is spent, so the whole run fits its time limit:
compiles come last in each model's cells. Not a timed test: run it by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.catalog import load_catalog  # noqa: E402
from models.registry import load_network  # noqa: E402
from workers.memory_budget import gauge_for, measure_row_limit  # noqa: E402
from workers.model_pool import Denoiser  # noqa: E402

ZOO_MODELS = ("digits-ddpm", "shapes-ldm")
# mode → (dtype, inductor mode; None: eager), as `workers.model_pool` builds them
MODES: dict[str, tuple[torch.dtype, str | None]] = {
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "bf16+compile": (torch.bfloat16, "default"),
    "bf16+graphs": (torch.bfloat16, "reduce-overhead"),  # CUDA graphs (DDSERVE_CUDA_GRAPHS)
}
Call = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class DiffusersUNet(nn.Module):
    """A diffusers `UNet2DConditionModel` behind ddserve's network signature (cond = text states)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=cond).sample


def sd_shaped_unet(quick: bool) -> tuple[nn.Module, tuple[int, int, int], tuple[int, int]]:
    """SD 1.x's UNet layout with random weights (or a narrow one with `quick`): the network,
    its sample shape (C, H, W) and its text states' shape (tokens, width)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if quick:
        config: dict[str, Any] = {
            "sample_size": 16,
            "block_out_channels": (32, 64),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": 4,
            "layers_per_block": 1,
            "norm_num_groups": 16,
        }
        return DiffusersUNet(UNet2DConditionModel(**config)), (4, 16, 16), (8, 32)
    config = {
        "sample_size": 64,
        "block_out_channels": (320, 640, 1280, 1280),
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "layers_per_block": 2,
    }
    return DiffusersUNet(UNet2DConditionModel(**config)), (4, 64, 64), (77, 768)


def zoo_network(name: str) -> tuple[nn.Module, tuple[int, int, int], Callable[[int], torch.Tensor]]:
    """A zoo denoiser, its sample shape and a maker of `batch` condition rows."""
    entry = load_catalog()[name]
    unet = entry.network["unet"]
    shape = (int(unet["in_channels"]), int(unet["image_size"]), int(unet["image_size"]))
    conditioning = entry.conditioning
    g = torch.Generator().manual_seed(0)
    if conditioning is not None and conditioning.type == "text":
        words = len(conditioning.vocabulary or [2])
        length = conditioning.context_len or words

        def cond(batch: int) -> torch.Tensor:
            return torch.randint(1, words, (batch, length), generator=g)
    else:

        def cond(batch: int) -> torch.Tensor:
            return torch.randint(0, 10, (batch,), generator=g)

    return load_network(entry, "cpu"), shape, cond


def time_calls(call: Callable[[], torch.Tensor], calls: int, device: torch.device) -> list[float]:
    """Seconds of each of `calls` calls (after one untimed call), synchronised on CUDA."""
    call()
    out = []
    for _ in range(calls):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - started)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def denoiser_rows(args: argparse.Namespace, device: torch.device, deadline: float) -> list[dict]:
    rows: list[dict] = []
    models: dict[str, Any] = {name: zoo_network(name) for name in ZOO_MODELS}
    sd, sd_shape, (tokens, width) = sd_shaped_unet(args.quick)
    g = torch.Generator().manual_seed(1)
    models["sd1.x-shaped"] = (sd, sd_shape, lambda b: torch.randn(b, tokens, width, generator=g))
    for name, (network, shape, make_cond) in models.items():
        base = network.eval().requires_grad_(False).to(device)
        for mode in args.modes:
            dtype, compiled = MODES[mode]
            for batch in args.batches:
                row: dict[str, Any] = {"part": "denoiser", "model": name, "mode": mode}
                row["batch"] = batch
                if time.monotonic() > deadline:
                    rows.append(row | {"skipped": "time budget spent"})
                    continue
                if compiled == "reduce-overhead" and device.type != "cuda":
                    rows.append(row | {"skipped": "CUDA graphs need a CUDA device"})
                    continue
                module = base.to(dtype)
                if compiled is not None:
                    module = torch.compile(module, dynamic=False, mode=compiled)
                denoiser = Denoiser(module, channels_last=device.type == "cuda", dtype=dtype)
                x = torch.randn((batch, *shape), generator=g).to(device)
                t = torch.full((batch,), 500, dtype=torch.long, device=device)
                cond = make_cond(batch).to(device)
                if cond.is_floating_point():
                    cond = cond.to(dtype)
                try:
                    seconds = time_calls(
                        lambda d=denoiser, a=(x, t, cond): d(*a), args.calls, device
                    )
                except Exception as exc:  # e.g. out of memory at batch 64: say so, go on
                    rows.append(row | {"error": f"{type(exc).__name__}: {exc}"[:120]})
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                p50 = statistics.median(seconds)
                rows.append(
                    row
                    | {
                        "p50_ms": round(1000 * p50, 2),
                        "p99_ms": round(1000 * percentile(seconds, 0.99), 2),
                        "images_per_s": round(batch / (args.steps * p50), 2),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
        base.to(torch.float32)
        limit = None
        gauge = gauge_for(device)
        if gauge is not None and time.monotonic() < deadline:
            fp32 = Denoiser(base, channels_last=device.type == "cuda")

            def probe(n: int, d: Denoiser = fp32, s: tuple = shape, c: Callable = make_cond) -> Any:
                x = torch.zeros((n, *s), device=device)
                t = torch.zeros(n, dtype=torch.long, device=device)
                return d(x, t, c(n).to(device))

            limit = measure_row_limit(name, probe, gauge, args.memory_fraction, args.max_rows)
        rows.append({"part": "max batch", "model": name, "rows": limit})
        print(json.dumps(rows[-1]), flush=True)
        del base
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def encoder_rows(args: argparse.Namespace, device: torch.device, deadline: float) -> list[dict]:
    from models.onnx.runtime import OnnxCodec, TorchCodec

    rows: list[dict] = []
    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    for entry in load_catalog().values():
        if entry.file("encoder_onnx") is None or entry.file("decoder_onnx") is None:
            continue
        if time.monotonic() > deadline:
            rows.append({"part": "encoder", "model": entry.name, "skipped": "time budget spent"})
            continue
        image = entry.image
        rng = np.random.default_rng(0)
        images = rng.uniform(-1, 1, (64, image.channels, image.height, image.width))
        images = images.astype(np.float32)
        codecs = {
            f"onnxruntime ({provider})": OnnxCodec(
                entry, [provider], None, require_cuda=device.type == "cuda"
            ),
            f"torch ({device})": TorchCodec(entry, str(device)),
        }
        for runtime, codec in codecs.items():
            seconds = time_calls(lambda c=codec, i=images: c.encode(i), args.calls, device)
            p50 = statistics.median(seconds)
            rows.append(
                {
                    "part": "encoder",
                    "model": entry.name,
                    "mode": runtime,
                    "batch": 64,
                    "p50_ms": round(1000 * p50, 2),
                    "p99_ms": round(1000 * percentile(seconds, 0.99), 2),
                    "images_per_s": round(64 / p50, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| part | model | mode | batch | p50 ms | p99 ms | images/s | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = r.get("skipped") or r.get("error") or ""
        if r["part"] == "max batch":
            note = f"{r['rows']} rows per call" if r["rows"] is not None else "not probed (CPU)"
        lines.append(
            f"| {r['part']} | {r['model']} | {r.get('mode', '')} | {r.get('batch', '')} | "
            f"{r.get('p50_ms', '')} | {r.get('p99_ms', '')} | {r.get('images_per_s', '')} | "
            f"{note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--calls", type=int, default=20, help="timed calls per cell")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per image (images/s)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip cells after this")
    parser.add_argument("--memory-fraction", type=float, default=0.85)
    parser.add_argument("--max-rows", type=int, default=4096, help="the probe's upper bound")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--quick", action="store_true", help="a narrow SD-shaped UNet")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    deadline = time.monotonic() + args.budget_s
    info = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    print(json.dumps(info), flush=True)
    rows = denoiser_rows(args, device, deadline) + encoder_rows(args, device, deadline)
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"info": info, "args": vars(args) | {"json": str(args.json)}, "rows": rows},
                indent=1,
            )
        )
    return rows


if __name__ == "__main__":
    main()
