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

The σ-space samplers (see `sigmas.py` and `solvers.py`) use the same row. Euler and Euler ancestral
are this update on their own levels; the multistep solvers (DPM-Solver++, UniPC) add a per-sample
history — the data predictions m_{i−1}, m_{i−2} of the sample's previous steps and the sample x_c it
last stepped from — through two more linear maps (`solver_update`), with coefficients that are zero
for the samplers without history:

    x_c = k_x · x_t + k_last · x_last + k_x0 · x̂_0 + k_h1 · m_{i−1} + k_h2 · m_{i−2}   (UniPC corrector)
    x_s = [the update above] + p_x · x_c + p_h1 · m_{i−1}                            (multistep)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

SamplerName = Literal[
    "ddpm", "ddim", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "unipc"
]
SAMPLER_NAMES: tuple[str, ...] = (
    "ddpm",
    "ddim",
    "euler",
    "euler_ancestral",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "unipc",
)
# Samplers that work on σ-levels (`sigmas.py`) rather than the DDIM timestep sub-sequence.
SIGMA_SAMPLERS: tuple[str, ...] = ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "unipc")
# Samplers that keep a history of model outputs per sample (`solvers.py`).
MULTISTEP_SAMPLERS: tuple[str, ...] = ("dpmpp_2m", "dpmpp_2m_sde", "unipc")
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
    # Multistep solvers (zero for the others, and k_x = 1): see the module docstring.
    "k_x",
    "k_last",
    "k_x0",
    "k_h1",
    "k_h2",
    "p_x",
    "p_h1",
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
    k_x: float = 1.0
    k_last: float = 0.0
    k_x0: float = 0.0
    k_h1: float = 0.0
    k_h2: float = 0.0
    p_x: float = 0.0
    p_h1: float = 0.0

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
        raise ValueError(f"step_coefficients covers 'ddpm' and 'ddim', not {sampler!r}")
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


def upper_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """`torch.quantile(values, q, dim=1)` (linear interpolation) of [R, N] values, bit for bit, from
    the N − ⌊q(N − 1)⌋ largest values of each row (`torch.topk`) rather than a full sort: about 30×
    faster at diffusers' q = 0.995 over 4096 values, where the sort cost 6× a whole DDIM step of 64
    samples. The rank q(N − 1) and its fraction are computed in the values' dtype, as
    torch.quantile does."""
    n = values.shape[1]
    rank = torch.tensor(q, dtype=values.dtype) * (n - 1)
    below = int(rank.floor())
    weight = rank - below
    k = n - below  # the order statistics `below` .. N − 1, largest first
    top = torch.topk(values, k, dim=1).values  # [R, k]
    low = top[:, k - 1]
    high = top[:, k - 2] if k >= 2 else low
    return torch.lerp(low, high, weight.to(values.device))


