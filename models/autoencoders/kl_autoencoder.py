"""The KL-regularized autoencoder, the first stage of latent diffusion (Rombach et al. 2022): a
Gaussian posterior q(z | x) = N(μ, diag σ²) over a latent feature map (f = 4: 32×32×3 → 4×8×8),
trained with an L1 reconstruction of a sample z = μ + σ·ε and a *small* KL to N(0, I):

    L = Σ_d |x_d − D(z)_d| + λ_KL · KL(q(z | x) ‖ N(0, I)),   λ_KL ≪ 1 (per image, averaged),

so the latent space stays close to a plain autoencoder's (sharp reconstructions) while its scale stays
bounded. `encode` returns μ; the latent diffusion model works on μ / latent_std, with latent_std the
standard deviation of μ over the training set (config.json `network.latent_std`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.autoencoders.blocks import ConvConfig
from models.autoencoders.vae import GaussianAutoencoder, gaussian_kl


@dataclass
class KLAutoencoderConfig(ConvConfig):
    in_channels: int = 3
    image_size: int = 32
    num_res_blocks: int = 1
    latent_dim: int | None = None
    latent_channels: int | None = 4
    kl_weight: float = 1e-4


class KLAutoencoder(GaussianAutoencoder):
    kind = "kl-autoencoder"
    config: KLAutoencoderConfig

    def loss(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        mu, logvar = self.posterior(x)
        x_hat = self.decoder_output(self.reparameterize(mu, logvar, generator))
        l1 = (x_hat - x).abs().flatten(1).sum(1)  # [N]
        kl = gaussian_kl(mu, logvar)  # [N]
        loss = (l1 + self.config.kl_weight * kl).mean() / x[0].numel()  # per dimension
        logs = {
            "l1": float(l1.mean().detach()) / x[0].numel(),
            "kl": float(kl.mean().detach()),
            "latent_std": float(mu.detach().std()),
        }
        return loss, logs
