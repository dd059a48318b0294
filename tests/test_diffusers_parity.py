"""Imported diffusers pipelines sampled by ddserve's own engine give diffusers' images.

Each test loads a tiny saved pipeline (`tests/diffusers_fixtures.py`) twice: through the worker's
`ModelPool` (the UNet behind `UNetAdapter`, ddserve's `DenoisingBatch` with the settings the
worker gives a request, `model.scheduler.settings(...)` from the scheduler config, the first stage
behind `DiffusersCodec`) and through diffusers' own pipeline class, and compares the final images.

Same noise: ddserve's sample draws x_T and then every stochastic step's z from its own generator
`noise.sample_generator(seed, 0)`, in that order, each as `randn` of the sample's shape. The
pipelines are handed a fresh `sample_generator(seed, 0)` with batch_size 1: `randn_tensor` draws
x_T of shape [1, C, H, W] from it, then `scheduler.step(..., generator=...)` draws each step's
variance noise of the same shape — the same numbers in the same order. (DDPM draws nothing at its
last step, t = 0, and neither does ddserve; DDIM with η > 0 draws at its last step, whose σ is 0
and after which nothing is drawn.) `LDMPipeline` passes no generator to its scheduler, so it is
compared at η = 0 only. Tolerance: max |difference| ≤ 1e-4 on the [0, 1] images both return.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ddserve.settings import Settings
from models.diffusion.noise import sample_generator
from models.diffusion.sampler import Sample, SamplerSettings
from workers.model_pool import DiffusionModel, ModelPool

diffusers = pytest.importorskip("diffusers")

SEED = 3
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pool(pipelines_dir: Path) -> ModelPool:
    return ModelPool(Settings(model_dirs=str(pipelines_dir), device="cpu"))


def ddserve_image(
    model: DiffusionModel, settings: SamplerSettings, cond: torch.Tensor | None = None
) -> np.ndarray:
    """One image of the model's engine, as the pipelines return it: [1, H, W, C] in [0, 1]."""
    batch = model.new_batch()
    sample = Sample(settings=settings, generator=sample_generator(SEED, 0), cond=cond)
    batch.add([sample])
    while len(batch):
        batch.step()
    pixels = model.to_pixels(sample.x[None])  # [1, C, H, W] in [−1, 1]
    return (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("steps", [1, 7, 25])
def test_ddpm_pipeline(pool: ModelPool, pipelines_dir: Path, steps: int) -> None:
    pipe = diffusers.DDPMPipeline.from_pretrained(pipelines_dir / "ddpm")
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        generator=sample_generator(SEED, 0), num_inference_steps=steps, output_type="np"
    ).images
    model = pool.get("ddpm")
    assert isinstance(model, DiffusionModel)
    settings = model.scheduler.settings("ddpm", steps)
    assert np.abs(ddserve_image(model, settings) - expected).max() <= TOLERANCE


@pytest.mark.parametrize(("steps", "eta"), [(5, 0.0), (20, 0.0), (5, 1.0), (20, 1.0)])
def test_ddim_pipeline(pool: ModelPool, pipelines_dir: Path, steps: int, eta: float) -> None:
    pipe = diffusers.DDIMPipeline.from_pretrained(pipelines_dir / "ddim")
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        generator=sample_generator(SEED, 0),
        num_inference_steps=steps,
        eta=eta,
        output_type="np",
    ).images
    model = pool.get("ddim")
    settings = model.scheduler.settings("ddim", steps, eta=eta)
    assert np.abs(ddserve_image(model, settings) - expected).max() <= TOLERANCE


@pytest.mark.parametrize(
    ("name", "steps", "eta"),
    [("ddim-v", 10, 0.0), ("ddim-v", 7, 1.0), ("ddim-x0", 48, 0.0), ("ddim-x0", 9, 1.0)],
)
def test_ddim_pipeline_prediction_types_and_schedules(
    pool: ModelPool, pipelines_dir: Path, name: str, steps: int, eta: float
) -> None:
    """v-prediction on scaled_linear β with steps_offset 1 and set_alpha_to_one False (SD 2.x's
    config); x_0-prediction on the cosine schedule with trailing spacing (48 steps: a step count
    where trailing spacing has its rounding ties)."""
    pipe = diffusers.DDIMPipeline.from_pretrained(pipelines_dir / name)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        generator=sample_generator(SEED, 0), num_inference_steps=steps, eta=eta, output_type="np"
    ).images
    model = pool.get(name)
    assert isinstance(model, DiffusionModel)
    got = ddserve_image(model, model.scheduler.settings("ddim", steps, eta=eta))
    assert np.abs(got - expected).max() <= TOLERANCE


