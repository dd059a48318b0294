"""The forward (noising) process and its posterior, Ho et al. 2020 §2.

    q(x_t | x_0)          = N(√ᾱ_t x_0, (1 − ᾱ_t) I)                       (eq. 4)
    q(x_{t−1} | x_t, x_0) = N(μ̃_t(x_t, x_0), β̃_t I)                         (eq. 6–7)
    μ̃_t = √ᾱ_{t−1} β_t / (1 − ᾱ_t) · x_0 + √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · x_t
    β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t

and the conversions between what a network may predict: the noise ε, the clean image x_0, or the
velocity v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022).
All functions take per-sample timesteps t of shape [B]; coefficients broadcast over [B, ...].
"""

from __future__ import annotations

from typing import Literal

import torch

from models.diffusion.schedule import NoiseSchedule

PredictionType = Literal["epsilon", "v"]


def _per_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] float64 → [B, 1, ..., 1] in like's dtype and device, to broadcast over a batch."""
    return coef.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def q_sample(
    schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε — a draw from q(x_t | x_0) by reparameterization."""
    a = schedule.alpha_bar_at(t.cpu())
    return _per_sample(a.sqrt(), x0) * x0 + _per_sample((1 - a).sqrt(), x0) * noise


def q_posterior(
    schedule: NoiseSchedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean μ̃_t(x_t, x_0) [B, ...] and variance β̃_t [B] of q(x_{t−1} | x_t, x_0), for t ≥ 0."""
    t = t.cpu()
    a = schedule.alpha_bar_at(t)
    a_prev = schedule.alpha_bar_at(t - 1)
    beta = schedule.betas[t]
    coef_x0 = a_prev.sqrt() * beta / (1 - a)
    coef_xt = (1 - beta).sqrt() * (1 - a_prev) / (1 - a)
    mean = _per_sample(coef_x0, x0) * x0 + _per_sample(coef_xt, xt) * xt
    variance = (1 - a_prev) / (1 - a) * beta
    return mean, variance


def predict_x0_from_eps(
    xt: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor
) -> torch.Tensor:
    """x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t, alpha_bar of shape [B]."""
    return (xt - _per_sample((1 - alpha_bar).sqrt(), xt) * eps) / _per_sample(alpha_bar.sqrt(), xt)


def eps_from_v(xt: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """ε = √(1 − ᾱ_t) x_t + √ᾱ_t v (from v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 and x_t's definition)."""
    return _per_sample((1 - alpha_bar).sqrt(), xt) * xt + _per_sample(alpha_bar.sqrt(), xt) * v


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ_t ε − √(1 − ᾱ_t) x_0, the target of v-prediction."""
    return _per_sample(alpha_bar.sqrt(), x0) * noise - _per_sample((1 - alpha_bar).sqrt(), x0) * x0


def model_output_to_eps(
    output: torch.Tensor, xt: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: PredictionType
) -> torch.Tensor:
    """Whatever the network predicts, the samplers work with ε."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v":
        return eps_from_v(xt, output, alpha_bar)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
