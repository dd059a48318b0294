"""A diffusers `scheduler_config.json` reproduced by ddserve's sampler (`models.diffusion.scheduler_config`).

Parity: both sides start from the same config dict — ddserve through `from_diffusers(config)` and
`SchedulerOptions.settings(...)`, diffusers through `<Class>.from_config(config)` — and are driven by
the same deterministic fake network (`FakeNetwork`: a fixed function of x and t) from the same x_T.

Same noise: ddserve draws a step's z from the sample's own generator `noise.sample_generator(SEED, i)`
only when the step's σ > 0 (x_T is given, so nothing else is drawn). diffusers is replayed with fresh
generators of the same seeds:
- DDPMScheduler.step(..., generator=[g_0, …, g_{B−1}]): `randn_tensor` draws row i's noise of shape
  [1, C, H, W] from g_i at every step from t > 0 — the same numbers in the same order (its last draw,
  with σ = 0 under fixed_small, has no successor to shift);
- DDIMScheduler.step(..., eta, variance_noise=z): the test draws z row by row from g_i (shape
  [C, H, W], as ddserve does) on the steps where σ > 0 (every step at η > 0 but a last step onto
  ᾱ = 1), and passes zeros on that last step, whose noise weight is 0.
Tolerance: max |difference| ≤ 1e-4 on the final tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.diffusion.noise import sample_generator
from models.diffusion.sampler import sample
from models.diffusion.schedule import NoiseSchedule
from models.diffusion.scheduler_config import SchedulerOptions, from_diffusers
from models.diffusion.timesteps import timestep_sequence
from models.scheduler_config_fields import default_sampler, read_fields

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 8, 8)
SEED = 23
TOLERANCE = 1e-4
# A trained β table of T = 1000 (any increasing table in (0, 1) will do).
TRAINED_BETAS = (np.linspace(0.0002, 0.03, 1000) ** 1.2).tolist()
BETAS = {
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    "trained_betas": dict(trained_betas=TRAINED_BETAS),
}
DIFFUSERS_CLASSES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}


class FakeNetwork:
    """A deterministic stand-in for a trained denoiser of `schedule`: its data prediction
    x̂_0(x, t) = 0.3 + 0.6 tanh(x) cos(t/150) + 0.1 sin(3x) is bounded, nonlinear in x and varies
    with t, and the output is that prediction as ε, v or x_0 (with ddserve's float64 ᾱ table, on both
    sides). Defined through x̂_0, it stays finite where ᾱ_t = 0 (zero terminal SNR)."""

    def __init__(self, schedule: NoiseSchedule, prediction: str, x0_scale: float = 1.0) -> None:
        self.alpha_bar = schedule.alphas_cumprod
        self.prediction = prediction
        self.x0_scale = x0_scale

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        t = t.reshape(-1).expand(x.shape[0])
        a = self.alpha_bar[t.long()].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        # The angle reads a fractional t as it is (Euler's ``linspace`` points, Karras levels), so
        # that a network called at a rounded timestep would differ.
        angle = t.to(x.dtype).reshape(a.shape) / 150
        x0 = 0.3 + 0.6 * torch.tanh(x) * torch.cos(angle) + 0.1 * torch.sin(3 * x)
        x0 = self.x0_scale * x0
        if self.prediction == "sample":
            return x0
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if self.prediction == "epsilon":
            return eps
        return a.sqrt() * eps - (1 - a).sqrt() * x0  # v_prediction


def _config(sampler: str, betas: str, prediction: str, **extra) -> dict:
    config = {
        "_class_name": DIFFUSERS_CLASSES[sampler],
        "num_train_timesteps": 1000,
        "prediction_type": prediction,
        "clip_sample": False,
        **BETAS[betas],
    }
    config.update(extra)
    return config


def _ours(
    config: dict, steps: int, x_T: torch.Tensor, x0_scale: float = 1.0, **request
) -> torch.Tensor:
    schedule, options = from_diffusers(config)
    return sample(
        FakeNetwork(schedule, config.get("prediction_type", "epsilon"), x0_scale),
        schedule,
        x_T,
        options.settings(num_inference_steps=steps, **request),
        prediction_type=options.prediction_type,
        generators=[sample_generator(SEED, i) for i in range(x_T.shape[0])],
    )


def _theirs(
    config: dict, steps: int, x_T: torch.Tensor, eta: float = 0.0, x0_scale: float = 1.0
) -> torch.Tensor:
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    scheduler.set_timesteps(steps)
    prediction = config.get("prediction_type", "epsilon")
    network = FakeNetwork(from_diffusers(config)[0], prediction, x0_scale)
    generators = [sample_generator(SEED, i) for i in range(x_T.shape[0])]
    T = scheduler.config.num_train_timesteps
    x = x_T.clone()
    for t in scheduler.timesteps:
        out = network(x, t, None)
        if isinstance(scheduler, diffusers.DDPMScheduler):
            x = scheduler.step(out, t, x, generator=generators).prev_sample
            continue
        onto_one = int(t) - T // steps < 0 and scheduler.config.set_alpha_to_one
        z = None
        if eta > 0:
            z = torch.zeros_like(x)
            if not onto_one:
                z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])
        x = scheduler.step(out, t, x, eta=eta, variance_noise=z).prev_sample
    return x


def _check(
    config: dict,
    steps: int,
    eta: float = 0.0,
    tolerance: float = TOLERANCE,
    x0_scale: float = 1.0,
) -> None:
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    theirs = _theirs(config, steps, x_T, eta, x0_scale)
    ours = _ours(config, steps, x_T, x0_scale, eta=eta)
    assert torch.isfinite(ours).all()
    difference = (ours - theirs).abs().max().item()
    assert difference <= tolerance, difference


# (steps, spacing) per run: 48 trailing has the .5 ties of diffusers' float accumulation, and its
# DDIM steps land on t − ⌊T/S⌋ = t − 20, not on the next timestep (t − 20.83 rounded).
STEP_PLANS = ((10, "leading"), (48, "trailing"), (25, "linspace"), (7, "trailing"))


@pytest.mark.parametrize("betas", list(BETAS))
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_ddpm_ddim_match_diffusers(betas: str, prediction: str, sampler: str, eta: float) -> None:
    """Each beta_schedule × prediction_type × DDPM / DDIM (η = 0, 1) at several step counts and
    spacings. The cosine schedule's t = 999 (ᾱ ≈ 2e-9) amplifies float32 rounding by 1/√ᾱ for an ε
    model (see test_solvers_parity.test_cosine_from_the_last_timestep), so it runs ``leading`` there."""
    for steps, spacing in STEP_PLANS:
        if betas == "squaredcos_cap_v2" and prediction == "epsilon":
            spacing = "leading"
        _check(_config(sampler, betas, prediction, timestep_spacing=spacing), steps, eta)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_stable_diffusion_1_config_matches_diffusers(sampler: str) -> None:
    """SD 1.x's scheduler (PNDM's config, read by DDIM/DDPM from_config): scaled_linear,
    `steps_offset=1`, `set_alpha_to_one=False`, leading, clip_sample False."""
    config = _config(
        sampler,
        "scaled_linear",
        "epsilon",
        steps_offset=1,
        set_alpha_to_one=False,
        timestep_spacing="leading",
        skip_prk_steps=True,
    )
    for steps in (10, 50):
        _check(config, steps, eta=0.0)
    if sampler == "ddim":
        _check(config, 20, eta=1.0)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
@pytest.mark.parametrize("clip_range", [1.0, 0.5])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_clip_sample_matches_diffusers(
    sampler: str, eta: float, clip_range: float, prediction: str
) -> None:
    """`clip_sample` (the DDPM/DDIM default) with `clip_sample_range`: DDPM's posterior mean uses the
    clipped x̂_0; diffusers' DDIM keeps the network's ε (`use_clipped_model_output=False`)."""
    config = _config(sampler, "linear", prediction, clip_sample=True, clip_sample_range=clip_range)
    for steps, spacing in ((10, "leading"), (48, "trailing")):
        _check({**config, "timestep_spacing": spacing}, steps, eta)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_dynamic_thresholding_matches_diffusers(sampler: str, eta: float, prediction: str) -> None:
    """`thresholding` (Saharia et al. 2022) overrides clip_sample; the fake network's x̂_0 reaches
    ±1.5 after the scaling below, so the bound s lies strictly inside [1, sample_max_value]."""
    config = _config(
        sampler,
        "scaled_linear",
        prediction,
        clip_sample=True,
        thresholding=True,
        dynamic_thresholding_ratio=0.9,
        sample_max_value=1.3,
    )
    for steps, spacing in ((10, "leading"), (48, "trailing")):
        _check({**config, "timestep_spacing": spacing}, steps, eta, x0_scale=2.0)


def test_thresholding_bound_is_the_quantile() -> None:
    """s = the ratio-quantile of |x̂_0| clamped to [1, max]: here 2 of 4 values exceed 1."""
    from models.diffusion.steps import DynamicThreshold

    x0 = torch.tensor([[0.5, -3.0, 2.0, 0.25], [0.5, 0.5, -0.5, 0.5]]).reshape(2, 1, 2, 2)
    threshold = DynamicThreshold(
        rows=torch.tensor([0, 1]),
        ratio=torch.tensor([0.75, 0.75], dtype=torch.float64),
        max_value=torch.tensor([10.0, 10.0], dtype=torch.float64),
    )
    out = threshold.apply(x0).reshape(2, 4)
    s = torch.quantile(torch.tensor([0.5, 3.0, 2.0, 0.25]), 0.75).item()  # 2.25
    assert torch.allclose(out[0], torch.tensor([0.5, -s, 2.0, 0.25]) / s)
    assert torch.equal(out[1], torch.tensor([0.5, 0.5, -0.5, 0.5]))  # s = 1: unchanged


def test_upper_quantile_equals_torch_quantile() -> None:
    from models.diffusion.steps import upper_quantile

    generator = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 4096, 3 * 8 * 8):
        values = torch.randn(5, n, generator=generator).abs() * 3
        for q in (0.995, 0.9, 0.5, 1.0, 0.01, 0.0):
            assert torch.equal(upper_quantile(values, q), torch.quantile(values, q, dim=1)), (n, q)


@pytest.mark.parametrize("variant", ["fixed_large", "fixed_small_log", "ddim_alpha_bar_0"])
def test_variances_and_trailing_last_step(variant: str) -> None:
    """DDPM `variance_type="fixed_large"` (σ² = β') draws noise on its last step from t = 20 > 0 in
    diffusers; "fixed_small_log" is β̃ through its log; `set_alpha_to_one=False` makes DDIM's last
    step land on ᾱ_0."""
    sampler = "ddim" if variant == "ddim_alpha_bar_0" else "ddpm"
    config = _config(sampler, "linear", "epsilon", timestep_spacing="trailing")
    if sampler == "ddpm":
        config["variance_type"] = variant
    else:
        config["set_alpha_to_one"] = False
    _check(config, 50, eta=1.0 if sampler == "ddim" else 0.0)


def test_pndm_config_runs_as_ddim() -> None:
    """SD 1.x's PNDMScheduler config (not implemented) samples with DDIM reading the same fields."""
    pndm = {
        "_class_name": "PNDMScheduler",
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
    }
    _, options = from_diffusers(pndm)
    settings = options.settings(num_inference_steps=50)
    assert settings.sampler == "ddim" and settings.convention == "diffusers"
    assert (settings.steps_offset, settings.set_alpha_to_one, settings.clip_denoised) == (
        1,
        False,
        False,
    )
    _check({**pndm, "_class_name": "DDIMScheduler"}, 50)  # what it runs: DDIMScheduler of the dict


def test_zero_terminal_snr_matches_diffusers() -> None:
    """`rescale_betas_zero_snr` (Lin et al. 2024) with v-prediction and trailing spacing, as the
    paper prescribes: the first step starts from pure noise (ᾱ_999 = 0). DDIM at η = 1 is compared
    by finiteness only: its first step's c_ε = √(1 − ᾱ_s − σ²) has σ² = 1 − ᾱ_s exactly, and
    diffusers' float32 (√var)² rounds above it, giving √(negative) = NaN; ddserve clamps at 0."""
    schedule, _ = from_diffusers(
        _config("ddim", "scaled_linear", "v_prediction", rescale_betas_zero_snr=True)
    )
    assert schedule.alphas_cumprod[-1].item() == 0.0
    reference = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=True,
    )
    assert torch.allclose(schedule.alphas_cumprod, reference.alphas_cumprod.double(), atol=1e-6)
    for sampler, eta in (("ddim", 0.0), ("ddpm", 0.0)):
        config = _config(
            sampler,
            "scaled_linear",
            "v_prediction",
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
        )
        for steps in (10, 48):
            _check(config, steps, eta)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    config = _config("ddim", "scaled_linear", "v_prediction", rescale_betas_zero_snr=True)
    ours = _ours({**config, "timestep_spacing": "trailing"}, 10, x_T, eta=1.0)
    assert torch.isfinite(ours).all()


