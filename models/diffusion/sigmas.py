"""Noise levels of the σ-space samplers (Euler, DPM-Solver++, UniPC): which σ each step visits.

Karras et al. 2022 (EDM) write the variance-preserving process x_t = α_t x_0 + σ_t ε (α_t = √ᾱ_t,
σ_t = √(1 − ᾱ_t)) in terms of its noise-to-signal ratio alone,

    σ(t) = σ_t / α_t = √((1 − ᾱ_t) / ᾱ_t),      x̃ = x / α_t = x_0 + σ ε,                 (EDM eq. 1)

so that ᾱ = 1 / (1 + σ²) and the half-log-SNR of DPM-Solver (Lu et al. 2022, §3.1) is λ = −log σ. A
plan of S steps is S network timesteps t_0 > … > t_{S−1} with their levels σ_0 > … > σ_{S−1}, and
σ_S = 0 (the clean image, diffusers' `final_sigmas_type="zero"`).

- Euler samplers: σ_i is σ(t) linearly interpolated at fractional t (``linspace`` spacing);
- multistep solvers: σ_i = σ(t_i) at the integer timesteps of `timesteps.multistep_timesteps`;
- Karras sigmas (EDM eq. 5, ρ = 7): σ_i = (σ_max^{1/ρ} + i/(S − 1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, and
  the network timestep is σ's position in the log-σ table (linear interpolation). The range is the
  whole schedule's for the multistep solvers and the spaced levels' for Euler, as in diffusers.

Each step has an integer timestep t_i (the plan's bookkeeping, classifier guidance) and the
timestep the network is called with: for Euler its exact, possibly fractional t (``linspace``
points, Karras levels; float32, as diffusers' `EulerDiscreteScheduler.timesteps`), which a model
served from a diffusers config receives (`SamplerSettings.convention`, a float32 timestep tensor);
ddserve's own networks keep their integer contract and get t_i, the nearest integer. The
multistep solvers' Karras timesteps are integers: rounded, except in diffusers'
DPMSolverMultistepScheduler with `beta_schedule="squaredcos_cap_v2"`, which keeps the fractional t
and casts it to int64, i.e. floors it (`truncate`; UniPC rounds there too). Either way the update
uses the exact σ.

For the "diffusers" convention the Karras levels and their timesteps are computed from diffusers'
own σ table (`diffusers_sigma_table`: ᾱ as a float32 cumulative product, log σ in float32), because
the timesteps depend on it below the unit: the first Karras level is σ(T − 1) itself, at t = T − 1
exactly in float64, but at 998.99998 of 1000 in diffusers' float32 logs, which its squaredcos
truncation turns into 998. So the timesteps are diffusers' exactly (integers equal, Euler's
fractional ones equal in float32) and the Karras σ's within 2e-6 of diffusers'. The other levels
(spaced timesteps) keep ddserve's float64 table, whose σ's near t = 0 differ from diffusers'
float32 ones by up to 3e-4 relative (ᾱ ≈ 1 there); ddserve's own models use it for Karras too.

Duplicated timesteps: Karras levels near σ_max are closer than one unit of t, so the integer
timesteps of consecutive steps may be equal (999, 999, 998, …) while their σ's differ. ddserve walks
the plan one level per step and calls the network at each step's t, whatever its neighbours.
diffusers' `step` instead looks the first timestep up in its list and, finding it twice, starts at
the second entry (`index_for_timestep`, meant for img2img), so it skips σ_0 and runs off its σ list:
IndexError (DPM-Solver++), AssertionError (UniPC). This is the case of squaredcos_cap_v2 + Karras
for DPM-Solver++ at S ≥ 4 steps (its truncated plan starts 998, 998) and for UniPC when its rounded
plan starts 999, 999 (S = 7, 20, 50 of 1000; not S = 5); never for linear / scaled_linear (S ≤
1000), whose top levels are further apart. There ddserve serves diffusers' plan —
the same timesteps and σ's — stepped in order, what diffusers' own loop would do without the
lookup; no diffusers run exists to compare with.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np
import torch

from models.diffusion.schedule import NoiseSchedule
from models.diffusion.timesteps import TimestepSpacing, euler_timesteps, multistep_timesteps

KARRAS_RHO = 7.0


@dataclass(frozen=True)
class NoiseLevels:
    """The σ-plan of one sample: S network timesteps and S + 1 levels (the last one 0)."""

    timesteps: tuple[int, ...]  # [S] t_i, the nearest integers (ddserve's networks get these)
    sigmas: tuple[float, ...]  # [S + 1] σ_0 > … > σ_S = 0
    # [S] the exact timesteps diffusers calls the network with (Euler: fractional, float32)
    network_timesteps: tuple[float, ...] = ()

    def alpha_bar(self, i: int) -> float:
        """ᾱ at level i: 1 / (1 + σ_i²)."""
        return 1.0 / (1.0 + self.sigmas[i] ** 2)


# ᾱ taken for a timestep whose ᾱ is 0 (zero terminal SNR, `rescale_betas_zero_snr`): σ = 4096
# instead of ∞, as diffusers' σ-space schedulers set `alphas_cumprod[-1] = 2**-24`.
ZERO_SNR_ALPHA_BAR = 2.0**-24


def sigma_table(schedule: NoiseSchedule) -> list[float]:
    """σ(t) for t = 0..T − 1, ascending in t (ᾱ = 0 read as `ZERO_SNR_ALPHA_BAR`)."""
    table = schedule.alphas_cumprod.tolist()
    return [math.sqrt((1.0 - a) / a) for a in (a if a > 0 else ZERO_SNR_ALPHA_BAR for a in table)]


def diffusers_sigma_table(schedule: NoiseSchedule) -> tuple[list[float], list[float]]:
    """σ(t) and log σ(t) as diffusers' σ-space schedulers compute them: ᾱ = cumprod(1 − β) in
    float32 from diffusers' own float32 β (`NoiseSchedule.diffusers_betas`, else β rounded to
    float32), σ = √((1 − ᾱ)/ᾱ) and log σ in float32, returned as Python floats."""
    betas = schedule.diffusers_betas
    betas = schedule.betas.to(torch.float32) if betas is None else betas
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if float(alphas_cumprod[-1]) == 0.0:  # zero terminal SNR, as `sigma_table`
        alphas_cumprod[-1] = ZERO_SNR_ALPHA_BAR
    # torch's float32 `** 0.5`, then numpy's float32 log: diffusers' expressions, to the bit
    sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
    return sigmas.tolist(), np.log(sigmas).tolist()


def interpolate(table: list[float], t: float) -> float:
    """table at fractional index t, linearly between its neighbours."""
    low = min(math.floor(t), len(table) - 1)
    if low >= len(table) - 1:
        return table[-1]
    w = t - low
    return (1.0 - w) * table[low] + w * table[low + 1]


def sigma_to_timestep(sigma: float, log_table: list[float]) -> float:
    """The fractional t whose log σ(t) is log σ, interpolating in log σ (clamped to [0, T − 1]);
    in diffusers' arithmetic (`_sigma_to_t`), on which a truncated timestep depends."""
    if len(log_table) < 2:  # a one-step schedule: there is only t = 0
        return 0.0
    log_sigma = float(np.log(np.maximum(np.float64(sigma), 1e-10)))  # numpy's log, as diffusers
    k = bisect.bisect_right(log_table, log_sigma) - 1
    k = min(max(k, 0), len(log_table) - 2)
    low, high = log_table[k], log_table[k + 1]
    w = min(max((low - log_sigma) / (low - high), 0.0), 1.0)
    return (1.0 - w) * k + w * (k + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> list[float]:
    """EDM eq. 5: S levels from σ_max to σ_min, evenly spaced in σ^{1/ρ}."""
    lo, hi = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    ramp = np.linspace(0, 1, num_steps)  # numpy, as diffusers: its pow may differ by an ulp
    return ((hi + ramp * (lo - hi)) ** KARRAS_RHO).tolist()


def noise_levels(
    schedule: NoiseSchedule,
    num_steps: int,
    spacing: TimestepSpacing,
    *,
    euler: bool,
    karras: bool,
    steps_offset: int = 0,
    diffusers_table: bool = False,
    truncate: bool = False,
) -> NoiseLevels:
    """The σ-plan of a σ-space sampler: Euler's convention (`euler`) or the multistep solvers'.

    `diffusers_table`: Karras levels from `diffusers_sigma_table` (the "diffusers" convention);
    `truncate`: the multistep solvers' Karras timesteps floored, not rounded (module docstring)."""
    table = sigma_table(schedule)
    log_table = [math.log(s) for s in table]
    karras_table, karras_log_table = (
        diffusers_sigma_table(schedule) if karras and diffusers_table else (table, log_table)
    )
    T = len(table)
    if euler:
        times = euler_timesteps(T, num_steps, spacing, steps_offset)
        sigmas = [interpolate(table, t) for t in times]
        if karras:
            ends = [interpolate(karras_table, t) for t in (times[-1], times[0])]
            sigmas = karras_sigmas(ends[0], ends[1], num_steps)
            times = [sigma_to_timestep(s, karras_log_table) for s in sigmas]
        network = [float(np.float32(t)) for t in times]  # diffusers' float32 `timesteps`
    elif karras:  # the whole schedule's range; the spacing plays no part
        sigmas = karras_sigmas(karras_table[0], karras_table[-1], num_steps)
        times = [sigma_to_timestep(s, karras_log_table) for s in sigmas]
        network = [float(math.floor(t) if truncate else round(t)) for t in times]
        times = network  # the integer timesteps are the network's
    else:
        steps = multistep_timesteps(T, num_steps, spacing, steps_offset)
        times = [float(t) for t in steps]
        sigmas = [table[t] for t in steps]
        network = times
    return NoiseLevels(tuple(round(t) for t in times), (*sigmas, 0.0), tuple(network))
