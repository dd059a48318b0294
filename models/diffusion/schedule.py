"""Noise schedules: the variances β_1..β_T of the forward process and everything derived from them.

Ho et al. 2020 (DDPM) use a linear schedule β_t from 1e-4 to 0.02 over T = 1000 steps; latent diffusion
(Rombach et al. 2022, Stable Diffusion) a "scaled linear" one, linear in √β from √0.00085 to √0.012
(diffusers' `scaled_linear`); Nichol & Dhariwal 2021 (Improved DDPM) define the cosine schedule
(diffusers' `squaredcos_cap_v2`) through ᾱ directly:

    ᾱ(t) = f(t) / f(0),   f(t) = cos²( (t/T + s) / (1 + s) · π/2 ),   s = 0.008
    β_t  = min(1 − ᾱ(t) / ᾱ(t − 1), 0.999)

With α_t = 1 − β_t and ᾱ_t = ∏_{s≤t} α_s. Timesteps are 0-based in code: index t ∈ [0, T) holds β_{t+1}
of the papers, and the virtual index t = −1 has ᾱ = 1 (no noise). The tables are float64: the
samplers gather from them per sample and cast the resulting coefficients to the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch

# "custom": β given as a table (a diffusers `scheduler_config.json`: `trained_betas`, its own
# β range, `rescale_betas_zero_snr`; see `scheduler_config.py`); `create` builds the other three.
ScheduleKind = Literal["linear", "scaled_linear", "cosine", "custom"]


def linear_betas(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """β_t evenly spaced from β_start to β_end, scaled by 1000/T so that other T keep ᾱ_T alike."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(
    num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """β_t = (√β_start + (√β_end − √β_start) · t/(T − 1))², Stable Diffusion's schedule (unscaled in T,
    as in diffusers)."""
    root = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64)
    return root**2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """β_t = min(1 − ᾱ(t)/ᾱ(t−1), max_beta) with ᾱ(t) = f(t)/f(0), f the squared cosine above."""
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


@dataclass(frozen=True)
class NoiseSchedule:
    """β, α and ᾱ tables of one schedule. Build with `NoiseSchedule.create(kind, T)`.

    Attributes are float64 tensors of shape [T]; `alpha_bar_at(t)` also accepts t = −1 (ᾱ = 1).
    """

    kind: ScheduleKind
    betas: torch.Tensor  # [T]
    # [T] float32: β exactly as diffusers computes them in float32, for a schedule read from a
    # diffusers config (`scheduler_config.py`); the σ-space samplers' Karras levels are computed
    # on diffusers' float32 table for parity (`sigmas.diffusers_sigma_table`). None: β in float32.
    diffusers_betas: torch.Tensor | None = None

    @classmethod
    def create(cls, kind: ScheduleKind = "linear", num_timesteps: int = 1000) -> NoiseSchedule:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be ≥ 1, got {num_timesteps}")
        if kind == "linear":
            betas = linear_betas(num_timesteps)
        elif kind == "scaled_linear":
            betas = scaled_linear_betas(num_timesteps)
        elif kind == "cosine":
            betas = cosine_betas(num_timesteps)
        else:
            raise ValueError(
                f"unknown schedule {kind!r}; expected 'linear', 'scaled_linear' or 'cosine'"
            )
        return cls(kind=kind, betas=betas)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @cached_property
    def alphas(self) -> torch.Tensor:  # [T]
        return 1.0 - self.betas

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:  # [T]
        return torch.cumprod(self.alphas, dim=0)

    @cached_property
    def alphas_cumprod_padded(self) -> torch.Tensor:  # [T + 1]; index t + 1, so t = −1 → ᾱ = 1
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])

    def alpha_bar_at(self, t: torch.Tensor | int) -> torch.Tensor:
        """ᾱ_t for t ∈ [−1, T) (any shape); ᾱ_{−1} = 1."""
        t = torch.as_tensor(t, dtype=torch.long)
        if bool(((t < -1) | (t >= self.num_timesteps)).any()):
            raise IndexError(f"timestep out of range [-1, {self.num_timesteps})")
        return self.alphas_cumprod_padded[t + 1]

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t)."""
        a = self.alpha_bar_at(t)
        return a / (1.0 - a)

    def to_config(self) -> dict[str, object]:
        return {"kind": self.kind, "num_timesteps": self.num_timesteps}