def test_timesteps_equal_diffusers_for_every_step_count() -> None:
    """DDIM/DDPM `set_timesteps(S)` for S = 1 … 1000, each spacing, steps_offset 0 and 1. diffusers'
    ``trailing`` yields an extra timestep −1 for 62 counts (np.arange's float overshoot), which
    ddserve drops; ``leading`` + offset 1 at S = 1000 would call timestep 1000, which ddserve
    rejects."""
    for spacing in ("leading", "trailing", "linspace"):
        for offset in (0, 1):
            ddim = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
            ddpm = diffusers.DDPMScheduler(timestep_spacing=spacing, steps_offset=offset)
            for steps in range(1, 1001):
                ddim.set_timesteps(steps)
                theirs = [t for t in ddim.timesteps.tolist() if t >= 0]
                if theirs[0] >= 1000:
                    with pytest.raises(ValueError, match="steps_offset"):
                        timestep_sequence(1000, steps, spacing, offset)
                    continue
                assert timestep_sequence(1000, steps, spacing, offset) == theirs, (spacing, steps)
                if steps % 37 == 0:  # the same code in DDPMScheduler; a sample of counts suffices
                    ddpm.set_timesteps(steps)
                    assert ddpm.timesteps.tolist() == ddim.timesteps.tolist()


