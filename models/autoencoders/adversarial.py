"""The adversarial autoencoder (Makhzani et al. 2016): a deterministic autoencoder whose aggregated
posterior q(z) = E_x[δ(z − E(x))] is matched to the prior p(z) = N(0, I) by a GAN on the codes.

- reconstruction phase: min ‖D(E(x)) − x‖² over encoder and decoder;
- regularization phase: the discriminator d(z) learns to tell prior samples (label 1) from codes
  E(x) (label 0), −[log d(z_p) + log(1 − d(E(x)))], and the encoder learns to fool it,
  −log d(E(x)) (the non-saturating generator loss of Goodfellow et al. 2014).

`loss` is the autoencoder's objective (reconstruction + adv_weight · fooling); the discriminator has
its own optimizer and `discriminator_loss`. Once q(z) ≈ p(z), decoding prior samples generates."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.autoencoders.autoencoder import Autoencoder, AutoencoderConfig


@dataclass
class AdversarialConfig(AutoencoderConfig):
    latent_dim: int | None = 8
    disc_hidden: int = 128
    adv_weight: float = 0.05


class AdversarialAutoencoder(Autoencoder):
    kind = "adversarial-autoencoder"
    config: AdversarialConfig

    def __init__(self, config: AdversarialConfig) -> None:
        if config.latent_dim is None:
            raise ValueError("the adversarial autoencoder has a vector latent (latent_dim)")
        super().__init__(config)
        h = config.disc_hidden
        self.discriminator = nn.Sequential(  # z [N, D] → logit of "prior sample" [N, 1]
            nn.Linear(config.latent_dim, h),
            nn.LeakyReLU(0.2),
            nn.Linear(h, h),
            nn.LeakyReLU(0.2),
            nn.Linear(h, 1),
        )

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters()) + list(self.decoder.parameters())

    def prior_sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = next(self.parameters()).device
        return torch.randn((n, *self.latent_shape), generator=generator).to(device)

    def loss(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        z = self.encode(x)
        mse = (self.decoder_output(z) - x).pow(2).mean()
        logits = self.discriminator(z)
        fool = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        loss = mse + self.config.adv_weight * fool
        return loss, {"mse": float(mse.detach()), "gen": float(fool.detach())}

    def discriminator_loss(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        codes = self.encode(x).detach()
        prior = self.prior_sample(x.shape[0], generator)
        real, fake = self.discriminator(prior), self.discriminator(codes)
        loss = F.binary_cross_entropy_with_logits(
            real, torch.ones_like(real)
        ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        accuracy = 0.5 * ((real > 0).float().mean() + (fake < 0).float().mean())
        return loss, {"disc": float(loss.detach()), "disc_acc": float(accuracy)}

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x = D(z), z ~ N(0, I): n images [n, C, H, W]."""
        return self.decode(self.prior_sample(n, generator))
