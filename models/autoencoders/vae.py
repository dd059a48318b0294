"""The variational autoencoder (Kingma & Welling 2014).

Encoder q_φ(z | x) = N(μ_φ(x), diag σ²_φ(x)); reparameterization z = μ + σ ⊙ ε, ε ~ N(0, I);
prior p(z) = N(0, I); Gaussian decoder p_θ(x | z) = N(D_θ(z), s² I) with one learned scale s (the
"σ-VAE" of Rybkin et al. 2021, which balances the two terms without a hand-tuned weight).

    ELBO(x) = E_q[log p_θ(x | z)] − KL(q_φ(z | x) ‖ p(z))
    log p_θ(x | z) = −½ Σ_d [(x_d − D_θ(z)_d)² / s² + log(2π s²)]
    KL = ½ Σ_k (μ_k² + σ_k² − 1 − log σ_k²)                       (closed form, Appendix B)

The training loss is −ELBO per dimension (nats/dim). ELBO figures are per image in nats; bits/dim
converts them to the 8-bit pixel scale: x = p/127.5 − 1 scales densities by 127.5 per dimension, so
bits/dim = (−ELBO + D·ln 127.5) / (D·ln 2). The data are treated as continuous (no dequantization)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.autoencoders.base import AutoencoderBase
from models.autoencoders.blocks import ConvConfig, ConvDecoder, ConvEncoder, LatentHead, LatentInput

PIXEL_SCALE = 127.5  # x ∈ [−1, 1] = pixel / 127.5 − 1


@dataclass
class VAEConfig(ConvConfig):
    latent_dim: int | None = 16
    min_log_scale: float = -4.0  # floor of log s: keeps the likelihood finite on constant pixels


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)) per sample: ½ Σ (μ² + σ² − 1 − log σ²) over all but dim 0 → [N]."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log N(x; mean, s² I) summed over all but dim 0 → [N]."""
    z = (x - mean) * torch.exp(-log_scale)
    log_density = -0.5 * z.pow(2) - log_scale - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).sum(1)


class GaussianAutoencoder(AutoencoderBase):
    """An encoder to the Gaussian posterior q_φ(z | x) = N(μ, diag σ²) and a decoder D_θ(z): what the
    VAE and the KL-regularized autoencoder of latent diffusion share."""

    def __init__(self, config: ConvConfig) -> None:
        super().__init__()
        self.config = config
        width = config.latent_dim or config.latent_channels or 0
        self.encoder = nn.Sequential(ConvEncoder(config), LatentHead(config, 2 * width))
        self.decoder = nn.Sequential(LatentInput(config, width), ConvDecoder(config))

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of q_φ(z | x), each [N, *latent_shape]."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean μ: the deterministic code (serving, reconstruction)."""
        return self.posterior(x)[0]

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    @staticmethod
    def reparameterize(
        mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z = μ + σ ⊙ ε, ε ~ N(0, I)."""
        eps = torch.randn(mu.shape, generator=generator).to(mu.device, mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps


class VAE(GaussianAutoencoder):
    kind = "vae"
    config: VAEConfig

    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config)
        self.log_scale = nn.Parameter(torch.zeros(()))  # log s of p_θ(x | z)

    def decoder_log_scale(self) -> torch.Tensor:
        return self.log_scale.clamp(min=self.config.min_log_scale)

    # --- the bound ---
    def elbo_terms(
        self, x: torch.Tensor, generator: torch.Generator | None = None, samples: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(E_q[log p(x | z)] by Monte Carlo with `samples` draws, KL in closed form), each [N] nats."""
        mu, logvar = self.posterior(x)
        log_scale = self.decoder_log_scale()
        log_lik = torch.zeros(x.shape[0], device=x.device)
        for _ in range(samples):
            z = self.reparameterize(mu, logvar, generator)
            log_lik = log_lik + gaussian_log_likelihood(x, self.decoder_output(z), log_scale)
        return log_lik / samples, gaussian_kl(mu, logvar)

    def elbo_nats(
        self, x: torch.Tensor, generator: torch.Generator | None = None, samples: int = 1
    ) -> torch.Tensor:
        """ELBO(x) per image in nats, [N] (a lower bound on log p(x) in the [−1, 1] data space)."""
        log_lik, kl = self.elbo_terms(x, generator, samples)
        return log_lik - kl

    def bits_per_dim(
        self, x: torch.Tensor, generator: torch.Generator | None = None, samples: int = 1
    ) -> torch.Tensor:
        """−ELBO in bits per dimension on the 8-bit pixel scale, [N] (an upper bound on −log₂ p)."""
        dims = x[0].numel()
        nats = -self.elbo_nats(x, generator, samples) + dims * math.log(PIXEL_SCALE)
        return nats / (dims * math.log(2.0))

    def loss(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        log_lik, kl = self.elbo_terms(x, generator)
        dims = x[0].numel()
        loss = (kl - log_lik).mean() / dims  # −ELBO in nats per dimension
        logs = {
            "nll_recon": float(-log_lik.mean().detach()),
            "kl": float(kl.mean().detach()),
            "scale": float(self.decoder_log_scale().exp().detach()),
        }
        return loss, logs

    # --- generation ---
    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x = D(z), z ~ N(0, I): n images [n, C, H, W] (the decoder mean, as is usual to show)."""
        device = self.log_scale.device
        return self.decode(torch.randn((n, *self.latent_shape), generator=generator).to(device))

    def interpolate(self, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Decodings of (1 − t)·μ(x_a) + t·μ(x_b) for t = 0 … 1 in `steps` steps.

        x_a, x_b [N, C, H, W] → [N, steps, C, H, W]; single images [C, H, W] → [steps, C, H, W]."""
        single = x_a.dim() == 3
        if single:
            x_a, x_b = x_a[None], x_b[None]
        mu_a, mu_b = self.encode(x_a), self.encode(x_b)  # [N, *latent]
        t = torch.linspace(0.0, 1.0, steps, device=mu_a.device)
        t = t.reshape(1, steps, *([1] * (mu_a.dim() - 1)))
        z = (1 - t) * mu_a[:, None] + t * mu_b[:, None]  # [N, steps, *latent]
        images = self.decode(z.flatten(0, 1)).unflatten(0, (x_a.shape[0], steps))
        return images[0] if single else images
