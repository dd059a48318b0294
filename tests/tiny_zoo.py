"""A zoo of tiny, randomly initialised models for worker and engine tests (no training, no files
outside a temporary folder). Weights are random but non-zero everywhere, so every path of the
network — class embedding, time embedding, convolutions — changes the output."""

from __future__ import annotations

from pathlib import Path

import torch

from models.catalog import ModelEntry
from models.registry import WEIGHTS_FILE, save_weights, write_entry
from models.nets.unet import UNet, UNetConfig

CLASSES = [str(i) for i in range(10)]


def tiny_unet(seed: int = 0, image_size: int = 8, channels: int = 1, **config: object) -> UNet:
    cfg = UNetConfig(
        in_channels=channels,
        image_size=image_size,
        base_channels=8,
        channel_mults=(1,),
        num_res_blocks=1,
        attention_resolutions=(),
        heads=2,
        **({"num_classes": 10} | config),  # type: ignore[arg-type]
    )
    torch.manual_seed(seed)
    net = UNet(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def write_diffusion_model(
    zoo: Path,
    name: str = "tiny-ddpm",
    *,
    kind: str = "diffusion",
    seed: int = 0,
    image_size: int = 8,
    channels: int = 1,
    first_stage: str | None = None,
    latent_scale: float = 1.0,
    pixel_image: tuple[int, int, int] | None = None,
) -> ModelEntry:
    """A class-conditional tiny U-Net saved as a zoo model (`kind` diffusion or latent-diffusion)."""
    net = tiny_unet(seed, image_size, channels)
    folder = zoo / name
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(net, folder / WEIGHTS_FILE)
    c, h, w = pixel_image or (channels, image_size, image_size)
    network: dict[str, object] = {"unet": net.config.to_dict()}
    if kind == "latent-diffusion":
        network["latent_scale"] = latent_scale
    entry: dict[str, object] = {
        "name": name,
        "kind": kind,
        "tasks": ["generate", "inpaint"] if kind == "diffusion" else ["generate"],
        "dataset": "digits",
        "image": {"channels": c, "height": h, "width": w},
        "conditioning": {"type": "class", "classes": CLASSES},
        "schedule": {"kind": "linear", "num_timesteps": 1000},
        "samplers": ["ddpm", "ddim"],
        "defaults": {
            "sampler": "ddim",
            "num_inference_steps": 10,
            "guidance_scale": 0.0,
            "clip_denoised": kind == "diffusion",
        },
        "network": network,
        "files": {"weights": WEIGHTS_FILE},
    }
    if first_stage:
        entry["first_stage"] = first_stage
    return write_entry(folder, entry)