@dataclass(frozen=True)
class DynamicThreshold:
    """Dynamic thresholding of x̂_0 for some rows of a batch (Saharia et al. 2022, "Imagen", §2.3):
    with s the `ratio`-quantile of |x̂_0| over the row's pixels, clamped to [1, `max_value`],

        x̂_0 ← clamp(x̂_0, −s, s) / s,

    which pulls saturated pixels inwards instead of clipping them (s = 1 is plain clipping to
    [−1, 1]). diffusers' `thresholding=True` with `dynamic_thresholding_ratio` and
    `sample_max_value`."""

    rows: torch.Tensor  # [R] long: the rows it applies to
    ratio: torch.Tensor  # [R] the quantile p ∈ (0, 1]
    max_value: torch.Tensor  # [R] the upper bound of s

    def apply(self, x0: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] → [B, C, H, W]
        picked = x0.index_select(0, self.rows)  # [R, C, H, W]
        flat = picked.reshape(len(self.rows), -1)
        if flat.dtype not in (torch.float32, torch.float64):  # torch.quantile needs float32/64
            flat = flat.float()
        magnitude = flat.abs()
        s = torch.empty(len(self.rows), dtype=flat.dtype, device=flat.device)  # [R]
        for ratio in self.ratio.unique().tolist():  # one quantile call per distinct ratio
            same = (self.ratio == ratio).to(magnitude.device)
            s[same] = upper_quantile(magnitude[same], ratio)
        s = torch.minimum(s.clamp(min=1.0), self.max_value.to(s))
        # clamp(min=1, max=m) as torch.clamp: m wins when m < 1.
        s = s.unsqueeze(1)  # [R, 1]
        bounded = (torch.minimum(torch.maximum(flat, -s), s) / s).reshape(picked.shape)
        return x0.index_copy(0, self.rows, bounded.to(x0.dtype))


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
    x0: torch.Tensor | None = None,  # [B, C, H, W] x̂_0 straight from a v / x_0 prediction, or None
    clip_range: torch.Tensor | None = None,  # [B] the clamp's bound per row (None: 1 for all)
    keep_eps: torch.Tensor | None = None,  # [B] bool: bounded rows that keep the network's ε
    threshold: DynamicThreshold | None = None,  # rows whose x̂_0 is thresholded (not clipped)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_s for every row, the prediction x̂_0 it went through and the ε it used.

    Pure: no state, no randomness. Without `x0`, x̂_0 is computed from ε; a given `x0` avoids the
    cancellation of (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t where ᾱ_t is tiny (v-prediction at high noise).
    A clipped or thresholded row uses the ε consistent with its bounded x̂_0, unless `keep_eps`
    marks it (diffusers' DDIMScheduler with `use_clipped_model_output=False`); a thresholded row is
    not clipped as well (diffusers: thresholding, else clipping)."""
    n = x_t.dim()
    sqrt_a = _col(coefficients, "sqrt_alpha_bar_t", n)
    sqrt_1ma = _col(coefficients, "sqrt_one_minus_alpha_bar_t", n)
    if grad is not None:
        shift = _col(coefficients, "c_eps_grad", n) * grad
        eps = eps - shift
        if x0 is not None:  # the x̂_0 of the shifted ε; rows without guidance add exactly 0
            x0 = x0 + sqrt_1ma / sqrt_a * shift
    if x0 is None:
        x0 = (x_t - sqrt_1ma * eps) / sqrt_a
    bounded = None  # [B, 1, …] bool: the rows whose x̂_0 is clipped or thresholded
    if clip_denoised is not None and bool(clip_denoised.any()):
        bounded = clip_denoised.reshape(-1, *([1] * (n - 1)))
        if clip_range is None:
            clamped = x0.clamp(-1.0, 1.0)
        else:
            bound = clip_range.reshape(-1, *([1] * (n - 1))).to(x0)
            clamped = torch.minimum(torch.maximum(x0, -bound), bound)
        x0 = torch.where(bounded, clamped, x0)
    if threshold is not None:
        x0 = threshold.apply(x0)
        rows = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
        rows[threshold.rows] = True
        rows = rows.reshape(-1, *([1] * (n - 1)))
        bounded = rows if bounded is None else bounded | rows
    if bounded is not None:
        # The ε consistent with the bounded x̂_0 (ddserve's DDIM, and DDPM's posterior mean).
        rederive = bounded if keep_eps is None else bounded & ~keep_eps.reshape(bounded.shape)
        eps = torch.where(rederive, (x_t - sqrt_a * x0) / sqrt_1ma, eps)
    x_s = _col(coefficients, "c_x0", n) * x0 + _col(coefficients, "c_eps", n) * eps
    if noise is not None:
        x_s = x_s + _col(coefficients, "sigma", n) * noise
    if grad is not None:
        x_s = x_s + _col(coefficients, "c_mean_grad", n) * grad
    return x_s, x0, eps


def solver_update(
    x_t: torch.Tensor,  # [B, C, H, W] the rows' x_t before the step
    x_s: torch.Tensor,  # [B, C, H, W] `reverse_step`'s result
    x0: torch.Tensor,  # [B, C, H, W] this step's data prediction m_i
    coefficients: torch.Tensor,  # [B, K]
    history: torch.Tensor,  # [3, B, C, H, W]: x_last, m_{i−1}, m_{i−2}
) -> tuple[torch.Tensor, torch.Tensor]:
    """The multistep terms (module docstring): x_s with them, and the new history [3, B, C, H, W].

    For a row without history (k_x = 1, the rest 0) x_s is unchanged bit for bit, so a sample's result
    does not depend on whether its batch holds multistep samples."""
    n = x_t.dim()
    last, h1, h2 = history[0], history[1], history[2]
    x_c = (
        _col(coefficients, "k_x", n) * x_t
        + _col(coefficients, "k_last", n) * last
        + _col(coefficients, "k_x0", n) * x0
        + _col(coefficients, "k_h1", n) * h1
        + _col(coefficients, "k_h2", n) * h2
    )
    x_s = x_s + (_col(coefficients, "p_x", n) * x_c + _col(coefficients, "p_h1", n) * h1)
    return x_s, torch.stack([x_c, x0, h1])


def forward_jump(
    x_s: torch.Tensor, alpha_bar_s: float, alpha_bar_t: float, noise: torch.Tensor
) -> torch.Tensor:
    """x_t ~ q(x_t | x_s) = N(√(ᾱ_t/ᾱ_s) x_s, (1 − ᾱ_t/ᾱ_s) I) for t > s: RePaint's jump back."""
    ratio = alpha_bar_t / alpha_bar_s
    return math.sqrt(ratio) * x_s + math.sqrt(1.0 - ratio) * noise