def test_ddim_pipeline_with_clip_sample(pool: ModelPool, pipelines_dir: Path) -> None:
    """DDIMScheduler's default clip_sample=True clamps x̂_0 but keeps the network's ε
    (use_clipped_model_output=False): the model's options (`from_diffusers`) do the same."""
    pipe = diffusers.DDIMPipeline.from_pretrained(pipelines_dir / "ddim-clip")
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(generator=sample_generator(SEED, 0), num_inference_steps=5, output_type="np")
    model = pool.get("ddim-clip")
    assert model.clip_denoised
    got = ddserve_image(model, model.scheduler.settings("ddim", 5))
    assert np.abs(got - expected.images).max() <= TOLERANCE


@pytest.mark.parametrize("name", ["ldm", "ldm-kl"])
@pytest.mark.parametrize("steps", [4, 16])
def test_ldm_pipeline(pool: ModelPool, pipelines_dir: Path, name: str, steps: int) -> None:
    """LDMPipeline: DDIM on the latents, then the first stage decodes z / scaling_factor (a VQModel,
    or an AutoencoderKL in its `vqvae` slot)."""
    pipe = diffusers.LDMPipeline.from_pretrained(pipelines_dir / name)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        generator=sample_generator(SEED, 0), num_inference_steps=steps, eta=0.0, output_type="np"
    ).images
    model = pool.get(name)
    assert model.is_latent and model.latent_scale == pipe.vqvae.config.scaling_factor
    settings = model.scheduler.settings("ddim", steps)
    assert np.abs(ddserve_image(model, settings) - expected).max() <= TOLERANCE


def test_class_conditional_unet(pool: ModelPool, pipelines_dir: Path) -> None:
    """A class-conditional UNet2DModel (`num_class_embeds`): no pipeline of diffusers takes the
    label, so the reference is the loop every such pipeline runs — DDPMScheduler.step on
    `unet(x, t, class_labels=y)` — with the same generator."""
    steps, label = 10, 2
    unet = diffusers.UNet2DModel.from_pretrained(pipelines_dir / "ddpm-class", subfolder="unet")
    scheduler = diffusers.DDPMScheduler.from_pretrained(
        pipelines_dir / "ddpm-class", subfolder="scheduler"
    )
    scheduler.set_timesteps(steps)
    generator = sample_generator(SEED, 0)
    x = torch.randn((1, 3, 16, 16), generator=generator)
    labels = torch.tensor([label])
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = unet(x, t, class_labels=labels).sample
            x = scheduler.step(output, t, x, generator=generator).prev_sample
    expected = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    model = pool.get("ddpm-class")
    settings = model.scheduler.settings("ddpm", steps)
    got = ddserve_image(model, settings, cond=torch.tensor(label))
    assert np.abs(got - expected).max() <= TOLERANCE
    other = ddserve_image(model, settings, cond=torch.tensor(0))
    assert np.abs(got - other).max() > 1e-3  # the label reaches the network


def test_mixed_batch_gives_each_sample_its_solo_image(pool: ModelPool) -> None:
    """Continuous batching on an imported model: samples with different samplers, step counts and
    seeds, joining at different steps, end as they do alone."""
    model = pool.get("ddim")
    plans = [
        (model.scheduler.settings("ddim", 6), 1),
        (model.scheduler.settings("ddpm", 4), 2),
        (model.scheduler.settings("dpmpp_2m", 5), 3),
        (model.scheduler.settings("ddim", 3, eta=1.0), 4),
    ]

    def solo(settings: SamplerSettings, seed: int) -> torch.Tensor:
        batch = model.new_batch()
        sample = Sample(settings=settings, generator=sample_generator(seed, 0))
        batch.add([sample])
        while len(batch):
            batch.step()
        return sample.x

    alone = [solo(settings, seed) for settings, seed in plans]
    batch = model.new_batch()
    samples = [Sample(settings=s, generator=sample_generator(seed, 0)) for s, seed in plans]
    batch.add(samples[:2])
    batch.step()
    batch.add(samples[2:])
    while len(batch):
        batch.step()
    for sample, expected in zip(samples, alone, strict=True):
        # Up to the float rounding of a batched network call (a random UNet reaches |x| ~ 50).
        torch.testing.assert_close(sample.x, expected, rtol=1e-4, atol=1e-4)


