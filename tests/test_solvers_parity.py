"""Parity of the σ-space samplers with diffusers' schedulers (no downloads; diffusers is a dev dependency).

Both sides are driven by the same deterministic fake network `fake_network` — nonlinear in x and
dependent on t, so that the multistep histories matter — and start from the same x_T:

- ddserve: `sample(...)` with `SamplerSettings(sampler, S, timestep_spacing=..., ...)` on
  `NoiseSchedule.create(kind, 1000)`;
- diffusers, configured with `num_train_timesteps=1000`, the same `beta_schedule` (linear 1e-4…0.02,
  scaled_linear 0.00085…0.012, `squaredcos_cap_v2`), `prediction_type` ("epsilon" / "v_prediction" /
  "sample"), `timestep_spacing`, `steps_offset=0` and otherwise its defaults:
  - dpmpp_2m: `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`;
  - dpmpp_2m_sde: the same with `algorithm_type="sde-dpmsolver++"`;
  - unipc: `UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, solver_order=2)`;
  - euler: `EulerDiscreteScheduler()`; euler_ancestral: `EulerAncestralDiscreteScheduler()`;
  - `use_karras_sigmas=True` where tested (not EulerAncestral, which lacks it).
  The multistep schedulers work on x itself (`init_noise_sigma = 1`); the Euler ones on x̃ = x/α, so
  they start from x_T · √(1 + σ_0²) and call the network on `scale_model_input(x̃, t)` = x. Both end
  at σ = 0, where x̃ = x.

Same noise: ddserve draws a stochastic step's z from the sample's own generator
`noise.sample_generator(seed, i)` (x_T is given, so nothing else is drawn from it). diffusers is
handed a list of fresh generators `sample_generator(seed, i)`, one per row, and `randn_tensor` then
draws row i's noise of shape [1, C, H, W] from generator i at every step — the same numbers in the
same order. (diffusers also draws on its last step, where the noise has weight 0: nothing follows.)

ddserve's own convention (`SamplerSettings`' default, tested here) calls its network with integer
timesteps (the "diffusers" convention's fractional ones: `test_scheduler_config_solvers.py`); where diffusers' Euler uses fractional ones
(``linspace`` spacing, Karras levels) the fake network rounds t itself, so both sides see the same
function. Tolerance: max |difference| ≤ 1e-4 on the final sample.
"""

from __future__ import annotations

import pytest
import torch

from models.diffusion.noise import sample_generator
from models.diffusion.sampler import SamplerSettings, sample
from models.diffusion.schedule import NoiseSchedule

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 8, 8)
SEED = 17
TOLERANCE = 1e-4
SCHEDULES = {  # ddserve kind → diffusers config
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction", "sample": "sample"}


ALPHA_BAR = {kind: NoiseSchedule.create(kind, 1000).alphas_cumprod for kind in SCHEDULES}


def fake_network(schedule: str, prediction: str):
    """A deterministic stand-in for a trained denoiser of `schedule`: the exact ε of data
    N(0.3, 0.5²) plus a term nonlinear in x and varying with t (so that the multistep histories
    matter), expressed as ε, v or x_0. t is rounded to an integer (see the module docstring).

    The extra term is scaled by √ᾱ_t so that x̂_0 = (x_t − √(1 − ᾱ_t) ε)/√ᾱ_t stays bounded, as with
    a trained model: otherwise, at the cosine schedule's t = 999 (√ᾱ ≈ 5e-5), x̂_0 would be ~10³ and
    the 1e-5 relative difference of diffusers' float32 ᾱ table from ours (float64) alone would
    exceed the tolerance."""
    alpha_bar = ALPHA_BAR[schedule]

    def network(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        index = torch.round(t.to(torch.float64)).long().clamp(0, 999)
        a = alpha_bar[index].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        sqrt_a, sqrt_1ma = a.sqrt(), (1 - a).sqrt()
        eps = sqrt_1ma * (x - sqrt_a * 0.3) / (a * 0.25 + 1 - a)
        wobble = torch.tanh(2 * x) * torch.cos(index.to(x.dtype).reshape(a.shape) / 150)
        eps = eps + 0.1 * sqrt_a * wobble
        x0 = (x - sqrt_1ma * eps) / sqrt_a
        if prediction == "epsilon":
            return eps
        if prediction == "v":
            return sqrt_a * eps - sqrt_1ma * x0
        return x0

    return network


def _scheduler(sampler: str, schedule: str, prediction: str, spacing: str, karras: bool):
    config = dict(
        num_train_timesteps=1000,
        prediction_type=PREDICTIONS[prediction],
        timestep_spacing=spacing,
        steps_offset=0,
        **SCHEDULES[schedule],
    )
    if karras:
        config["use_karras_sigmas"] = True
    if sampler == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **config)
    if sampler == "dpmpp_2m_sde":
        return diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", **config)
    if sampler == "unipc":
        return diffusers.UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, **config)
    if sampler == "euler":
        return diffusers.EulerDiscreteScheduler(**config)
    return diffusers.EulerAncestralDiscreteScheduler(**config)


