"""A tiny `LDMTextToImagePipeline` with random weights, built and saved locally (no download).

The layout of CompVis/ldm-text2im-large-256 at a tiny size, from diffusers' and transformers' own
classes: a `BertTokenizer` over a vocabulary written here (BERT's specials and a few words), an
`LDMBertModel` (d_model 32, 2 layers, 77 positions as the pipeline's max_length), a
`UNet2DConditionModel` on 4×8×8 latents with cross-attention width 32, an `AutoencoderKL` in the
`vqvae` slot with three down-samplings (f = 8, as the pipeline's hard-coded `height // 8` latent
grid assumes: 64×64 images) and a DDIMScheduler on SD's / LDM's scaled-linear β.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.tiny_sd import tiny_cross_attention_unet

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["a", "of", "red", "green", "blue", "yellow", "circle", "square", "cat", "dog", "photo"]
IMAGE = 64  # pixels: 8×8 latents, f = 8
LATENT = 8
SCALING_FACTOR = 0.5  # not the 0.18215 default: the decode must read the config's
LDM_SCHEDULER = {  # a DDIMScheduler on LDM's scaled-linear β (ldm-text2im-large-256's β)
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
}


def bert_tokenizer(folder: Path) -> Any:
    """A lower-casing WordPiece `BertTokenizer` over SPECIALS + WORDS (other words → [UNK])."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join([*SPECIALS, *WORDS]) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"))


def tiny_ldm_text_components(folder: Path, seed: int = 0) -> dict[str, Any]:
    """The pipeline's `vqvae`, `bert`, `tokenizer` and `unet` (random weights, seeded)."""
    from diffusers import AutoencoderKL
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (
        LDMBertConfig,
        LDMBertModel,
    )

    tokenizer = bert_tokenizer(folder / "tokenizer-src")
    torch.manual_seed(seed)
    bert = LDMBertModel(
        LDMBertConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            d_model=32,
            encoder_layers=2,
            encoder_attention_heads=2,
            head_dim=16,
            encoder_ffn_dim=37,
        )
    ).eval()
    unet = tiny_cross_attention_unet(sample_size=LATENT)
    vqvae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE,
        scaling_factor=SCALING_FACTOR,
    ).eval()
    return {"vqvae": vqvae, "bert": bert, "tokenizer": tokenizer, "unet": unet}


def tiny_ldm_text_pipeline(folder: Path, seed: int = 0, **scheduler: Any) -> Any:
    """LDMTextToImagePipeline of the tiny components and a DDIMScheduler (`LDM_SCHEDULER`, updated
    by `scheduler`), saved to `folder / "pipeline"`; returns the pipeline."""
    from diffusers import DDIMScheduler, LDMTextToImagePipeline

    pipe = LDMTextToImagePipeline(
        **tiny_ldm_text_components(folder, seed),
        scheduler=DDIMScheduler(**{**LDM_SCHEDULER, **scheduler}),
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "pipeline")
    return pipe
