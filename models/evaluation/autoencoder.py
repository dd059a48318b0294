"""Autoencoder metrics on the test split.

- Reconstruction error on the [0, 1] pixel scale: MSE = mean (x̂ − x)², and
  PSNR = 10 log₁₀(1 / MSE) dB, both over the whole split (PSNR of the mean MSE; the mean of
  per-image PSNRs, which Jensen's inequality makes larger, is reported beside it).
- VAE: the ELBO E_q[log p(x | z)] − KL(q(z | x) ‖ p(z)) in nats per image (Kingma & Welling 2014),
  a lower bound on log p(x) for the continuous density on [−1, 1]^D, and the corresponding bound on
  the negative log-likelihood of 8-bit images in bits per dimension,
      bpd ≈ (−ELBO / D + ln 127.5) / ln 2,
  since a pixel bin of width 2/255 has probability ≈ p(x) · 2/255 (the usual dequantization
  argument, Theis et al. 2016).
- VQ-VAE: the perplexity exp(H) of the code frequencies over all test positions (van den Oord et
  al. 2017), out of the codebook size K.
- Denoising autoencoder: PSNR of D(E(x̃)) against the clean x for each corruption x̃ ~ q(x̃ | x)
  it was trained on (Vincent et al. 2010), beside the PSNR of x̃ itself.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def psnr_db(mse_unit: float) -> float:
    """PSNR for an MSE on the [0, 1] scale (peak 1)."""
    return float("inf") if mse_unit <= 0 else 10.0 * math.log10(1.0 / mse_unit)


@torch.no_grad()
def reconstructions(model: nn.Module, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """x̂ = D(E(x)) for images [N, C, H, W] in [−1, 1], clamped to [−1, 1]."""
    model.eval()
    parts = [
        model.reconstruct(images[start : start + batch_size]).clamp(-1.0, 1.0)
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(parts)


def reconstruction_metrics(images: torch.Tensor, recon: torch.Tensor) -> dict[str, float]:
    """MSE ([0, 1] scale) and PSNR of the split, and the mean per-image PSNR."""
    per_image = ((recon - images) / 2).pow(2).flatten(1).mean(1)  # [N], [0, 1] scale
    mse = float(per_image.mean())
    per_image_psnr = 10.0 * torch.log10(1.0 / per_image.clamp(min=1e-12))
    return {
        "mse": mse,
        "psnr_db": psnr_db(mse),
        "psnr_db_mean_per_image": float(per_image_psnr.mean()),
    }


@torch.no_grad()
def elbo_metrics(
    model: nn.Module, images: torch.Tensor, seed: int = 0, samples: int = 1, batch_size: int = 250
) -> dict[str, float]:
    """Mean ELBO in nats per image and the bits-per-dimension bound (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    elbo = torch.cat(
        [
            model.elbo_nats(images[start : start + batch_size], generator, samples)
            for start in range(0, len(images), batch_size)
        ]
    )  # [N] nats
    dims = images[0].numel()
    mean = float(elbo.mean())
    return {
        "elbo_nats": mean,
        "elbo_nats_per_dim": mean / dims,
        "nll_bound_bits_per_dim": (-mean / dims + math.log(127.5)) / math.log(2.0),
        "elbo_samples": samples,
    }


@torch.no_grad()
def perplexity_metrics(
    model: nn.Module, images: torch.Tensor, codebook_size: int
) -> dict[str, float]:
    perplexity = float(model.perplexity(images))
    return {
        "perplexity": perplexity,
        "codebook_size": codebook_size,
        "perplexity_fraction": perplexity / codebook_size,
    }


@torch.no_grad()
def denoising_metrics(
    model: nn.Module, images: torch.Tensor, amount: float, seed: int = 0, batch_size: int = 250
) -> dict[str, dict[str, float]]:
    """Per corruption kind: PSNR of the corrupted input and of its reconstruction, against x."""
    from models.autoencoders.corruption import NOISE_KINDS, corrupt

    result = {}
    for kind in NOISE_KINDS:
        noisy = corrupt(images, kind, amount, torch.Generator().manual_seed(seed))
        denoised = reconstructions(model, noisy, batch_size)
        result[kind] = {
            "amount": amount,
            "psnr_db_input": reconstruction_metrics(images, noisy)["psnr_db"],
            "psnr_db_output": reconstruction_metrics(images, denoised)["psnr_db"],
        }
    return result
