"""A tiny `StableDiffusionPipeline` with random weights, built and saved locally (no download).

Real diffusers/transformers classes at a tiny size: a `CLIPTokenizer` from a vocabulary and merges
written here (byte-level BPE over letters, digits and a few whole words), a 2-layer `CLIPTextModel`
(hidden size 32, L = 77 as in SD), a `UNet2DConditionModel` on 4×8×8 latents with cross-attention
(dimension 32), an `AutoencoderKL` with one down-sampling (16×16 RGB images) and SD 1.x's scheduler
config (scaled_linear β from 0.00085 to 0.012, steps_offset 1, set_alpha_to_one False).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests.diffusers_fixtures import F2_FIRST_STAGE

CONTEXT_LEN = 77  # SD's model_max_length
WORDS = ["red", "green", "blue", "yellow", "circle", "square", "cross", "a", "cat", "dog", "photo"]
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
SD_SCHEDULER = {  # SD 1.x's scheduler_config.json, as DDIMScheduler arguments
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def write_tokenizer_files(folder: Path) -> None:
    """vocab.json + merges.txt of a CLIP BPE: the specials, each character alone and word-final
    (`</w>`), and the merges that build each of WORDS left to right."""
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for special in ("<|startoftext|>", "<|endoftext|>"):
        add(special)
    for c in CHARACTERS:
        add(c)
    for c in CHARACTERS:
        add(c + "</w>")
    merges: list[str] = []
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1], *parts[2:]]
            add(parts[0])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": CONTEXT_LEN}))


def tiny_cross_attention_unet(sample_size: int, in_channels: int = 4) -> Any:
    """The tiny text pipelines' `UNet2DConditionModel`: two levels (32, 64), cross-attention to
    32-wide text rows in the first; 4 latent channels out, `in_channels` in (9: an inpainting
    UNet's x_t, mask and masked-image latents). Weights from torch's global generator."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def tiny_text_components(folder: Path, seed: int = 0, unet_channels: int = 4) -> dict[str, Any]:
    """The tokenizer (read back from the files written under `folder / "tokenizer-src"`), text
    encoder, UNet and VAE of the tiny pipeline."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_tokenizer_files(folder / "tokenizer-src")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer-src")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CONTEXT_LEN,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=32,
        )
    ).eval()
    unet = tiny_cross_attention_unet(sample_size=8, in_channels=unet_channels)
    vae = AutoencoderKL(**F2_FIRST_STAGE, scaling_factor=0.18215).eval()
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "vae": vae}


def tiny_sd_pipeline(
    folder: Path,
    seed: int = 0,
    pipeline_class: str = "StableDiffusionPipeline",
    unet_channels: int = 4,
    **scheduler: Any,
) -> Any:
    """A pipeline of `pipeline_class` (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline: the same components) of the tiny components, its UNet taking
    `unet_channels` (9: an inpainting UNet), and a DDIMScheduler (SD's config, updated by
    `scheduler`), saved to `folder / "pipeline"`; returns the pipeline."""
    import diffusers
    from diffusers import DDIMScheduler

    pipe = getattr(diffusers, pipeline_class)(
        **tiny_text_components(folder, seed, unet_channels),
        scheduler=DDIMScheduler(**{**SD_SCHEDULER, **scheduler}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "pipeline")
    return pipe
