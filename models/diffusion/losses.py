"""Training objective of a diffusion model.

L_simple (Ho et al. 2020, eq. 14): E_{t ~ U[1, T], x_0, ε ~ N(0, I)} ‖ε − ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t)‖².

Options:
- v-prediction (Salimans & Ho 2022): the target is v = √ᾱ_t ε − √(1 − ᾱ_t) x_0.
- min-SNR-γ weighting (Hang et al. 2023): each sample's loss is weighted by
  min(SNR_t, γ) / SNR_t for ε-prediction and min(SNR_t, γ) / (SNR_t + 1) for v-prediction,
  SNR_t = ᾱ_t / (1 − ᾱ_t); γ = 5 in the paper. Both weights make the objective equivalent to an
  x_0-loss clipped at SNR γ, which balances the timesteps' conflicting gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.diffusion.forward import PredictionType, q_sample, v_target
from models.diffusion.schedule import NoiseSchedule

NetworkFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def min_snr_weight(
    snr: torch.Tensor, gamma: float, prediction_type: PredictionType
) -> torch.Tensor:
    """Per-sample loss weight of min-SNR-γ, [B]."""
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)


def diffusion_loss(
    network: NetworkFn,
    schedule: NoiseSchedule,
    x0: torch.Tensor,  # [B, C, H, W] in [−1, 1]
    *,
    prediction_type: PredictionType = "epsilon",
    min_snr_gamma: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Monte-Carlo estimate of the (weighted) simple loss: t uniform, one ε per sample.

    `network(x_t, t)` returns the prediction; conditioning is bound by the caller (a closure).
    """
    batch = x0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (batch,), generator=generator)  # [B]
    noise = torch.randn(x0.shape, generator=generator).to(x0)  # [B, C, H, W]
    xt = q_sample(schedule, x0, t, noise)
    prediction = network(xt, t.to(x0.device))
    alpha_bar = schedule.alpha_bar_at(t)
    target = noise if prediction_type == "epsilon" else v_target(x0, noise, alpha_bar)
    per_sample = ((prediction - target) ** 2).flatten(1).mean(dim=1)  # [B]
    if min_snr_gamma is not None:
        weight = min_snr_weight(schedule.snr(t), min_snr_gamma, prediction_type)
        per_sample = per_sample * weight.to(per_sample)
    return per_sample.mean()
