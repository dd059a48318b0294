"""The σ-space samplers as per-step coefficient rows of `steps.StepCoefficients`, computed in float64.

Notation (see `sigmas.py`): level i has σ_i (noise-to-signal), α_i = 1/√(1 + σ_i²), s_i = σ_i α_i
(the VP noise scale), λ_i = −log σ_i; h_i = λ_{i+1} − λ_i; m_i is the data prediction x̂_0 of step i.
All updates are written in the VP variable x = α x̃ that the network sees.

- **Euler** (Karras et al. 2022, Algorithm 1 without churn): x̃_{i+1} = x̃_i + (σ_{i+1} − σ_i) ε̂ with
  ε̂ = (x̃_i − m_i)/σ_i, i.e. x_{i+1} = α_{i+1} m_i + s_{i+1} ε̂ — exactly DDIM (η = 0) between the
  two levels, so its row is `step_coefficients("ddim", ᾱ_i, ᾱ_{i+1})`.
- **Euler ancestral** (k-diffusion's `sample_euler_ancestral`): σ_up² = σ_{i+1}² (σ_i² − σ_{i+1}²)/σ_i²,
  σ_down² = σ_{i+1}² − σ_up², x̃_{i+1} = m_i + σ_down ε̂ + σ_up z. In VP form the noise variance
  α_{i+1}² σ_up² equals DDIM's η = 1 variance (1 − ᾱ_{i+1})/(1 − ᾱ_i) · (1 − ᾱ_i/ᾱ_{i+1}), so the row is
  DDIM with η = 1.
- **DPM-Solver++(2M)** (Lu et al. 2022, "DPM-Solver++", Algorithm 2, data prediction, the "midpoint"
  form of diffusers): with r_i = h_{i−1}/h_i and D_i = (1 + 1/(2 r_i)) m_i − 1/(2 r_i) m_{i−1},
      x_{i+1} = (s_{i+1}/s_i) x_i − α_{i+1} (e^{−h_i} − 1) D_i                                 (eq. 10)
  first order (D_i = m_i, i.e. DDIM) on the first step (warm-up) and the last (the lower-order-final
  trick: the step into σ = 0 is first order, as diffusers does for `final_sigmas_type="zero"`; it
  is also what keeps few-step sampling stable).
- **DPM-Solver++(2M) SDE** (Lu et al. 2022, §5 / diffusers' `sde-dpmsolver++`):
      x_{i+1} = (s_{i+1}/s_i) e^{−h_i} x_i + α_{i+1} (1 − e^{−2h_i}) D_i + s_{i+1} √(1 − e^{−2h_i}) z,
  with the same D_i, warm-up and final step; z comes from the sample's own noise stream.
- **UniPC-bh2** (Zhao et al. 2023, Algorithms 1–2, B(h) = e^{−h} − 1, data prediction):
  the predictor UniP-p from the corrected x^c_i,
      x_{i+1} = (s_{i+1}/s_i) x^c_i − α_{i+1} φ_1 m_i − α_{i+1} B(h_i) ρ^p (m_{i−1} − m_i)/r_i     (eq. 5)
  (φ_1 = e^{−h_i} − 1, r_i = (λ_{i−1} − λ_i)/h_i, ρ^p = ½ at order 2, no last term at order 1), and the
  corrector UniC at the start of step i ≥ 1, from the previous x^c_{i−1} and the new m_i at the same
  order p_{i−1} as step i − 1's predictor:
      x^c_i = (s_i/s_{i−1}) x^c_{i−1} − α_i φ_1 m_{i−1} − α_i B(h) (ρ_1 (m_{i−2} − m_{i−1})/r + ρ_c (m_i − m_{i−1}))
  (eq. 8; h = h_{i−1}, r = (λ_{i−2} − λ_{i−1})/h, and ρ from the 2×2 system R ρ = b of the paper's
  Algorithm 2; order 1: ρ_c = ½, no ρ_1 term). The predictor's order is min(solver_order, i + 1,
  S − i): warm-up, and first order on the last step (lower-order-final).

Every one of these is linear in x_i, x^c_{i−1}, m_i, m_{i−1}, m_{i−2} and z with coefficients that
depend on the plan alone, hence one row per step, shared by every sample with the same settings.
"""

from __future__ import annotations

import math

from models.diffusion.sigmas import NoiseLevels
from models.diffusion.steps import StepCoefficients, step_coefficients


def _alpha_s(sigma: float) -> tuple[float, float]:
    """(α, s) of level σ: α = 1/√(1 + σ²), s = σ α."""
    alpha = 1.0 / math.sqrt(1.0 + sigma**2)
    return alpha, sigma * alpha


def _lam(sigma: float) -> float:
    """λ = log(α/s) = −log σ; +∞ at σ = 0."""
    return -math.log(sigma) if sigma > 0 else math.inf


def _base(
    levels: NoiseLevels, i: int, classifier_scale: float, **fields: float
) -> StepCoefficients:
    """A row with step i's ᾱ columns (for x̂_0, ε, inpainting and classifier guidance) and `fields`."""
    a_t, a_s = levels.alpha_bar(i), levels.alpha_bar(i + 1)
    row = dict(
        sqrt_alpha_bar_t=math.sqrt(a_t),
        sqrt_one_minus_alpha_bar_t=math.sqrt(1.0 - a_t),
        c_x0=0.0,
        c_eps=0.0,
        sigma=0.0,
        c_mean_grad=0.0,
        c_eps_grad=classifier_scale * math.sqrt(1.0 - a_t),
        sqrt_alpha_bar_s=math.sqrt(a_s),
        sqrt_one_minus_alpha_bar_s=math.sqrt(1.0 - a_s),
    )
    row.update(fields)
    return StepCoefficients(**row)


