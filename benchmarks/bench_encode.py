"""Encode latency and throughput of the zoo's autoencoders: ONNX Runtime against PyTorch eager, on
the same real test images, at batch 1 and 64, in one run.

    .venv/bin/python benchmarks/bench_encode.py                     # every zoo autoencoder
    .venv/bin/python benchmarks/bench_encode.py --models digits-vae --threads 2 --markdown

Both backends get the same number of intra-op threads (`--threads`, default 1) and run on CPU
(ONNX Runtime's CPUExecutionProvider; `--providers` to try others). Latency is the median of
`--repeats` timed calls after `--warmup` untimed ones (each backend measured twice, the better
kept); throughput is batch / median latency."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from models.autoencoders import AUTOENCODERS
from models.catalog import DEFAULT_ZOO, load_catalog
from models.data import load_dataset
from models.onnx.runtime import CPU, OnnxCodec
from models.registry import load_network


def time_calls(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """The median wall time of one call, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def bench_model(name: str, args: argparse.Namespace) -> list[dict[str, object]]:
    entry = load_catalog(args.zoo_dir)[name]
    model = load_network(entry)
    codec = OnnxCodec(entry, args.providers, threads=args.threads)
    images = load_dataset(entry.dataset, "test").images[: max(args.batches)].numpy()
    rows = []
    for batch in args.batches:
        x_np = np.ascontiguousarray(images[:batch])
        x_torch = torch.from_numpy(x_np)

        def torch_encode(x: torch.Tensor = x_torch) -> object:
            with torch.inference_mode():
                return model.encode(x)

        def ort_encode(x: np.ndarray = x_np) -> object:
            return codec.encode(x)

        repeats = args.repeats if batch == 1 else max(args.repeats // 8, 10)
        ort_ms = min(time_calls(ort_encode, args.warmup, repeats) for _ in range(2))
        torch_ms = min(time_calls(torch_encode, args.warmup, repeats) for _ in range(2))
        rows.append(
            {
                "model": name,
                "batch": batch,
                "torch_ms": torch_ms,
                "ort_ms": ort_ms,
                "speedup": torch_ms / ort_ms,
                "torch_ips": batch / torch_ms * 1000.0,
                "ort_ips": batch / ort_ms * 1000.0,
            }
        )
    return rows


def format_rows(rows: list[dict[str, object]], markdown: bool) -> str:
    header = [
        "model",
        "batch",
        "PyTorch ms",
        "ORT ms",
        "ORT speed-up",
        "PyTorch img/s",
        "ORT img/s",
    ]
    lines = []
    for r in rows:
        lines.append(
            [
                str(r["model"]),
                str(r["batch"]),
                f"{r['torch_ms']:.3f}",
                f"{r['ort_ms']:.3f}",
                f"{r['speedup']:.2f}×",
                f"{r['torch_ips']:,.0f}",
                f"{r['ort_ips']:,.0f}",
            ]
        )
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", help="zoo autoencoders (default: all with ONNX)")
    parser.add_argument("--zoo-dir", type=Path, default=DEFAULT_ZOO)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of both")
    parser.add_argument("--providers", nargs="+", default=[CPU])
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=400)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    catalog = load_catalog(args.zoo_dir)
    names = args.models or [
        n for n, e in catalog.items() if e.kind in AUTOENCODERS and e.file("encoder_onnx")
    ]
    if not names:
        raise SystemExit(f"no autoencoder with ONNX files in {args.zoo_dir}")
    rows = [row for name in names for row in bench_model(name, args)]
    print(
        f"encode, CPU, {args.threads} thread(s), torch {torch.__version__}, "
        f"onnxruntime {__import__('onnxruntime').__version__}"
    )
    print(format_rows(rows, args.markdown))
    ones = [r["speedup"] for r in rows if r["batch"] == 1]
    if ones:
        print(f"ORT / PyTorch at batch 1: {min(ones):.2f}× to {max(ones):.2f}× (target ≥ 1.5×)")


if __name__ == "__main__":
    main()
