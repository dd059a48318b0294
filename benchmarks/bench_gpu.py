"""The GPU path in one table (issue #21): denoiser throughput by precision and compile, encoders in
ONNX Runtime vs PyTorch, and the batch the memory probe admits.

Run by `benchmarks/gpu_check.sh` on a CUDA machine (docs/gpu.md); by hand:

    python3 benchmarks/bench_gpu.py [--device cuda] [--budget-s 420] [--json out.json] [--table out.md]
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --quick --modes fp32 bf16  # CPU smoke

Rows:
- **denoiser**: digits-ddpm and shapes-ldm (the zoo's weights) and an SD-1.x-shaped
  `UNet2DConditionModel` (random weights; 64×64×4 latents, block widths 320/640/1280/1280, cross
  attention on 77×768 text states — `--quick` shrinks it), each at batch 1 / 8 / 64 in fp32, bf16,
  bf16 + `torch.compile` (one graph per batch, compiled before timing) and bf16 + CUDA graphs
  (inductor's reduce-overhead, `DDSERVE_CUDA_GRAPHS`; CUDA only), called as a worker
  calls them (`workers.model_pool.Denoiser`). Per cell: p50 / p99 ms per network call over
  `--calls` calls and images/s of a DDIM-`--steps` run (batch / (steps × p50)); compiled cells
  also give their first call's seconds (the compile).
- **encoder**: each zoo autoencoder with ONNX files, `encode` of a batch of 64 through ONNX
  Runtime on the device's provider vs the same weights in PyTorch (`TorchCodec`), images/s. An
  onnxruntime without the CUDA provider on a CUDA machine (a CPU build) gets a row saying so, and
  ONNX Runtime is timed on the CPU against PyTorch on the GPU.
- **max batch**: the rows per call `workers.memory_budget` admits for each denoiser in fp32 at
  `--memory-fraction` of free memory (CUDA only; the CPU is not probed).

Order: every eager cell and probe, then the encoders, then the compiled cells batch by batch (the
slow ones last). Cells are skipped (and say so) once `--budget-s` is spent; a cell that fails (out of
memory, a compile error) says so and the run goes on. Every row is printed as it is made and the
`--json` / `--table` files are rewritten after each, so a run killed at its time limit still leaves
the table so far. Versions of what the machine has come first (the check measures the machine's
torch and CUDA, not the project's pins). Not a timed test: run it by hand.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
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
# untimed calls before timing: a compiled cell compiles on the first and, in reduce-overhead, records
# its CUDA graph on a later one (cudagraph trees warm up once, record, then replay)
WARMUP = {None: 1, "default": 2, "reduce-overhead": 3}
ORT_CUDA = "CUDAExecutionProvider"
VERSIONS = ("numpy", "onnxruntime", "diffusers", "transformers", "huggingface_hub", "pydantic")
Call = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class Report:
    """The rows so far: each printed as one JSON line when made, and the `json` / `table` files
    rewritten, so whatever stops the run (its caller's time limit) leaves a complete table."""

    def __init__(self, info: dict, args: dict, json_path: Path | None, table_path: Path | None):
        self.info, self.args, self.rows = info, args, []
        self.json_path, self.table_path = json_path, table_path
        print(json.dumps(info), flush=True)
        self.save(done=False)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.save(done=False)

    def save(self, done: bool) -> None:
        if self.json_path:
            content = {"info": self.info, "args": self.args, "done": done, "rows": self.rows}
            write_whole(self.json_path, json.dumps(content, indent=1))
        if self.table_path:
            header = [f"- {key}: {value}" for key, value in self.info.items()]
            if not done:
                header.append(
                    "- **unfinished**: the rows so far (the run is going, or was stopped)"
                )
            write_whole(self.table_path, "\n".join([*header, "", table(self.rows), ""]))


def write_whole(path: Path, text: str) -> None:
    """Replace `path` at once (a kill mid-write leaves the previous version, not half of one)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def versions(device: torch.device) -> dict[str, Any]:
    """What the machine has: Python, torch and its CUDA, the GPU, the packages the check uses."""
    import onnxruntime as ort

    info: dict[str, Any] = {"device": str(device), "python": platform.python_version()}
    info["torch"] = torch.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": torch.cuda.get_device_name(device),
            "capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = "missing (no torch.compile on CUDA)"
    for name in VERSIONS:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "missing"
    providers = ort.get_available_providers()
    info["onnxruntime_providers"] = ", ".join(providers)
    info["ort_cuda"] = "available" if ORT_CUDA in providers else "unavailable (CPU build)"
    return info


class DiffusersUNet(nn.Module):
    """A diffusers `UNet2DConditionModel` behind ddserve's network signature (cond = text states)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=cond).sample


def sd_shaped_unet(
    quick: bool, device: torch.device | str = "cpu"
) -> tuple[nn.Module, tuple[int, int, int], tuple[int, int]]:
    """SD 1.x's UNet layout with random weights (or a narrow one with `quick`), made on `device`
    (860 M parameters: their random init takes a minute on 2 CPU cores, nothing on a GPU): the
    network, its sample shape (C, H, W) and its text states' shape (tokens, width)."""
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
        with torch.device(device):
            return DiffusersUNet(UNet2DConditionModel(**config)), (4, 16, 16), (8, 32)
    config = {
        "sample_size": 64,
        "block_out_channels": (320, 640, 1280, 1280),
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "layers_per_block": 2,
    }
    with torch.device(device):
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


def time_calls(
    call: Callable[[], Any], calls: int, device: torch.device, warmup: int = 1
) -> tuple[list[float], float]:
    """Seconds of each of `calls` calls after `warmup` untimed ones, synchronised on CUDA, and
    the first call's seconds (a compiled network's compile)."""
    seconds = []
    for _ in range(warmup + calls):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds[warmup:], seconds[0]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def failure(exc: BaseException, device: torch.device) -> dict[str, str]:
    """A failed cell's note (out of memory at batch 64, a compile error): say so and go on."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:160]}


def load_denoisers(
    args: argparse.Namespace, device: torch.device, report: Report
) -> dict[str, Any]:
    """name → (network, sample shape, condition maker): the zoo's loaded on the CPU, the
    SD-shaped one made on `device`; a model that fails to load gets an error row instead."""
    models: dict[str, Any] = {}
    for name in ZOO_MODELS:
        try:
            models[name] = zoo_network(name)
        except Exception as exc:
            report.add({"part": "denoiser", "model": name} | failure(exc, torch.device("cpu")))
    try:
        sd, sd_shape, (tokens, width) = sd_shaped_unet(args.quick, device)
        g = torch.Generator().manual_seed(1)
        models["sd1.x-shaped"] = (
            sd,
            sd_shape,
            lambda b: torch.randn(b, tokens, width, generator=g),
        )
    except Exception as exc:
        report.add({"part": "denoiser", "model": "sd1.x-shaped"} | failure(exc, device))
    return models


def denoiser_cell(
    args: argparse.Namespace,
    device: torch.device,
    deadline: float,
    name: str,
    model: tuple,
    mode: str,
    batch: int,
) -> dict:
    """One (model, mode, batch) cell of the denoiser rows."""
    network, shape, make_cond = model
    row: dict[str, Any] = {"part": "denoiser", "model": name, "mode": mode, "batch": batch}
    if time.monotonic() > deadline:
        return row | {"skipped": "time budget spent"}
    dtype, compiled = MODES[mode]
    if compiled == "reduce-overhead" and device.type != "cuda":
        return row | {"skipped": "CUDA graphs need a CUDA device"}
    g = torch.Generator().manual_seed(batch)
    try:
        module = network.to(dtype)  # in place: the cells share one copy of the weights
        if compiled is not None:
            torch._dynamo.reset()  # a fresh compile per cell: no recompile limit, no stale graphs
            module = torch.compile(module, dynamic=False, mode=compiled)
        denoiser = Denoiser(module, channels_last=device.type == "cuda", dtype=dtype)
        x = torch.randn((batch, *shape), generator=g).to(device)
        t = torch.full((batch,), 500, dtype=torch.long, device=device)
        cond = make_cond(batch).to(device)
        if cond.is_floating_point():
            cond = cond.to(dtype)
        seconds, first = time_calls(
            lambda: denoiser(x, t, cond), args.calls, device, WARMUP[compiled]
        )
    except Exception as exc:
        return row | failure(exc, device)
    p50 = statistics.median(seconds)
    row |= {
        "p50_ms": round(1000 * p50, 3),
        "p99_ms": round(1000 * percentile(seconds, 0.99), 3),
        "images_per_s": round(batch / (args.steps * p50), 2),
    }
    if compiled is not None:
        row["first_call_s"] = round(first, 1)
    return row


def max_batch_row(
    args: argparse.Namespace, device: torch.device, deadline: float, name: str, model: tuple
) -> dict:
    network, shape, make_cond = model
    row: dict[str, Any] = {"part": "max batch", "model": name, "rows": None}
    gauge = gauge_for(device)
    if gauge is None:
        return row
    if time.monotonic() > deadline:
        return row | {"skipped": "time budget spent"}
    fp32 = Denoiser(network.to(torch.float32), channels_last=device.type == "cuda")

    def probe(n: int) -> Any:
        x = torch.zeros((n, *shape), device=device)
        t = torch.zeros(n, dtype=torch.long, device=device)
        return fp32(x, t, make_cond(n).to(device))

    try:
        return row | {
            "rows": measure_row_limit(name, probe, gauge, args.memory_fraction, args.max_rows)
        }
    except Exception as exc:
        return row | failure(exc, device)


def encoder_rows(
    args: argparse.Namespace, device: torch.device, deadline: float, report: Report
) -> None:
    import onnxruntime as ort

    from models.onnx.runtime import OnnxCodec, TorchCodec

    provider = "CPUExecutionProvider"
    if device.type == "cuda":
        if ORT_CUDA in ort.get_available_providers():
            provider = ORT_CUDA
        else:
            report.add(
                {"part": "encoder", "model": "all", "mode": f"onnxruntime ({ORT_CUDA})"}
                | {"skipped": "ORT CUDA: unavailable (CPU build); ONNX Runtime timed on the CPU"}
            )
    for entry in load_catalog().values():
        if entry.file("encoder_onnx") is None or entry.file("decoder_onnx") is None:
            continue
        rng = np.random.default_rng(0)
        image = entry.image
        images = rng.uniform(-1, 1, (64, image.channels, image.height, image.width))
        images = images.astype(np.float32)
        makers: dict[str, Callable[[], Any]] = {
            f"onnxruntime ({provider})": lambda e=entry: OnnxCodec(
                e, [provider], None, require_cuda=provider == ORT_CUDA
            ),
            f"torch ({device})": lambda e=entry: TorchCodec(e, str(device)),
        }
        for runtime, make in makers.items():
            row: dict[str, Any] = {"part": "encoder", "model": entry.name, "mode": runtime}
            row["batch"] = 64
            if time.monotonic() > deadline:
                report.add(row | {"skipped": "time budget spent"})
                continue
            try:
                codec = make()
                seconds, _ = time_calls(lambda c=codec, i=images: c.encode(i), args.calls, device)
            except Exception as exc:
                report.add(row | failure(exc, device))
                continue
            p50 = statistics.median(seconds)
            report.add(
                row
                | {
                    "p50_ms": round(1000 * p50, 3),
                    "p99_ms": round(1000 * percentile(seconds, 0.99), 3),
                    "images_per_s": round(64 / p50, 1),
                }
            )


def table(rows: list[dict]) -> str:
    lines = [
        "| part | model | mode | batch | p50 ms | p99 ms | images/s | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = r.get("skipped") or r.get("error") or ""
        if "first_call_s" in r:
            note = f"first call {r['first_call_s']} s (compile)"
        if r["part"] == "max batch" and not note:
            note = f"{r['rows']} rows per call" if r["rows"] is not None else "not probed (CPU)"
        lines.append(
            f"| {r['part']} | {r['model']} | {r.get('mode', '')} | {r.get('batch', '')} | "
            f"{r.get('p50_ms', '')} | {r.get('p99_ms', '')} | {r.get('images_per_s', '')} | "
            f"{note} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace, device: torch.device, report: Report) -> None:
    """Eager cells and probes, then the encoders, then the compiled cells (the slowest)."""
    deadline = time.monotonic() + args.budget_s
    models = load_denoisers(args, device, report)
    for model in models.values():
        model[0].eval().requires_grad_(False).to(device)
    eager = [m for m in args.modes if MODES[m][1] is None]
    compiled = [m for m in args.modes if MODES[m][1] is not None]
    for name, model in models.items():
        for mode in eager:
            for batch in args.batches:
                report.add(denoiser_cell(args, device, deadline, name, model, mode, batch))
        report.add(max_batch_row(args, device, deadline, name, model))
    encoder_rows(args, device, deadline, report)
    for batch in args.batches:
        for name, model in models.items():
            for mode in compiled:
                report.add(denoiser_cell(args, device, deadline, name, model, mode, batch))


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
    parser.add_argument("--table", type=Path, default=None, help="the Markdown table, as it grows")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = Report(versions(device), settings, args.json, args.table)
    run(args, device, report)
    report.save(done=True)
    print()
    print(table(report.rows))
    return report.rows


if __name__ == "__main__":
    main()
