"""The VQ-VAE (van den Oord et al. 2017): a convolutional encoder to z_e(x) [N, D, h, w], nearest-code
quantization to one of K codebook vectors per position (models.autoencoders.quantizer), a decoder
from z_q, and the loss ‖x − D(z_q)‖² + L_vq.

`encode` returns the code indices and the quantized vectors; the exported encoder graph includes
the nearest-code search, so ONNX Runtime returns the indices too. The decoder graph reads indices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from models.autoencoders.base import AutoencoderBase, GraphMethod
from models.autoencoders.blocks import ConvConfig, ConvDecoder, ConvEncoder, LatentHead, LatentInput
from models.autoencoders.quantizer import VectorQuantizer, code_perplexity


@dataclass
class VQVAEConfig(ConvConfig):
    latent_dim: int | None = None
    latent_channels: int | None = 16  # D, the code vectors' dimension
    codebook_size: int = 64  # K
    beta: float = 0.25
    dead_share: float = 0.03


class VQEncoding(NamedTuple):
    codes: torch.Tensor  # [N, h, w] int64
    latents: torch.Tensor  # [N, D, h, w] the quantized vectors e_k


class VQVAE(AutoencoderBase):
    kind = "vqvae"
    config: VQVAEConfig
    encoder_outputs = ("codes", "latents")
    decoder_input = "codes"

    def __init__(self, config: VQVAEConfig) -> None:
        if config.latent_channels is None:
            raise ValueError("the VQ-VAE has a feature-map latent (latent_channels = D)")
        super().__init__()
        self.config = config
        d = config.latent_channels
        self.encoder = nn.Sequential(ConvEncoder(config), LatentHead(config, d))
        self.quantizer = VectorQuantizer(
            config.codebook_size, d, config.beta, dead_share=config.dead_share
        )
        self.decoder = nn.Sequential(LatentInput(config, d), ConvDecoder(config))

    @property
    def code_shape(self) -> list[int]:
        return self.latent_shape[1:]

    def encode(self, x: torch.Tensor) -> VQEncoding:  # type: ignore[override]
        codes = self.quantizer.nearest(self.encoder(x))
        return VQEncoding(codes, self.quantizer.lookup(codes))

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [N, h, w] → images [N, C, H, W] in [−1, 1]."""
        return self.decode(self.quantizer.lookup(codes))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).latents)

    def perplexity(self, x: torch.Tensor) -> float:
        """exp(H) of the code frequencies over all positions of the batch x (at most K)."""
        return float(code_perplexity(self.encode(x).codes, self.config.codebook_size))

    def loss(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        z_q, codes, vq_loss = self.quantizer(self.encoder(x), generator)
        mse = (self.decoder_output(z_q) - x).pow(2).mean()
        logs = {
            "mse": float(mse.detach()),
            "vq": float(vq_loss.detach()),
            "perplexity": float(code_perplexity(codes, self.config.codebook_size)),
        }
        return mse + vq_loss, logs

    def onnx_decoder(self) -> nn.Module:
        return GraphMethod(self, "decode_codes")

    def example_decoder_input(
        self, n: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return torch.randint(self.config.codebook_size, (n, *self.code_shape), generator=generator)