def test_trailing_ties_differ_from_exact_rounding() -> None:
    """The regression of issue #19: 48 steps of 1000, trailing, was 937 where diffusers has 936."""
    sequence = timestep_sequence(1000, 48, "trailing")
    assert 936 in sequence and 937 not in sequence


# --- the config itself ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config,sampler",
    [
        ({"_class_name": "DDPMScheduler"}, "ddpm"),
        ({"_class_name": "DDIMScheduler"}, "ddim"),
        ({"_class_name": "DPMSolverMultistepScheduler"}, "dpmpp_2m"),
        (
            {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"},
            "dpmpp_2m_sde",
        ),
        ({"_class_name": "UniPCMultistepScheduler"}, "unipc"),
        ({"_class_name": "EulerDiscreteScheduler"}, "euler"),
        ({"_class_name": "EulerAncestralDiscreteScheduler"}, "euler_ancestral"),
        ({"_class_name": "PNDMScheduler"}, "ddim"),
        ({"_class_name": "LMSDiscreteScheduler"}, "euler"),
    ],
)
def test_default_sampler_per_class(config: dict, sampler: str) -> None:
    assert default_sampler(config) == sampler
    assert from_diffusers(config)[1].sampler == sampler


@pytest.mark.parametrize(
    "config,message",
    [
        ({}, "_class_name"),
        ({"_class_name": "KDPM2DiscreteScheduler"}, "not supported"),
        ({"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"_class_name": "DDIMScheduler", "prediction_type": "flow"}, "prediction_type"),
        ({"_class_name": "DDIMScheduler", "timestep_spacing": "karras"}, "timestep_spacing"),
        ({"_class_name": "DDPMScheduler", "variance_type": "learned_range"}, "variance_type"),
        (
            {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"},
            "algorithm_type",
        ),
        ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, "solver_order"),
        ({"_class_name": "UniPCMultistepScheduler", "solver_type": "bh1"}, "solver_type"),
        (
            {"_class_name": "DDIMScheduler", "trained_betas": [0.1, 0.2], "num_train_timesteps": 9},
            "trained_betas",
        ),
        ({"_class_name": "DDIMScheduler", "trained_betas": [0.1, 1.5]}, "trained_betas"),
        ({"_class_name": "DDIMScheduler", "clip_sample_range": 0}, "clip_sample_range"),
        ({"_class_name": "DDIMScheduler", "steps_offset": -1}, "steps_offset"),
        ({"_class_name": "UniPCMultistepScheduler", "lower_order_final": False}, "lower_order"),
        ({"_class_name": "UniPCMultistepScheduler", "solver_p": {}}, "solver_p"),
        ({"_class_name": "DDIMScheduler", "dynamic_thresholding_ratio": 1.5}, "thresholding"),
    ],
)
def test_unsupported_configs_are_refused_by_name(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_diffusers(config)


def test_trained_betas_from_a_live_scheduler_config() -> None:
    """`dict(scheduler.config)` may hold trained_betas as a tuple or an array, not a list."""
    for betas in (tuple(TRAINED_BETAS), np.array(TRAINED_BETAS)):
        schedule, _ = from_diffusers({"_class_name": "DDIMScheduler", "trained_betas": betas})
        assert torch.allclose(schedule.betas, torch.tensor(TRAINED_BETAS, dtype=torch.float64))
    with pytest.raises(ValueError, match="trained_betas"):
        from_diffusers({"_class_name": "DDIMScheduler", "trained_betas": "0.1"})


def test_gateway_fields_need_no_torch() -> None:
    import subprocess
    import sys

    probe = "import sys, models.scheduler_config_fields; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", probe], check=True)
    fields = read_fields(
        {
            "_class_name": "EulerDiscreteScheduler",
            "prediction_type": "v_prediction",
            "num_train_timesteps": 500,
        }
    )
    assert (fields.sampler, fields.prediction_type, fields.num_train_timesteps) == (
        "euler",
        "v",
        500,
    )


def test_request_may_choose_another_sampler() -> None:
    """A DPM-Solver model sampled with DDIM: the config's spacing and offset, DDIM's own defaults
    for what the config lacks (set_alpha_to_one) but no clipping (DPM-Solver has no clip_sample, and
    DDIM's default True would clamp a latent model's x̂_0), the request's values over both."""
    _, options = from_diffusers(
        {
            "_class_name": "DPMSolverMultistepScheduler",
            "timestep_spacing": "trailing",
            "steps_offset": 1,
            "use_karras_sigmas": True,
        }
    )
    ddim = options.settings("ddim", 20, eta=0.5)
    assert (ddim.timestep_spacing, ddim.steps_offset, ddim.set_alpha_to_one) == (
        "trailing",
        1,
        True,
    )
    assert not ddim.clip_denoised and ddim.eta == 0.5 and not ddim.use_karras_sigmas
    assert options.settings("ddim", 20, clip_denoised=True).clip_denoised
    # A DDIM config without clip_sample clips (the class default), in DDIM and DDPM only.
    _, ddim_options = from_diffusers({"_class_name": "DDIMScheduler"})
    assert ddim_options.settings("ddpm", 20).clip_denoised
    assert not ddim_options.settings("euler", 20).clip_denoised
    default = options.settings(num_inference_steps=20)
    assert default.sampler == "dpmpp_2m" and default.use_karras_sigmas
    assert not default.clip_denoised  # the σ-space classes never clip


def test_zoo_defaults_are_ddserve_conventions() -> None:
    """Models without a scheduler config keep ddserve's own settings."""
    from models.diffusion.sampler import SamplerSettings
    from models.diffusion.steps import SAMPLER_NAMES

    for name in SAMPLER_NAMES:
        assert SchedulerOptions().settings(name, 50) == SamplerSettings(name, 50)  # type: ignore[arg-type]
    assert SchedulerOptions().settings("ddpm", 10, clip_denoised=True) == SamplerSettings(
        "ddpm", 10, clip_denoised=True
    )
