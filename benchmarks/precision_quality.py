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

An imported diffusers model (`--diffusers FOLDER`, a `DDPMPipeline` folder such as the one
`benchmarks/train_tiny_diffusers.py` trains on digits) is measured the way it is served: imported
with `ddserve import`'s own code into a scratch model repository, loaded by the worker's `ModelPool`
with `DDSERVE_DTYPE` float32 or bfloat16 (the UNet behind `UNetAdapter`), and sampled by the
engine's path — generate job specs (`workers.execute.prepare_denoise`, image i of a job seeded s
draws from the stream of s + i) stepped together in the model's `DenoisingBatch`. Its "other
seed" run starts its seeds past the n images of the first, so no image shares a stream.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.precision_quality --models \
        --diffusers var/tiny-digits-diffusers --n 1000 --steps 20 \
        --json benchmarks/results/precision_quality_diffusers.json

Not a timed test. bf16 matmuls have no fast kernels on CPUs without AVX512-BF16/AMX, so the bf16
rows take several times as long as the fp32 ones here.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddserve.params import MAX_IMAGES, guidance_weight
from ddserve.settings import Settings
from ddserve.spec import GenerateSpec
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
from workers.execute import prepare_denoise
from workers.model_pool import DTYPES, DiffusionModel, ModelPool

MODELS = ("digits-ddpm", "shapes-ldm")
IMPORTED = "imported-ddpm"  # the --diffusers pipeline's name in the scratch model repository
UNTRAINED = "untrained-ddpm"  # the same UNet at its initial weights: what FID says of no learning


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


def sample_served(model: DiffusionModel, n: int, steps: int, seed: int, batch: int) -> torch.Tensor:
    """n images [n, C, H, W] in [−1, 1] as a worker makes them: generate jobs of up to MAX_IMAGES
    images (DDIM, η = 0, image i seeded `seed` + i), `batch` images stepped together in the
    model's `DenoisingBatch`, x_0 turned to pixels by the model."""
    out = []
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        samples = []
        for first in range(start, stop, MAX_IMAGES):
            spec = GenerateSpec(
                model=model.name,
                n=min(MAX_IMAGES, stop - first),
                sampler="ddim",
                num_inference_steps=steps,
                eta=0.0,
                clip_denoised=True,
                seed=seed + first,
            )
            samples += prepare_denoise(spec, model, f"precision-{first}").samples
        running = model.new_batch()
        running.add(samples)
        while len(running):
            running.step()
        out.append(model.to_pixels(torch.stack([s.x for s in samples])))
    return torch.cat(out)


def input_dtypes(module: nn.Module) -> tuple[set[torch.dtype], Any]:
    """The dtypes of the tensors `module` is called with, as they come (and the hook's handle)."""
    seen: set[torch.dtype] = set()

    def record(_: nn.Module, args: tuple[Any, ...]) -> None:
        seen.add(args[0].dtype)

    return seen, module.register_forward_pre_hook(record)


def save_untrained(folder: Path, target: Path) -> None:
    """`folder`'s pipeline with its UNet back at initial weights (same config, seed 0)."""
    from diffusers import DDPMPipeline, UNet2DModel

    pipeline = DDPMPipeline.from_pretrained(folder)
    torch.manual_seed(0)
    unet = UNet2DModel.from_config(pipeline.unet.config)
    DDPMPipeline(unet=unet, scheduler=pipeline.scheduler).save_pretrained(target)


def measure_imported(
    folder: Path, dataset: str, n: int, steps: int, batch: int
) -> list[dict[str, Any]]:
    """FID of the imported pipeline at `folder` served in float32 and bfloat16 (the same seeds),
    float32 with other seeds, its untrained UNet, and n real train images (the data's floor)."""
    from models.diffusers_format.importer import import_pipeline

    classifier = load_eval_classifier(dataset, None)
    reference = classifier.measure(load_dataset(dataset, "test").images).features
    train = load_dataset(dataset, "train").images
    subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
    floor = feature_scores(reference, classifier.measure(train[subset]).features)["fid"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="precision-quality-") as scratch:
        repo, untrained = Path(scratch) / "models", Path(scratch) / "untrained"
        settings = Settings(model_dirs=str(repo), device="cpu")
        import_pipeline(str(folder), name=IMPORTED, settings=settings)
        save_untrained(folder, untrained)
        import_pipeline(str(untrained), name=UNTRAINED, settings=settings)
        for label, name, dtype, seed in (
            ("fp32", IMPORTED, "float32", 0),
            ("bf16", IMPORTED, "bfloat16", 0),
            ("fp32, other seeds", IMPORTED, "float32", n),
            ("untrained UNet, fp32", UNTRAINED, "float32", 0),
        ):
            model = ModelPool(settings.model_copy(update={"dtype": dtype})).get(name)
            assert isinstance(model, DiffusionModel)
            unet = model.denoiser.network.unet
            seen, hook = input_dtypes(unet.conv_in)
            started = time.perf_counter()
            images = sample_served(model, n, steps, seed, batch)
            seconds = time.perf_counter() - started
            hook.remove()
            if seen != {DTYPES[dtype]} or unet.dtype != DTYPES[dtype]:
                raise RuntimeError(f"{dtype} asked, the UNet ran {seen} with {unet.dtype} weights")
            scores = feature_scores(reference, classifier.measure(images).features)
            row = {
                "model": f"{folder.name} (imported diffusers)",
                "run": label,
                "unet_dtype": str(unet.dtype).removeprefix("torch."),
                "fid": scores["fid"],
                "seconds": round(seconds, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = rows[0]["fid"]
    for row in rows:
        row["vs_fp32"] = round(row["fid"] / base, 3) if base > 0 else None
    rows.append(
        {"model": f"{dataset} train split", "run": f"{len(subset)} real images", "fid": floor}
        | {"seconds": 0.0, "vs_fp32": round(floor / base, 3) if base > 0 else None}
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), help="zoo models")
    parser.add_argument(
        "--diffusers", type=Path, default=None, help="a DDPMPipeline folder to import and measure"
    )
    parser.add_argument("--dataset", default="digits", help="the --diffusers model's data")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = [
        row for name in args.models for row in measure(name, args.n, args.steps, args.batch_size)
    ]
    if args.diffusers is not None:
        rows += measure_imported(args.diffusers, args.dataset, args.n, args.steps, args.batch_size)
    print("\n| model | run | classifier-FID | × fp32 | seconds |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['run']} | {r['fid']:.3f} | {r['vs_fp32']} | {r['seconds']} |")
    if args.json:
        paths = {"json": str(args.json), "diffusers": args.diffusers and str(args.diffusers)}
        args.json.write_text(json.dumps({"args": vars(args) | paths, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
