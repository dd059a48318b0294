"""The plain convolutional autoencoder: x → E(x) = z (a bottleneck) → D(z) ≈ x, trained on f(x) = x
with the mean squared error."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.autoencoders.base import AutoencoderBase
from models.autoencoders.blocks import ConvConfig, ConvDecoder, ConvEncoder, LatentHead, LatentInput


@dataclass
class AutoencoderConfig(ConvConfig):
    pass


class Autoencoder(AutoencoderBase):
    kind = "autoencoder"

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        width = config.latent_dim or config.latent_channels or 0
        self.encoder = nn.Sequential(ConvEncoder(config), LatentHead(config, width))
        self.decoder = nn.Sequential(LatentInput(config, width), ConvDecoder(config))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def reconstruction_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """mean ‖D(E(inputs)) − targets‖² per pixel."""
        return (self.decoder_output(self.encode(inputs)) - targets).pow(2).mean()

    def loss(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        mse = self.reconstruction_loss(x, x)
        return mse, {"mse": float(mse.detach())}
