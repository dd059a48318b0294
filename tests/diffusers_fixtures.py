"""Tiny diffusers pipelines with random weights, built and saved locally (no download).

Each builder seeds torch, makes a pipeline from diffusers' own classes at a tiny size and
`save_pretrained`s it into `folder`; `tests/conftest.py`-style session fixtures (in the tests that
use them) build each once per session. The sizes keep a forward pass at a few milliseconds:
16×16 pixels (8×8 latents), two UNet levels of 32 and 64 channels, one layer per block.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SIZE = 16  # pixel pipelines: 16×16 RGB
# The tiny first stages' layout: one down-sampling (f = 2), 3×16×16 images ↔ 4×8×8 latents.
F2_FIRST_STAGE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=SIZE,
)
LATENT = 8  # latent pipelines: 8×8 latents of a 16×16 image (first stage f = 2)


def tiny_unet(
    *,
    in_channels: int = 3,
    sample_size: int = SIZE,
    num_class_embeds: int | None = None,
    seed: int = 0,
):
    """A UNet2DModel with one attention level, as DDPM's, at the smallest useful width."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    ).eval()


def ddpm_pipeline(folder: Path, *, num_class_embeds: int | None = None, **scheduler: object):
    """DDPMPipeline(unet, DDPMScheduler) saved to `folder`; scheduler options as keywords."""
    from diffusers import DDPMPipeline, DDPMScheduler

    pipe = DDPMPipeline(
        unet=tiny_unet(num_class_embeds=num_class_embeds, seed=1),
        scheduler=DDPMScheduler(num_train_timesteps=1000, **scheduler),
    )
    pipe.save_pretrained(folder)
    return pipe


def ddim_pipeline(folder: Path, **scheduler: object):
    """DDIMPipeline(unet, DDIMScheduler) saved to `folder`."""
    from diffusers import DDIMPipeline, DDIMScheduler

    pipe = DDIMPipeline(
        unet=tiny_unet(seed=2), scheduler=DDIMScheduler(num_train_timesteps=1000, **scheduler)
    )
    pipe.save_pretrained(folder)
    return pipe


def repaint_pipeline(folder: Path):
    """RePaintPipeline(unet, RePaintScheduler) saved to `folder`."""
    from diffusers import RePaintPipeline, RePaintScheduler

    pipe = RePaintPipeline(unet=tiny_unet(seed=6), scheduler=RePaintScheduler())
    pipe.save_pretrained(folder)
    return pipe


def tiny_vqvae(seed: int = 3):
    """A VQModel with one down-sampling (f = 2): 3×16×16 images ↔ 4×8×8 latents, 64 codes."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    return VQModel(**F2_FIRST_STAGE, num_vq_embeddings=64, scaling_factor=0.5).eval()


def tiny_kl(seed: int = 4, shift_factor: float | None = None):
    """An AutoencoderKL with one down-sampling (f = 2): 3×16×16 images ↔ 4×8×8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        **F2_FIRST_STAGE,
        scaling_factor=0.7,
        shift_factor=shift_factor,
    ).eval()


def ldm_pipeline(folder: Path, *, first_stage: str = "vq", **scheduler: object):
    """LDMPipeline(vqvae, unet on 4×8×8 latents, DDIMScheduler) saved to `folder`; `first_stage`
    "kl" puts an AutoencoderKL in the `vqvae` slot (LDMPipeline only calls its `decode`)."""
    from diffusers import DDIMScheduler, LDMPipeline

    # The KL first stage has a shift_factor, which LDMPipeline ignores (so must ddserve).
    stage = tiny_vqvae() if first_stage == "vq" else tiny_kl(shift_factor=0.25)
    pipe = LDMPipeline(
        vqvae=stage,
        unet=tiny_unet(in_channels=4, sample_size=LATENT, seed=5),
        scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False, **scheduler),
    )
    pipe.save_pretrained(folder)
    return pipe


BUILDERS = {
    "ddpm": lambda folder: ddpm_pipeline(folder),
    "ddpm-class": lambda folder: ddpm_pipeline(folder, num_class_embeds=4),
    "ddim": lambda folder: ddim_pipeline(folder, clip_sample=False),
    "ddim-clip": lambda folder: ddim_pipeline(folder),  # DDIMScheduler's default clip_sample=True
    # DDIM configs of other models' kinds: v-prediction on SD's scaled_linear β with SD's
    # steps_offset, x_0-prediction on the cosine schedule with trailing spacing.
    "ddim-v": lambda folder: ddim_pipeline(
        folder,
        prediction_type="v_prediction",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
        set_alpha_to_one=False,
    ),
    "ddim-x0": lambda folder: ddim_pipeline(
        folder,
        prediction_type="sample",
        beta_schedule="squaredcos_cap_v2",
        timestep_spacing="trailing",
    ),
    "repaint": repaint_pipeline,
    "ldm": lambda folder: ldm_pipeline(folder),
    "ldm-kl": lambda folder: ldm_pipeline(folder, first_stage="kl"),
}


@pytest.fixture(scope="session")
def pipelines_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of tiny saved pipelines, one sub-folder per `BUILDERS` name (built once)."""
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("pipelines")
    for name, build in BUILDERS.items():
        build(root / name)
    return root
