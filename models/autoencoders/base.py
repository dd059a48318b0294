"""The interface every autoencoder of the zoo shares: `encode(x)`, `decode(z)`, `reconstruct(x)`,
`loss(x, generator)` and a `config`; and the two graphs `ddserve export` writes to ONNX.

Images are [N, C, H, W] in [−1, 1]. `decode` clamps to that range; the losses use the raw decoder
output (`decoder_output`) so that the clamp never blocks a gradient."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from models.autoencoders.blocks import ConvConfig


class GraphMethod(nn.Module):
    """One method of a model as a module whose forward ONNX export can trace."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return getattr(self.model, self.method)(x)


class AutoencoderBase(nn.Module, ABC):
    kind: ClassVar[str]
    config: ConvConfig
    # ONNX graph signatures: input and output names of the encoder and decoder graphs
    encoder_outputs: ClassVar[tuple[str, ...]] = ("latents",)
    decoder_input: ClassVar[str] = "latents"

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] → the deterministic latent (a vector or a feature map)."""

    @abstractmethod
    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        """latent → the decoder's raw output [N, C, H, W] (unclamped)."""

    @abstractmethod
    def loss(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The training objective on a batch of clean images, and scalars to log."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder_output(z).clamp(-1.0, 1.0)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @property
    def latent_shape(self) -> list[int]:
        return self.config.latent_shape

    def onnx_encoder(self) -> nn.Module:
        return GraphMethod(self, "encode")

    def onnx_decoder(self) -> nn.Module:
        return GraphMethod(self, "decode")

    def example_decoder_input(
        self, n: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Random decoder inputs of the right shape and type (ONNX export and parity checks)."""
        return torch.randn((n, *self.latent_shape), generator=generator)
