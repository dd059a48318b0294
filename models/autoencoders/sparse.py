"""The sparse autoencoder (Ng, CS294A lecture notes): sigmoid hidden units h = σ(W·E(x) + b) ∈ (0, 1)
kept mostly inactive by the penalty

    β · Σ_j KL(ρ ‖ ρ̂_j),  KL(ρ ‖ ρ̂) = ρ log(ρ/ρ̂) + (1 − ρ) log((1 − ρ)/(1 − ρ̂)),

where ρ̂_j = (1/m) Σ_i h_j(x_i) is the mean activation of unit j over the batch and ρ = 0.05 the
target. The reconstruction term is (1/m) Σ_i ½‖x̂_i − x_i‖², as in the notes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.autoencoders.autoencoder import Autoencoder, AutoencoderConfig


@dataclass
class SparseConfig(AutoencoderConfig):
    latent_dim: int | None = 128  # the hidden units
    rho: float = 0.05
    beta: float = 1.0


def sparsity_penalty(hidden: torch.Tensor, rho: float, eps: float = 1e-6) -> torch.Tensor:
    """Σ_j KL(ρ ‖ ρ̂_j) for activations hidden [N, J] in (0, 1); ρ̂_j is the batch mean of unit j."""
    rho_hat = hidden.mean(dim=0).clamp(eps, 1 - eps)  # [J]
    kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
    return kl.sum()


class SparseAutoencoder(Autoencoder):
    kind = "sparse-autoencoder"
    config: SparseConfig

    def __init__(self, config: SparseConfig) -> None:
        if config.latent_dim is None:
            raise ValueError("the sparse autoencoder has a vector of hidden units (latent_dim)")
        super().__init__(config)
        self.encoder.append(nn.Sigmoid())

    def loss(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        hidden = self.encode(x)  # [N, J] in (0, 1)
        x_hat = self.decoder_output(hidden)
        reconstruction = 0.5 * (x_hat - x).pow(2).flatten(1).sum(1).mean()
        penalty = sparsity_penalty(hidden, self.config.rho)
        loss = reconstruction + self.config.beta * penalty
        logs = {
            "mse": float((x_hat - x).pow(2).mean().detach()),
            "kl_sparsity": float(penalty.detach()),
            "mean_activation": float(hidden.mean().detach()),
        }
        return loss, logs
