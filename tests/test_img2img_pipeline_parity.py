"""Parity: ddserve's image-to-image on a text-conditioned latent pipeline vs diffusers'
`StableDiffusionImg2ImgPipeline` itself (tiny random components, `tests/tiny_sd.py`; SD 1.x's
scheduler config: scaled_linear, steps_offset 1, set_alpha_to_one False).

Both sides start from the same latents z_0 (the pipeline takes a 4-channel `image` as latents
as they are, skipping its VAE's sampled encoding; ddserve's `Sample.init_x0`) and draw the same
noise: the pipeline's `prepare_latents` draws row i's ε from generator i (`randn_tensor` with one
generator per row), ddserve from the sample's own stream of the same seed. Guidance 7.5 with
prompts and negative prompts; strength 0.3 and 0.75 of 20 steps; latents within 1e-4."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ddserve.params import guidance_weight
from models.diffusers_format.text import CrossAttentionUNet, PromptEncoder
from models.diffusion.noise import sample_generator
from models.diffusion.sampler import DenoisingBatch, Sample
from models.diffusion.scheduler_config import from_diffusers
from tests.tiny_sd import tiny_sd_pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

TOLERANCE = 1e-4
GUIDANCE = 7.5
PROMPTS = ["a red circle", "a blue dog"]
NEGATIVES = ["green", None]  # None: the pipeline's "" (ddserve's ∅)
SEED = 31


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    torch.set_num_threads(1)
    text_pipe = tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))
    return diffusers.StableDiffusionImg2ImgPipeline(**text_pipe.components)


def ours(pipe: Any, z0: torch.Tensor, strength: float, steps: int) -> torch.Tensor:
    schedule, options = from_diffusers(dict(pipe.scheduler.config))
    settings = options.settings(
        None, steps, guidance_scale=guidance_weight(GUIDANCE), strength=strength
    )
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    batch = DenoisingBatch(
        CrossAttentionUNet(pipe.unet),
        schedule,
        (4, 8, 8),
        prediction_type=options.prediction_type,
        null_condition=encoder.null_condition(),
    )
    conds = encoder.rows(PROMPTS)
    samples = [
        Sample(
            settings,
            sample_generator(SEED, i),
            cond=conds[i],
            uncond=None if NEGATIVES[i] is None else encoder.rows([NEGATIVES[i]])[0],
            init_x0=z0[i],
        )
        for i in range(len(PROMPTS))
    ]
    batch.add(samples)
    with torch.no_grad():
        while len(batch):
            batch.step()
    return torch.stack([s.x for s in samples])


@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_img2img_matches_the_pipeline(pipe: Any, strength: float) -> None:
    steps = 20
    z0 = torch.randn((len(PROMPTS), 4, 8, 8), generator=torch.Generator().manual_seed(5))
    theirs = pipe(
        prompt=PROMPTS,
        negative_prompt=[n or "" for n in NEGATIVES],
        image=z0.clone(),
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        generator=[sample_generator(SEED, i) for i in range(len(PROMPTS))],
        output_type="latent",
    ).images
    mine = ours(pipe, z0, strength, steps)
    assert (mine - theirs).abs().max().item() <= TOLERANCE
    assert (mine - z0).abs().mean() > 1e-2  # the denoising did something
