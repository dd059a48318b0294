"""A diffusers `scheduler_config.json` reproduced by ddserve's own per-sample sampler.

ddserve never runs diffusers' schedulers: every sample of a `DenoisingBatch` carries its own
`SamplerSettings`, so that one network call serves samples at different steps of different samplers.
A model served from a diffusers pipeline therefore has its scheduler config translated once, here,
into (1) its `NoiseSchedule` — the β table — and (2) its `SchedulerOptions` — everything else the
config says about sampling — from which `SchedulerOptions.settings` builds each request's
`SamplerSettings`. The worker builds one `DenoisingBatch(network, schedule, shape,
prediction_type=options.prediction_type)` per model; every other option lives in the samples'
settings (so a batch needs no model options of its own and zoo models, which have no scheduler
config, keep ddserve's defaults).

The β table (`beta_schedule`, float64, T = `num_train_timesteps`), as diffusers builds it:
- ``linear``: β_t = β_start + (β_end − β_start) · t/(T − 1) (Ho et al. 2020; no 1000/T scaling,
  unlike `schedule.linear_betas` for ddserve's own T ≠ 1000 models);
- ``scaled_linear``: √β linear from √β_start to √β_end (Rombach et al. 2022);
- ``squaredcos_cap_v2``: the cosine schedule of Nichol & Dhariwal 2021 (β ≤ 0.999);
- `trained_betas`: the given table;
then, with `rescale_betas_zero_snr` (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
Steps are Flawed", Algorithm 1), √ᾱ is shifted and scaled so that the last timestep has zero SNR:

    √ᾱ'_t = (√ᾱ_t − √ᾱ_{T−1}) · √ᾱ_0 / (√ᾱ_0 − √ᾱ_{T−1}),   so ᾱ'_0 = ᾱ_0 and ᾱ'_{T−1} = 0.

x̂_0 is bounded as diffusers does: `thresholding` (dynamic thresholding, Saharia et al. 2022,
`steps.DynamicThreshold`) for the classes that have it (DDPM, DDIM, DPM-Solver, UniPC), else
`clip_sample` to [−`clip_sample_range`, `clip_sample_range`] (DDPM and DDIM only). DDIM's last step
lands on ᾱ = 1, or on ᾱ_0 with `set_alpha_to_one=False`; `steps_offset` shifts ``leading``
timesteps. The DDPM/DDIM steps follow diffusers' `step` (`sampler.StepConvention`).

A request may run another sampler than the config's class (DDPM or DDIM on a DPM-Solver model, …):
its settings are then those of diffusers' class for that sampler built with `from_config` of the
same dict — the config's values where it has them (spacing, `steps_offset`, `set_alpha_to_one`,
`clip_sample`, …) and that class's defaults where it has not (`CLASS_DEFAULTS`) — except that a
config of a class without `clip_sample` never clips (`CLIPPING_CLASSES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from models.diffusion.sampler import SamplerPrediction, SamplerSettings
from models.diffusion.schedule import NoiseSchedule, cosine_betas, scaled_linear_betas
from models.diffusion.steps import MULTISTEP_SAMPLERS, SIGMA_SAMPLERS, DdpmVariance, SamplerName
from models.diffusion.timesteps import TIMESTEP_SPACINGS, TimestepSpacing
from models.scheduler_config_fields import (
    class_name,
    default_sampler,
    num_train_timesteps,
    prediction_type,
)

BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")
# DDPMScheduler's `variance_type` → ddserve's `ddpm_variance` ("fixed_small_log" is the same σ).
DDPM_VARIANCES: dict[str, DdpmVariance] = {
    "fixed_small": "beta_tilde",
    "fixed_small_log": "beta_tilde",
    "fixed_large": "beta",
}
# The defaults of diffusers' scheduler class for each ddserve sampler, for the fields a config may
# omit (diffusers 0.42; every class starts with steps_offset = 0). clip_sample: see `CLIPPING_CLASSES`.
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddpm": {"timestep_spacing": "leading"},
    "ddim": {"timestep_spacing": "leading", "set_alpha_to_one": True},
    "euler": {"timestep_spacing": "linspace"},
    "euler_ancestral": {"timestep_spacing": "linspace"},
    "dpmpp_2m": {"timestep_spacing": "linspace"},
    "dpmpp_2m_sde": {"timestep_spacing": "linspace"},
    "unipc": {"timestep_spacing": "linspace"},
}
# The classes with a `clip_sample` option (default True), and the samplers that apply it. A config
# of another class that does not mention clip_sample does not clip: diffusers' DDIMScheduler /
# DDPMScheduler.from_config of it would take their default True and clamp x̂_0 to [−1, 1] — a latent
# model's x̂_0 too, which is the known pitfall of switching an SD pipeline's scheduler to DDIM.
CLIPPING_CLASSES: tuple[str, ...] = ("DDPMScheduler", "DDIMScheduler")
CLIPPING_SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")
# The samplers of diffusers' DPMSolverMultistepScheduler.
DPM_SOLVER_SAMPLERS: tuple[str, ...] = ("dpmpp_2m", "dpmpp_2m_sde")
# The samplers whose diffusers class has `thresholding` (the Euler classes have not).
THRESHOLDING_SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc")
# Options of diffusers' classes that ddserve does not reproduce, with the value that it does
# (`None`: absent or null). A config that sets one otherwise is rejected by name.
UNSUPPORTED_UNLESS: dict[str, tuple[Any, ...]] = {
    "variance_type": ("fixed_small", "fixed_small_log", "fixed_large", None),
    "solver_type": ("midpoint", "bh2", None),  # DPM-Solver's "heun", UniPC's "bh1"
    "predict_x0": (True, None),  # UniPC
    "disable_corrector": ((), [], None),  # UniPC
    "euler_at_final": (False, None),
    "final_sigmas_type": ("zero", None),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "use_lu_lambdas": (False, None),
    "use_flow_sigmas": (False, None),
    "use_dynamic_shifting": (False, None),
    "interpolation_type": ("linear", None),  # Euler's "log_linear"
    "timestep_type": ("discrete", None),  # Euler's "continuous" (EDM)
    "solver_p": (None,),  # UniPC with another scheduler as its predictor
    "sigma_min": (None,),
    "sigma_max": (None,),
    "shift_terminal": (None,),
    "lambda_min_clipped": (-math.inf, None),
    "variance_normalization": (None,),
}


@dataclass(frozen=True)
class SchedulerOptions:
    """A model's sampling options, read from its `scheduler_config.json` (`from_diffusers`).

    `None` means the config does not set the field: the class of the sampler a request runs takes
    its own default (`CLASS_DEFAULTS`), as `<Class>.from_config(config)` would. `SchedulerOptions()`
    are ddserve's own conventions (the zoo's models: ``leading`` spacing for every sampler, clipping
    as the request or card says)."""

    sampler: SamplerName = "ddim"  # the default sampler (`default_sampler`)
    prediction_type: SamplerPrediction = "epsilon"  # what the network predicts
    timestep_spacing: TimestepSpacing | None = None
    steps_offset: int = 0  # added to ``leading`` timesteps (SD 1.x: 1)
    set_alpha_to_one: bool | None = None  # DDIM: last step to ᾱ = 1, else to ᾱ_0
    clip_sample: bool | None = None  # DDPM / DDIM: clamp x̂_0 to [−clip_sample_range, range]
    # (from_diffusers: the config's value, else True for a DDPM / DDIM config, else False)
    clip_sample_range: float = 1.0
    thresholding: bool = False  # dynamic thresholding of x̂_0 (Saharia et al. 2022), not clipping
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    ddpm_variance: DdpmVariance = "beta_tilde"  # DDPM's variance_type: fixed_small → β̃, large → β
    use_karras_sigmas: bool = False  # euler, dpmpp_2m(_sde), unipc: Karras et al. 2022 levels
    solver_order: int = 2  # dpmpp_2m(_sde), unipc
    # UniPC's last step is first order (ddserve always does this); False (order 2 there) is refused
    # when a request runs unipc. DPM-Solver++ steps into σ = 0 at first order either way.
    lower_order_final: bool = True
    rescale_betas_zero_snr: bool = False  # already applied to the schedule; kept for the record
    beta_schedule: str = "linear"  # the config's (DPM-Solver's Karras timesteps depend on it)
    from_diffusers: bool = False  # steps follow diffusers' `StepConvention` (sampler.py)

    def settings(
        self,
        sampler: SamplerName | None = None,
        num_inference_steps: int = 50,
        **request: Any,
    ) -> SamplerSettings:
        """What one request's sample runs with on this model: the sampler it names (else the
        model's), the model's options for that sampler, then the request's own values (`eta`,
        `guidance_scale`, `clip_denoised`, `jump_length`, …), which win over the model's.

        Raises ValueError for settings the sampler rejects (see `SamplerSettings`)."""
        name = sampler or self.sampler
        if name == "unipc" and not self.lower_order_final:
            raise ValueError(
                "unipc with lower_order_final=False (a second-order last step) is not supported"
            )
        values: dict[str, Any] = dict(
            sampler=name, num_inference_steps=num_inference_steps, steps_offset=self.steps_offset
        )
        if self.timestep_spacing is not None:
            values["timestep_spacing"] = self.timestep_spacing
        if self.from_diffusers:
            # A sampler without a row (a new one) takes the modern classes' default spacing; an
            # unknown name is refused by SamplerSettings below.
            defaults = CLASS_DEFAULTS.get(name, {"timestep_spacing": "linspace"})
            values.setdefault("timestep_spacing", defaults["timestep_spacing"])
            values["convention"] = "diffusers"
            # Only DDPM and DDIM clip in diffusers; the σ-space classes never do.
            values["clip_denoised"] = bool(self.clip_sample) and name in CLIPPING_SAMPLERS
            values["clip_sample_range"] = self.clip_sample_range
            if name in THRESHOLDING_SAMPLERS:
                values["thresholding"] = self.thresholding
                values["dynamic_thresholding_ratio"] = self.dynamic_thresholding_ratio
                values["sample_max_value"] = self.sample_max_value
        if name == "ddim":
            alpha_to_one = self.set_alpha_to_one
            values["set_alpha_to_one"] = True if alpha_to_one is None else alpha_to_one
        if name == "ddpm":
            values["ddpm_variance"] = self.ddpm_variance
        if name in SIGMA_SAMPLERS and name != "euler_ancestral":
            values["use_karras_sigmas"] = self.use_karras_sigmas
        if name in MULTISTEP_SAMPLERS:
            values["solver_order"] = self.solver_order
        if self.from_diffusers and name in DPM_SOLVER_SAMPLERS:
            # DPMSolverMultistepScheduler keeps the cosine schedule's Karras timesteps fractional
            # and casts them to int64 (`sigmas.py`); UniPC rounds them. Set whether Karras comes
            # from the config or the request (it has no effect without).
            values["truncate_karras_timesteps"] = self.beta_schedule == "squaredcos_cap_v2"
        values.update(request)
        return SamplerSettings(**values)


def _check_supported(config: dict[str, Any]) -> None:
    for key, allowed in UNSUPPORTED_UNLESS.items():
        if key in config and config[key] not in allowed:
            shown = ", ".join(repr(a) for a in allowed if a is not None) or "unset"
            raise ValueError(
                f"scheduler option {key}={config[key]!r} is not supported (supported: {shown})"
            )


def _betas(config: dict[str, Any], T: int) -> torch.Tensor:
    """β_1..β_T in float64 (module docstring), before any zero-SNR rescaling."""
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float64)
        if betas.dim() != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("trained_betas must be a list of numbers in (0, 1)")
        return betas
    schedule = config.get("beta_schedule", "linear")
    beta_start = float(config.get("beta_start", 0.0001))
    beta_end = float(config.get("beta_end", 0.02))
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":
        return scaled_linear_betas(T, beta_start, beta_end)
    if schedule == "squaredcos_cap_v2":
        return cosine_betas(T)
    raise ValueError(
        f"beta_schedule {schedule!r} is not supported; expected one of {', '.join(BETA_SCHEDULES)}"
        " or trained_betas"
    )


def diffusers_float32_betas(config: dict[str, Any], T: int) -> torch.Tensor | None:
    """[T] β as diffusers builds them, in float32 (`torch.linspace(..., dtype=torch.float32)`
    differs from the float64 table rounded by an ulp here and there): the Karras levels' timesteps
    depend on them below float32's precision (`sigmas.diffusers_sigma_table`). None with
    `rescale_betas_zero_snr` (the float64 table rounded)."""
    if config.get("rescale_betas_zero_snr", False):
        return None
    trained = config.get("trained_betas")
    if trained is not None:
        return torch.tensor(trained, dtype=torch.float32)
    schedule = config.get("beta_schedule", "linear")
    beta_start = float(config.get("beta_start", 0.0001))
    beta_end = float(config.get("beta_end", 0.02))
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    return cosine_betas(T).to(torch.float32)  # diffusers' float64 table, rounded (`_betas`)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """β of the schedule whose √ᾱ is shifted to end at 0 and scaled to keep √ᾱ_0 (Lin et al.
    2024, Algorithm 1; module docstring). The last β is 1: x_{T−1} is pure noise."""
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()  # [T]
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * first / (first - last)
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def from_diffusers(config: dict[str, Any]) -> tuple[NoiseSchedule, SchedulerOptions]:
    """The schedule and options of a diffusers scheduler config (a `scheduler_config.json` dict).

    Raises ValueError with a clear message for an unsupported class or option."""
    name = class_name(config)
    _check_supported(config)
    sampler = default_sampler(config)
    T = num_train_timesteps(config)
    betas = _betas(config, T)
    rescale = bool(config.get("rescale_betas_zero_snr", False))
    if rescale:
        betas = rescale_zero_terminal_snr(betas)
    spacing = config.get("timestep_spacing")
    if spacing is not None and spacing not in TIMESTEP_SPACINGS:
        raise ValueError(
            f"timestep_spacing {spacing!r} is not supported; expected one of "
            f"{', '.join(TIMESTEP_SPACINGS)}"
        )
    steps_offset = config.get("steps_offset", 0)
    if not isinstance(steps_offset, int) or steps_offset < 0:
        raise ValueError(f"steps_offset must be an integer ≥ 0, got {steps_offset!r}")
    clip_range = float(config.get("clip_sample_range", 1.0))
    if not clip_range > 0.0:
        raise ValueError(f"clip_sample_range must be > 0, got {clip_range}")
    order = config.get("solver_order", 2)
    if order not in (1, 2):
        raise ValueError(f"solver_order {order!r} is not supported; expected 1 or 2")
    variance = config.get("variance_type") if name == "DDPMScheduler" else None
    options = SchedulerOptions(
        sampler=sampler,  # type: ignore[arg-type]
        prediction_type=prediction_type(config),  # type: ignore[arg-type]
        timestep_spacing=spacing,
        steps_offset=steps_offset,
        set_alpha_to_one=config.get("set_alpha_to_one"),
        clip_sample=bool(config.get("clip_sample", name in CLIPPING_CLASSES)),
        clip_sample_range=clip_range,
        thresholding=bool(config.get("thresholding", False)),
        dynamic_thresholding_ratio=float(config.get("dynamic_thresholding_ratio", 0.995)),
        sample_max_value=float(config.get("sample_max_value", 1.0)),
        ddpm_variance=DDPM_VARIANCES[variance or "fixed_small"],
        use_karras_sigmas=bool(config.get("use_karras_sigmas", False)),
        solver_order=order,
        lower_order_final=bool(config.get("lower_order_final", True)),
        rescale_betas_zero_snr=rescale,
        beta_schedule=str(config.get("beta_schedule", "linear")),
        from_diffusers=True,
    )
    # Fail now, not at the first request, if the default sampler cannot run with these options.
    options.settings(num_inference_steps=1)
    schedule = NoiseSchedule(
        kind="custom", betas=betas, diffusers_betas=diffusers_float32_betas(config, T)
    )
    return schedule, options