def euler_rows(
    levels: NoiseLevels, *, ancestral: bool, classifier_scale: float = 0.0
) -> list[StepCoefficients]:
    """Euler (DDIM η = 0) or Euler ancestral (DDIM η = 1) between consecutive levels."""
    return [
        step_coefficients(
            levels.alpha_bar(i),
            levels.alpha_bar(i + 1),
            sampler="ddim",
            eta=1.0 if ancestral else 0.0,
            classifier_scale=classifier_scale,
        )
        for i in range(len(levels.timesteps))
    ]


def dpmpp_2m_rows(
    levels: NoiseLevels,
    *,
    order: int,
    sde: bool,
    classifier_scale: float = 0.0,
    start: int = 0,
) -> list[StepCoefficients]:
    """DPM-Solver++(2M), or its SDE variant, per step (module docstring), for the steps
    start, …, S − 1: a sample that joins at step `start` (image-to-image) has no history there, so
    its warm-up (first order) is that step, as in diffusers after `set_begin_index(start)`."""
    n = len(levels.timesteps)
    sig = levels.sigmas
    rows = []
    for i in range(start, n):
        alpha_next, s_next = _alpha_s(sig[i + 1])
        _, s_now = _alpha_s(sig[i])
        h = _lam(sig[i + 1]) - _lam(sig[i])
        if sde:
            p_x = s_next / s_now * math.exp(-h)
            a = -alpha_next * math.expm1(-2.0 * h)  # α_{i+1} (1 − e^{−2h})
            noise = s_next * math.sqrt(-math.expm1(-2.0 * h))
        else:
            p_x = s_next / s_now
            a = -alpha_next * math.expm1(-h)  # α_{i+1} (1 − e^{−h})
            noise = 0.0
        c_x0, p_h1 = a, 0.0
        if order == 2 and start < i < n - 1:
            r = (_lam(sig[i]) - _lam(sig[i - 1])) / h
            c_x0, p_h1 = a * (1.0 + 0.5 / r), -a * 0.5 / r
        rows.append(_base(levels, i, classifier_scale, c_x0=c_x0, sigma=noise, p_x=p_x, p_h1=p_h1))
    return rows


def _unic_rhos(h: float, r: float) -> tuple[float, float]:
    """UniC-bh2's ρ at order 2: the solution of [[1, 1], [r, 1]] ρ = b (Zhao et al. 2023, Alg. 2),
    b_k = k! φ_{k+1}(−h) (−h)^… / B(h) built by the φ recursion φ_{k+1} = (φ_k − 1/k!)/(−h)."""
    hh = -h
    b_h = math.expm1(hh)
    phi = math.expm1(hh) / hh - 1.0
    b1 = phi / b_h
    phi = phi / hh - 0.5
    b2 = phi * 2.0 / b_h
    rho_1 = (b1 - b2) / (1.0 - r)
    return rho_1, b1 - rho_1


def unipc_rows(
    levels: NoiseLevels, *, order: int, classifier_scale: float = 0.0, start: int = 0
) -> list[StepCoefficients]:
    """UniPC-bh2 per step: the corrector of step i (for i ≥ 1) and the predictor (module docstring),
    for the steps start, …, S − 1: a sample joining at `start` (image-to-image) warms up there and
    has no corrector on that step (no previous sample), as in diffusers after `set_begin_index`."""
    n = len(levels.timesteps)
    sig = levels.sigmas
    lam = [_lam(s) for s in sig]
    orders = {i: min(order, i - start + 1, n - i) for i in range(start, n)}
    rows = []
    for i in range(start, n):
        corrector = dict(k_x=1.0, k_last=0.0, k_x0=0.0, k_h1=0.0, k_h2=0.0)
        if i > start:
            alpha_i, s_i = _alpha_s(sig[i])
            _, s_prev = _alpha_s(sig[i - 1])
            h = lam[i] - lam[i - 1]
            b_h = math.expm1(-h)  # φ_1 = B(h) for bh2
            if orders[i - 1] == 1:
                rho_1, rho_c, r = 0.0, 0.5, 1.0
            else:
                r = (lam[i - 2] - lam[i - 1]) / h
                rho_1, rho_c = _unic_rhos(h, r)
            corrector = dict(
                k_x=0.0,
                k_last=s_i / s_prev,
                k_x0=-alpha_i * b_h * rho_c,
                k_h1=-alpha_i * b_h + alpha_i * b_h * (rho_1 / r + rho_c),
                k_h2=-alpha_i * b_h * rho_1 / r,
            )
        alpha_next, s_next = _alpha_s(sig[i + 1])
        _, s_now = _alpha_s(sig[i])
        h = lam[i + 1] - lam[i]
        b_h = math.expm1(-h)
        c_x0, p_h1 = -alpha_next * b_h, 0.0
        if orders[i] == 2:
            r = (lam[i - 1] - lam[i]) / h
            c_x0, p_h1 = c_x0 + alpha_next * b_h * 0.5 / r, -alpha_next * b_h * 0.5 / r
        rows.append(
            _base(
                levels,
                i,
                classifier_scale,
                c_x0=c_x0,
                p_x=s_next / s_now,
                p_h1=p_h1,
                **corrector,
            )
        )
    return rows
