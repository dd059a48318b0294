"""Does half precision cost quality? Classifier-FID of the zoo's diffusion models with their U-Net in
bfloat16 against float32 (issue #21 item 2: "FID within 1.1× of fp32").

For each model the same n samples (same conditions, same x_T and noise streams) are drawn with the
denoising network in float32 and in bfloat16 — weights and activations, the sampler's arithmetic
and the first stage's decoder in float32, as a worker runs `DDSERVE_DTYPE=bfloat16`
(`workers.model_pool.Denoiser`) — plus float32 again with another seed: the FID's own noise at this
n, which a bf16/fp32 ratio must be read against. The measures are `ddserve eval`'s
(`models.evaluation.evaluate.evaluate_generation`): the Fréchet distance on the evaluation
classifier's features against the test split, and the guidance accuracy.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.precision_quality --n 300 --steps 20 \\
        --json benchmarks/results/precision_quality.json

Not a timed test. bf16 matmuls have no fast kernels on CPUs without AVX512-BF16/AMX, so the bf16
rows take several times as long as the fp32 ones here.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddserve.params import guidance_weight
from models.data import load_dataset
from models.evaluation.evaluate import feature_scores
from models.evaluation.features import load_eval_classifier
from models.evaluation.generation import (
    GenerationSetting,
    balanced_conditions,
    generate,
    load_diffusion,
)
from models.registry import find_entry

MODELS = ("digits-ddpm", "shapes-ldm")


class InPrecision(nn.Module):
    """A denoising network run in `dtype`: x cast on the way in, the output back to float32."""

    def __init__(self, network: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.network = network.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.network(x.to(self.dtype), t, cond).float()

    def null_condition(self) -> torch.Tensor:
        return self.network.null_condition()


def measure(name: str, n: int, steps: int, batch: int) -> list[dict[str, Any]]:
    entry = find_entry(name)
    defaults = entry.defaults
    assert defaults is not None
    setting = GenerationSetting(
        sampler="ddim",
        steps=steps,
        eta=0.0,
        guidance=guidance_weight(defaults.guidance_scale),
        classifier_scale=0.0,
        n=n,
        seed=0,
    )
    classifier = load_eval_classifier(entry.dataset, None)
    options = getattr(entry, "dataset_options", None) or {}
    reference = classifier.measure(load_dataset(entry.dataset, "test", **options).images).features
    conditions = balanced_conditions(entry, n)
    rows = []
    for label, dtype, seed in (
        ("fp32", torch.float32, 0),
        ("bf16", torch.bfloat16, 0),
        ("fp32, seed 1", torch.float32, 1),
    ):
        model = load_diffusion(entry, None, need_classifier=False)
        if dtype != torch.float32:
            model = replace(model, network=InPrecision(model.network, dtype))
        started = time.perf_counter()
        images = generate(model, replace(setting, seed=seed), conditions, batch_size=batch)
        seconds = time.perf_counter() - started
        measured = classifier.measure(images)
        scores = feature_scores(reference, measured.features)
        row = {"model": name, "run": label, "fid": scores["fid"], "seconds": round(seconds, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["fid"]
    for row in rows:
        row["vs_fp32"] = round(row["fid"] / base, 3) if base > 0 else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = [
        row for name in args.models for row in measure(name, args.n, args.steps, args.batch_size)
    ]
    print("\n| model | run | classifier-FID | × fp32 | seconds |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['run']} | {r['fid']:.3f} | {r['vs_fp32']} | {r['seconds']} |")
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
