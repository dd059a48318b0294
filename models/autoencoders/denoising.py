"""The denoising autoencoder (Vincent et al. 2010): the same network as the autoencoder, trained to
map a corrupted input x̃ ~ q(x̃ | x) back to the clean x, minimizing ‖D(E(x̃)) − x‖².

`noise_kind = "mixed"` draws the kind per batch among all three, so that one model serves every
kind of noise the gateway's `/reconstruct` accepts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.autoencoders.autoencoder import Autoencoder, AutoencoderConfig
from models.autoencoders.corruption import NOISE_KINDS, corrupt


@dataclass
class DenoisingConfig(AutoencoderConfig):
    noise_kind: str = "mixed"  # gaussian | masking | salt_pepper | mixed
    noise_amount: float = 0.3  # σ for gaussian, the fraction of pixels otherwise

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.noise_kind not in (*NOISE_KINDS, "mixed"):
            raise ValueError(f"unknown noise kind {self.noise_kind!r}")


class DenoisingAutoencoder(Autoencoder):
    kind = "denoising-autoencoder"
    config: DenoisingConfig

    def loss(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        kind = self.config.noise_kind
        if kind == "mixed":
            kind = NOISE_KINDS[int(torch.randint(len(NOISE_KINDS), (), generator=generator))]
        noisy = corrupt(x, kind, self.config.noise_amount, generator)
        mse = self.reconstruction_loss(noisy, x)
        return mse, {"mse": float(mse.detach())}
