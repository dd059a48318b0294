"""One reverse step of each sampler, as coefficients per sample and one pure update for a batch.

Every sampler here moves from timestep t to an earlier s (s = −1 means ᾱ_s = 1) through the
prediction x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t:

    x_s = √ᾱ_s · x̂_0 + c_ε · ε + σ · z,   z ~ N(0, I)

With the strided variances β'_t = 1 − ᾱ_t/ᾱ_s and β̃'_t = (1 − ᾱ_s)/(1 − ᾱ_t) · β'_t (Nichol &
Dhariwal 2021, §4: respacing; for s = t − 1 they are β_t and β̃_t):

- DDIM (Song et al. 2021, eq. 12): σ = η √β̃'_t, c_ε = √(1 − ᾱ_s − σ²). η = 0 is deterministic.
- DDPM ancestral (Ho et al. 2020, Algorithm 2): the mean is the posterior mean μ̃_t(x_t, x̂_0), which
  is the η = 1 DDIM mean, so c_ε = √(1 − ᾱ_s − β̃'_t); σ² = β'_t or β̃'_t; no noise on the last step.

Classifier guidance (Dhariwal & Nichol 2021), g = ∇_{x_t} log f_φ(y | x_t, t):
- DDPM (Algorithm 1): the mean shifts by s · Σ · g with Σ = σ² of the step;
- DDIM (Algorithm 2): ε̂ = ε − √(1 − ᾱ_t) · s · g before the update.

Because every coefficient is a per-sample number, one batch can mix timesteps, step counts,
samplers, η, variances and guidance scales: the update below is elementwise in them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

SamplerName = Literal["ddpm", "ddim"]
DdpmVariance = Literal["beta", "beta_tilde"]

# Column order of the per-sample coefficient rows gathered for a batch.
COEFFICIENT_NAMES = (
    "sqrt_alpha_bar_t",  # √ᾱ_t
    "sqrt_one_minus_alpha_bar_t",  # √(1 − ᾱ_t)
    "c_x0",  # √ᾱ_s
    "c_eps",  # c_ε
    "sigma",  # σ
    "c_mean_grad",  # s · σ² (DDPM classifier guidance)
    "c_eps_grad",  # s · √(1 − ᾱ_t) (DDIM classifier guidance)
    "sqrt_alpha_bar_s",  # √ᾱ_s, for the known region of inpainting
    "sqrt_one_minus_alpha_bar_s",  # √(1 − ᾱ_s)
)
_COLUMN = {name: i for i, name in enumerate(COEFFICIENT_NAMES)}


@dataclass(frozen=True)
class StepCoefficients:
    """The numbers of one reverse step t → s of one sample (see the module docstring)."""

    sqrt_alpha_bar_t: float
    sqrt_one_minus_alpha_bar_t: float
    c_x0: float
    c_eps: float
    sigma: float
    c_mean_grad: float
    c_eps_grad: float
    sqrt_alpha_bar_s: float
    sqrt_one_minus_alpha_bar_s: float

    def as_row(self) -> tuple[float, ...]:
        return tuple(getattr(self, name) for name in COEFFICIENT_NAMES)


def step_coefficients(
    alpha_bar_t: float,
    alpha_bar_s: float,
    *,
    sampler: SamplerName,
    eta: float = 0.0,
    ddpm_variance: DdpmVariance = "beta_tilde",
    classifier_scale: float = 0.0,
    is_last: bool = False,
) -> StepCoefficients:
    """Coefficients of the step from ᾱ_t to ᾱ_s (> ᾱ_t), computed in float64."""
    beta = 1.0 - alpha_bar_t / alpha_bar_s  # β'_t
    beta_tilde = (1.0 - alpha_bar_s) / (1.0 - alpha_bar_t) * beta  # β̃'_t
    if sampler == "ddim":
        variance = eta**2 * beta_tilde
        c_eps = math.sqrt(max(1.0 - alpha_bar_s - variance, 0.0))
        c_mean_grad = 0.0
        c_eps_grad = classifier_scale * math.sqrt(1.0 - alpha_bar_t)
    elif sampler == "ddpm":
        variance = 0.0 if is_last else (beta if ddpm_variance == "beta" else beta_tilde)
        c_eps = math.sqrt(max(1.0 - alpha_bar_s - beta_tilde, 0.0))
        c_mean_grad = classifier_scale * variance
        c_eps_grad = 0.0
    else:
        raise ValueError(f"unknown sampler {sampler!r}; expected 'ddpm' or 'ddim'")
    return StepCoefficients(
        sqrt_alpha_bar_t=math.sqrt(alpha_bar_t),
        sqrt_one_minus_alpha_bar_t=math.sqrt(1.0 - alpha_bar_t),
        c_x0=math.sqrt(alpha_bar_s),
        c_eps=c_eps,
        sigma=math.sqrt(variance),
        c_mean_grad=c_mean_grad,
        c_eps_grad=c_eps_grad,
        sqrt_alpha_bar_s=math.sqrt(alpha_bar_s),
        sqrt_one_minus_alpha_bar_s=math.sqrt(1.0 - alpha_bar_s),
    )


def _col(coefficients: torch.Tensor, name: str, ndim: int) -> torch.Tensor:
    """Column `name` of the [B, K] coefficient table, shaped [B, 1, ..., 1] for broadcasting."""
    return coefficients[:, _COLUMN[name]].reshape(-1, *([1] * (ndim - 1)))


def reverse_step(
    x_t: torch.Tensor,  # [B, C, H, W]
    eps: torch.Tensor,  # [B, C, H, W], after classifier-free guidance
    coefficients: torch.Tensor,  # [B, K] rows of `StepCoefficients.as_row()`, x_t's dtype/device
    noise: torch.Tensor | None,  # [B, C, H, W] z, or None when every σ is 0
    grad: torch.Tensor | None = None,  # [B, C, H, W] ∇ log f_φ(y | x_t), or None without guidance
    clip_denoised: torch.Tensor | None = None,  # [B] bool: clamp x̂_0 to [−1, 1] for these rows
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_s for every row, and the prediction x̂_0 it went through. Pure: no state, no randomness."""
    n = x_t.dim()
    sqrt_a = _col(coefficients, "sqrt_alpha_bar_t", n)
    sqrt_1ma = _col(coefficients, "sqrt_one_minus_alpha_bar_t", n)
    if grad is not None:
        eps = eps - _col(coefficients, "c_eps_grad", n) * grad
    x0 = (x_t - sqrt_1ma * eps) / sqrt_a
    if clip_denoised is not None and bool(clip_denoised.any()):
        # DDIM with a clipped x̂_0 must use the ε consistent with it (as in diffusers' DDIMScheduler).
        clip = clip_denoised.reshape(-1, *([1] * (n - 1)))
        x0 = torch.where(clip, x0.clamp(-1.0, 1.0), x0)
        eps = torch.where(clip, (x_t - sqrt_a * x0) / sqrt_1ma, eps)
    x_s = _col(coefficients, "c_x0", n) * x0 + _col(coefficients, "c_eps", n) * eps
    if noise is not None:
        x_s = x_s + _col(coefficients, "sigma", n) * noise
    if grad is not None:
        x_s = x_s + _col(coefficients, "c_mean_grad", n) * grad
    return x_s, x0


def forward_jump(
    x_s: torch.Tensor, alpha_bar_s: float, alpha_bar_t: float, noise: torch.Tensor
) -> torch.Tensor:
    """x_t ~ q(x_t | x_s) = N(√(ᾱ_t/ᾱ_s) x_s, (1 − ᾱ_t/ᾱ_s) I) for t > s: RePaint's jump back."""
    ratio = alpha_bar_t / alpha_bar_s
    return math.sqrt(ratio) * x_s + math.sqrt(1.0 - ratio) * noise
