"""An imported diffusers pipeline served with `DDSERVE_DTYPE=bfloat16` runs its UNet in bf16 —
weights and the activations inside the UNet, not only the adapter's input — and answers float32
close to the same model in float32 (issue #21 item 2; the FID side is
`benchmarks/precision_quality.py --diffusers`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ddserve.settings import Settings
from models.diffusion.noise import sample_generator
from models.diffusion.sampler import Sample
from tests.diffusers_fixtures import ddpm_pipeline
from workers.model_pool import DiffusionModel, ModelPool

pytest.importorskip("diffusers")


def served(folder: Path, dtype: str) -> DiffusionModel:
    torch.set_num_threads(1)
    model = ModelPool(Settings(model_dirs=str(folder), device="cpu", dtype=dtype)).get("ddpm")
    assert isinstance(model, DiffusionModel)
    return model


def record_dtypes(module: torch.nn.Module, seen: list[tuple[torch.dtype, torch.dtype]]) -> Any:
    """Appends (input dtype, output dtype) of each call of `module`."""

    def hook(_: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        seen.append((args[0].dtype, output.dtype))

    return module.register_forward_hook(hook)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("precision-pipelines")
    ddpm_pipeline(root / "ddpm")
    return root


@pytest.fixture(scope="module")
def models(folder: Path) -> tuple[DiffusionModel, DiffusionModel]:
    """The pipeline served in bfloat16 and in float32."""
    return served(folder, "bfloat16"), served(folder, "float32")


def test_bfloat16_reaches_the_diffusers_unet(models: tuple[DiffusionModel, DiffusionModel]) -> None:
    half, full = models
    unet = half.denoiser.network.unet
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in full.denoiser.network.unet.parameters()} == {torch.float32}
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    handles = [record_dtypes(unet.conv_in, seen), record_dtypes(unet.mid_block, seen)]
    handles.append(record_dtypes(unet.conv_out, seen))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=g)  # [N, C, H, W]
    t = torch.tensor([999, 500, 1])
    out = half.denoiser(x, t, None)
    for handle in handles:
        handle.remove()
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 3  # conv_in, mid-block, conv_out
    reference = full.denoiser(x, t, None)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.equal(out, reference)  # it did run in bf16
    torch.testing.assert_close(out, reference, rtol=0.05, atol=0.05)


def test_a_bfloat16_sampling_run_stays_close_to_float32(
    models: tuple[DiffusionModel, DiffusionModel],
) -> None:
    """bf16's error is measured against the distance between two seeds' fp32 images (mean
    |Δ| ≈ 0.9 of a [-1, 1] range): bf16's mean |Δ| was 0.005 on two CPUs, its largest pixel
    0.06-0.12 depending on the CPU's bf16 kernels (one pixel's tail, so it gets a looser bound)."""
    half, full = models

    def images(model: DiffusionModel, seed: int) -> torch.Tensor:
        settings = model.scheduler.settings("ddim", 3)
        samples = [Sample(settings=settings, generator=sample_generator(seed, i)) for i in range(2)]
        batch = model.new_batch()
        batch.add(samples)
        while len(batch):
            batch.step()
        return model.to_pixels(torch.stack([s.x for s in samples]))  # [2, 3, 16, 16]

    bf16, fp32, other_seed = images(half, 5), images(full, 5), images(full, 105)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    error = (bf16 - fp32).abs()
    scale = (other_seed - fp32).abs().mean()
    assert 0 < error.mean() < 0.02 < scale / 10, (error.mean(), scale)
    assert error.max() < 0.25, error.max()