def _diffusers_run(
    sampler: str, schedule: str, prediction: str, spacing: str, karras: bool, steps: int, x_T
) -> torch.Tensor:
    scheduler = _scheduler(sampler, schedule, prediction, spacing, karras)
    scheduler.set_timesteps(steps)
    network = fake_network(schedule, prediction)
    generators = [sample_generator(SEED, i) for i in range(SHAPE[0])]
    euler = sampler.startswith("euler")
    x = x_T.clone()
    if euler:
        x = x * (1.0 + scheduler.sigmas[0].double() ** 2).sqrt().float()
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t) if euler else x
        out = network(model_in, t.repeat(SHAPE[0]), None)
        kwargs = {"generator": generators} if sampler in ("euler_ancestral", "dpmpp_2m_sde") else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def _ours(
    sampler: str, schedule: str, prediction: str, spacing: str, karras: bool, steps: int, x_T
) -> torch.Tensor:
    settings = SamplerSettings(
        sampler,  # type: ignore[arg-type]
        steps,
        timestep_spacing=spacing,  # type: ignore[arg-type]
        use_karras_sigmas=karras,
    )
    return sample(
        fake_network(schedule, prediction),
        NoiseSchedule.create(schedule, 1000),  # type: ignore[arg-type]
        x_T,
        settings,
        prediction_type=prediction,  # type: ignore[arg-type]
        generators=[sample_generator(SEED, i) for i in range(SHAPE[0])],
    )


def _check(sampler, schedule, prediction, spacing, karras, steps, tolerance=TOLERANCE) -> None:
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    theirs = _diffusers_run(sampler, schedule, prediction, spacing, karras, steps, x_T)
    ours = _ours(sampler, schedule, prediction, spacing, karras, steps, x_T)
    assert torch.isfinite(ours).all()
    difference = (ours - theirs).abs().max().item()
    assert difference <= tolerance, difference


SAMPLERS = ("dpmpp_2m", "dpmpp_2m_sde", "unipc", "euler", "euler_ancestral")


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_matches_diffusers(sampler: str, schedule: str, prediction: str) -> None:
    """Every solver × schedule × ε/v, at 5, 10, 20 and 25 steps, with the classes' default spacing
    in diffusers (``linspace``) and SD's ``leading`` alternately (to keep the matrix small); the
    cosine schedule with ``leading`` only (see `test_cosine_from_the_last_timestep`)."""
    for steps, spacing in ((5, "linspace"), (10, "leading"), (20, "linspace"), (25, "leading")):
        _check(
            sampler,
            schedule,
            prediction,
            "leading" if schedule == "cosine" else spacing,
            False,
            steps,
        )


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cosine_from_the_last_timestep(sampler: str) -> None:
    """The cosine schedule's t = 999 has ᾱ ≈ 2.4e-9: in float32 √(1 − ᾱ) rounds to 1 and
    x̂_0 = (x − √(1 − ᾱ) ε)/√ᾱ amplifies the rounding of x − ε by 1/√ᾱ ≈ 2·10⁴, in diffusers as in
    ddserve (diffusers' float32 β table alone moves ᾱ_999 by 1.3e-5 relative). Plans that start
    there (``linspace``, ``trailing``) agree to the float32 conditioning of that first step: 5e-3."""
    _check(sampler, "cosine", "epsilon", "linspace", False, 5, tolerance=5e-3)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [5, 20])
def test_trailing_spacing_matches_diffusers(sampler: str, steps: int) -> None:
    _check(sampler, "scaled_linear", "epsilon", "trailing", False, steps)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "unipc", "euler"])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_karras_sigmas_match_diffusers(sampler: str, schedule: str) -> None:
    """Karras levels (ρ = 7) at 10 and 25 steps. Not with the cosine schedule: there diffusers'
    multistep schedulers truncate the Karras timesteps instead of rounding them."""
    for steps in (10, 25):
        _check(sampler, schedule, "v" if steps == 10 else "epsilon", "leading", True, steps)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "unipc", "euler"])
def test_x0_prediction_matches_diffusers(sampler: str) -> None:
    """The "sample" (x_0) prediction type (EulerAncestralDiscreteScheduler does not implement it;
    ddserve's euler_ancestral converts it in the same code as euler)."""
    _check(sampler, "linear", "sample", "leading", False, 10)


def test_timestep_conventions_match_each_scheduler_class() -> None:
    """DDIM lays S points, the multistep solvers S + 1 less the last, Euler S fractional ones."""
    from models.diffusion.timesteps import euler_timesteps, multistep_timesteps, timestep_sequence

    for spacing in ("leading", "trailing", "linspace"):
        for steps in (1, 7, 10, 25, 50, 333):
            ddim = diffusers.DDIMScheduler(timestep_spacing=spacing)
            ddim.set_timesteps(steps)
            assert ddim.timesteps.tolist() == timestep_sequence(1000, steps, spacing)
            for cls in (diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler):
                multistep = cls(timestep_spacing=spacing)
                multistep.set_timesteps(steps)
                assert multistep.timesteps.tolist() == multistep_timesteps(1000, steps, spacing)
            euler = diffusers.EulerDiscreteScheduler(timestep_spacing=spacing)
            euler.set_timesteps(steps)
            assert euler.timesteps.tolist() == pytest.approx(
                euler_timesteps(1000, steps, spacing), abs=1e-3
            )