def test_a_network_without_null_takes_conditioned_samples_only_all_or_none(
    pool: ModelPool,
) -> None:
    """Without a ∅ row, a conditioned sample's label must reach the network (it was dropped when
    the batch stacked conditions only for networks with a ∅ row), and a batch never mixes."""
    model = pool.get("ddpm-class")
    batch = model.new_batch()
    labelled = Sample(SamplerSettings("ddpm", 3), sample_generator(1, 0), cond=torch.tensor(1))
    batch.add([labelled])
    assert batch.layout.cond is not None and batch.layout.cond.tolist() == [1]
    with pytest.raises(ValueError, match="all conditioned or all unconditioned"):
        batch.add([Sample(SamplerSettings("ddpm", 3), sample_generator(2, 0))])
    assert len(batch) == 1


def test_latent_mask_keeps_only_whole_patches() -> None:
    from workers.execute import latent_mask

    mask = torch.ones((1, 16, 16))
    mask[:, 4:11, 4:11] = 0.0  # generate a 7×7 square not aligned to the 2×2 patches
    grid = latent_mask(mask, (8, 8))
    assert grid.shape == (1, 8, 8)
    expected = torch.ones((1, 8, 8))
    expected[:, 2:6, 2:6] = 0.0  # every patch touching the square is generated
    assert torch.equal(grid, expected)


def test_latent_inpainting_keeps_the_known_latents(pool: ModelPool) -> None:
    """RePaint in latent space: the known region's latents z_0 = s·E(x) are the result's there."""
    model = pool.get("ldm")
    image = torch.rand((1, 3, 16, 16), generator=torch.Generator().manual_seed(0)) * 2 - 1
    known = model.from_pixels(image)[0]  # [4, 8, 8]
    assert known.shape == (4, 8, 8)
    mask = torch.ones((1, 8, 8))
    mask[:, 2:6, 2:6] = 0.0
    batch = model.new_batch()
    sample = Sample(SamplerSettings("ddim", 5), sample_generator(1, 0), known=known, mask=mask)
    batch.add([sample])
    while len(batch):
        batch.step()
    kept = mask.bool().expand(4, 8, 8)
    assert torch.allclose(sample.x[kept], known[kept], atol=1e-6)
    assert not torch.allclose(sample.x[~kept], known[~kept], atol=1e-2)


def test_first_stage_codecs_are_the_diffusers_modules(pool: ModelPool, pipelines_dir: Path) -> None:
    """`/encode`, `/decode`, `/reconstruct` of an imported first stage: the KL posterior mean and
    decoder; the VQ pre-quantization latents, VQModel's own code indices, and decoding by codes or
    by latents (quantized first) alike."""
    images = torch.rand((2, 3, 16, 16), generator=torch.Generator().manual_seed(5)) * 2 - 1
    kl = diffusers.AutoencoderKL.from_pretrained(pipelines_dir / "ldm-kl", subfolder="vqvae")
    codec = pool.codec("ldm-kl-vae")
    encoded = codec.encode(images.numpy())
    with torch.no_grad():
        mean = kl.encode(images).latent_dist.mean
        decoded = kl.decode(mean).sample
    assert encoded["codes"] is None
    np.testing.assert_allclose(encoded["latents"], mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(codec.decode(latents=mean.numpy()), decoded.numpy(), atol=1e-5)
    vq = diffusers.VQModel.from_pretrained(pipelines_dir / "ldm", subfolder="vqvae")
    codec = pool.codec("ldm-vqvae")
    encoded = codec.encode(images.numpy())
    with torch.no_grad():
        h = vq.encode(images).latents
        _, _, (_, _, index) = vq.quantize(h)
        expected = vq.decode(h).sample  # quantizes h first
    np.testing.assert_allclose(encoded["latents"], h.numpy(), atol=1e-5)
    assert encoded["codes"] is not None
    assert np.array_equal(encoded["codes"], index.reshape(2, 8, 8).numpy())
    by_codes = codec.decode(codes=encoded["codes"])
    np.testing.assert_allclose(by_codes, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(codec.decode(latents=h.numpy()), by_codes, atol=1e-5)
    np.testing.assert_allclose(codec.reconstruct(images.numpy()), by_codes, atol=1e-5)
