"""Batched sampling where every sample carries its own settings and progress.

`DenoisingBatch` is the running set of samples behind both the library call `sample(...)` and the
serving engine's continuous batching: samples join between steps (`add`), each `step` makes one
network call over all of them at their own timesteps — with the unconditional rows of classifier-free
guidance (each guided sample's own ∅', its negative prompt or the model's ∅) appended to the same
call — and advances each one by its own sampler; finished samples leave
(`step` returns them). A sample's result depends only on its own settings, condition and noise stream
(see `noise.py`), never on its neighbours.

The network is any callable ε_θ(x [N, C, H, W], t [N], cond [N, ...] | None) → [N, C, H, W]
predicting ε (or v, with `prediction_type="v"`, or x_0 with `"sample"`). t is long for ddserve's
own networks; a call holding a row of the "diffusers" convention (`StepConvention`, 5) gets a
float32 t for all its rows, where integer timesteps are exact.

Samplers: DDPM and DDIM (`steps.py`) on the timestep sub-sequence of `timesteps.py`; Euler, Euler
ancestral, DPM-Solver++(2M), DPM-Solver++(2M) SDE and UniPC on the σ-levels of `sigmas.py` with the
coefficient rows of `solvers.py`. The multistep solvers keep a per-sample history (their last data
predictions and, for UniPC, the sample they last stepped from) as rows of one [3, B, C, H, W] tensor
next to x, so a mixed batch is still one network call and one elementwise update.

Inpainting (RePaint, Lugmayr et al. 2022, Algorithm 1): with m the mask (1 = keep), every sampler
replaces the known region after each step t → s,

    x_s ← m ⊙ (√ᾱ_s · x_0 + √(1 − ᾱ_s) · z) + (1 − m) ⊙ x_s,   z ~ N(0, I),

and RePaint's forward jumps (`jump_n_sample > 1`) re-noise the sample from s back up to a noisier
t by q(x_t | x_s) before it is denoised again. They need a single-step sampler (ddpm, ddim, euler,
euler_ancestral): a jump back to more noise would leave a multistep solver's history on another
trajectory, so `SamplerSettings` rejects it for dpmpp_2m, dpmpp_2m_sde and unipc. The walk, the
jumps' noise and the draws follow the paper's code, or with `convention="diffusers"` diffusers'
`RePaintPipeline` (`StepConvention`, 4).

Image-to-image (SDEdit, Meng et al. 2022, §3): a sample given an image x_0 (`Sample.init_x0`) and
`strength` < 1 perturbs it by the forward process to the first timestep t_0 of the tail of its plan
and denoises from there,

    x_{t_0} = √ᾱ_{t_0} · x_0 + √(1 − ᾱ_{t_0}) · ε,   ε ~ N(0, I) the first draw of its own stream,

where the tail is what diffusers' img2img pipelines take (`timesteps.sdedit_start`: the last
⌊S·strength⌋ of the S steps) and ᾱ_{t_0} is that step's own (for σ-samplers 1/(1 + σ_0²), the σ-space
`add_noise` / `scale_noise` of diffusers written in the VP variable). The tail's coefficient rows are
the full plan's, except that the multistep solvers warm up on the tail's first step (no history
yet), as diffusers' schedulers do after `set_begin_index`. Such a sample simply joins the running
set at a later timestep; nothing else about the batch changes. strength = 1 is generation: the
sample starts from x_T = ε, exactly as without an image (diffusers would keep √ᾱ_{t_0}·x_0 in x_T:
0.6–0.8 % of the image on the linear 1000-step schedule, 7–8 % on SD's scaled_linear one; ddserve's
x_T ~ N(0, I) neglects it, as its generation does).

Inpainting UNets (`inpainting_unet.py`: diffusers' `StableDiffusionInpaintPipeline` with a 9-channel
UNet) inpaint without RePaint: a sample's `masked_image` is drawn once when it joins (after x_T,
from its own stream) into `concat`, channels the network reads beside x_t at every call (and beside
the unconditional copy of a guided row), so rows of different masks still share one call. With
strength < 1 such a sample starts as image-to-image above, from x_0 = its `init_posterior`'s draw
(the whole image's posterior sample, drawn before ε: the pipeline's order, `inpainting_unet.py`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from models.diffusion.forward import PredictionType
from models.diffusion.guidance import (
    ClassifierFn,
    classifier_free_guidance,
    classifier_log_prob_gradient,
)
from models.diffusion.inpainting_unet import ImagePosterior, MaskedImageLatents
from models.diffusion.noise import sample_generator
from models.diffusion.schedule import NoiseSchedule
from models.diffusion.sigmas import noise_levels
from models.diffusion.solvers import dpmpp_2m_rows, euler_rows, unipc_rows
from models.diffusion.steps import (
    COEFFICIENT_NAMES,
    MULTISTEP_SAMPLERS,
    SAMPLER_NAMES,
    SIGMA_SAMPLERS,
    DdpmVariance,
    DynamicThreshold,
    SamplerName,
    StepCoefficients,
    forward_jump,
    reverse_step,
    solver_update,
    step_coefficients,
)
from models.diffusion.timesteps import (
    TIMESTEP_SPACINGS,
    TimestepSpacing,
    denoising_plan,
    diffusers_repaint_plan,
    repaint_plan,
    sdedit_start,
    timestep_sequence,
)

# What the network predicts: ε, v (`forward.py`) or x_0 itself ("sample", diffusers' name).
SamplerPrediction = PredictionType | Literal["sample"]
# How DDPM and DDIM steps are taken: ddserve's textbook form (its zoo), or the form of diffusers'
# DDPMScheduler / DDIMScheduler `step`, reproduced for models served from a diffusers config:
# 1. a DDIM step from t lands on ᾱ at t − ⌊T/S⌋, which is not the plan's next timestep for
#    ``trailing`` / ``linspace`` spacing when S does not divide T (the next network call is still at
#    the plan's next timestep; diffusers issues #11347, #12633, unfixed in 0.42);
# 2. DDIM keeps the network's ε after clipping x̂_0 (the pipelines' `use_clipped_model_output=False`)
#    instead of re-deriving it from the clipped x̂_0;
# 3. DDPM adds noise on every step from t > 0, the last one included (σ² = β' there with
#    `variance_type="fixed_large"`; β̃' = 0 with "fixed_small").
# 4. RePaint (inpainting) on DDPM / DDIM walks as `RePaintPipeline` does (diffusers has no RePaint
#    for the σ-space samplers, which keep the paper's form):
#    a. the levels of `timesteps.diffusers_repaint_plan`: each jump starts one step lower than in
#       the paper's code, the lowest from the clean image;
#    b. a jump from s up to the plan's next timestep t re-noises through ⌊T/S⌋ single steps, one
#       draw each, with β_t, β_{t+1}, …, β_{t+⌊T/S⌋−1} (`RePaintScheduler.undo_step` counts from t)
#       where q(x_t | x_s) takes β_{s+1} … β_t: the same when S = T, else the stride above t
#       rather than the one below it (a little more noise);
#    c. every reverse step draws one z, even when σ = 0, and uses it both as the step's noise and
#       for the known region's q(x_s | x_0) (`RePaintScheduler.step`), rather than one draw each.
# 5. The network is called at diffusers' own timesteps (`Transition.network_t`, float32): Euler's
#    fractional ``linspace`` points and Karras levels as they are, not rounded (`sigmas.py`).
# 6. Euler and Euler ancestral at ``linspace`` / ``trailing`` spacing start from
#    `init_noise_sigma` = σ_0 rather than √(σ_0² + 1) (diffusers' EulerDiscreteScheduler), i.e. in
#    the VP variable from x_T = σ_0/√(1 + σ_0²)·ε = √(1 − ᾱ_0)·ε instead of ε
#    (`SamplerSettings.initial_noise_scale`).
StepConvention = Literal["ddserve", "diffusers"]
STEP_CONVENTIONS: tuple[str, ...] = ("ddserve", "diffusers")
NetworkFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class SamplerSettings:
    """How one sample is drawn. Hashable: samples with equal settings share one precomputed plan."""

    sampler: SamplerName = "ddim"
    num_inference_steps: int = 50
    eta: float = 0.0  # DDIM only: 0 = deterministic, 1 = DDPM-like variance β̃
    timestep_spacing: TimestepSpacing = "leading"
    ddpm_variance: DdpmVariance = "beta_tilde"  # DDPM only: σ² = β̃ or β
    guidance_scale: float = 0.0  # classifier-free guidance w
    classifier_scale: float = 0.0  # classifier guidance s
    clip_denoised: bool = False  # clamp x̂_0 to [−1, 1] (pixel-space models)
    jump_length: int = 1  # RePaint resampling (inpainting only)
    jump_n_sample: int = 1
    # σ-space samplers only (euler, euler_ancestral, dpmpp_2m, dpmpp_2m_sde, unipc); the defaults
    # are those of diffusers' scheduler classes.
    use_karras_sigmas: bool = False  # Karras et al. 2022 levels instead of the spaced timesteps
    solver_order: int = 2  # dpmpp_2m, dpmpp_2m_sde, unipc: 1 or 2
    # A model's scheduler options (`scheduler_config.SchedulerOptions`, from its diffusers
    # `scheduler_config.json`); the defaults are ddserve's own zoo conventions.
    steps_offset: int = 0  # added to ``leading`` timesteps (Stable Diffusion 1.x: 1)
    set_alpha_to_one: bool = True  # DDIM: the last step goes to ᾱ = 1 (else to ᾱ_0, diffusers)
    clip_sample_range: float = 1.0  # with clip_denoised: clamp x̂_0 to [−range, range]
    # Dynamic thresholding of x̂_0 instead of clipping (`steps.DynamicThreshold`, Saharia et al. 2022).
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995  # the quantile of |x̂_0| taken as the bound s
    sample_max_value: float = 1.0  # the largest s
    convention: StepConvention = "ddserve"  # DDPM / DDIM: see `StepConvention`
    # dpmpp_2m(_sde) + Karras: floor the levels' timesteps instead of rounding them (diffusers'
    # DPMSolverMultistepScheduler with beta_schedule="squaredcos_cap_v2"; `sigmas.py`).
    truncate_karras_timesteps: bool = False
    strength: float = 1.0  # image-to-image (SDEdit): the tail of the plan the sample walks; 1 = all

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(
                f"unknown sampler {self.sampler!r}; expected one of {', '.join(SAMPLER_NAMES)}"
            )
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.num_inference_steps < 1:
            raise ValueError("num_inference_steps must be ≥ 1")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"unknown timestep spacing {self.timestep_spacing!r}; expected one of "
                f"{', '.join(TIMESTEP_SPACINGS)}"
            )
        if self.use_karras_sigmas and self.sampler not in SIGMA_SAMPLERS:
            raise ValueError(
                f"use_karras_sigmas applies to {', '.join(SIGMA_SAMPLERS)}, not {self.sampler!r}"
            )
        if self.steps_offset < 0:
            raise ValueError(f"steps_offset must be ≥ 0, got {self.steps_offset}")
        if self.convention not in STEP_CONVENTIONS:
            raise ValueError(
                f"unknown step convention {self.convention!r}; expected one of "
                f"{', '.join(STEP_CONVENTIONS)}"
            )
        if not self.clip_sample_range > 0.0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")
        if not 0.0 < self.dynamic_thresholding_ratio <= 1.0:
            raise ValueError(
                f"dynamic_thresholding_ratio must be in (0, 1], got {self.dynamic_thresholding_ratio}"
            )
        if not self.sample_max_value > 0.0:
            raise ValueError(f"sample_max_value must be > 0, got {self.sample_max_value}")
        if self.solver_order not in (1, 2):
            raise ValueError(f"solver_order must be 1 or 2, got {self.solver_order}")
        if self.jump_n_sample > 1 and self.sampler in MULTISTEP_SAMPLERS:
            single = [name for name in SAMPLER_NAMES if name not in MULTISTEP_SAMPLERS]
            raise ValueError(
                f"RePaint resampling (jump_n_sample > 1) needs a single-step sampler "
                f"({', '.join(single)}); {self.sampler!r} keeps a history of model outputs that "
                "a jump back to more noise would invalidate"
            )
        if self.strength != 1.0:
            sdedit_start(self.num_inference_steps, self.strength)  # ValueError if out of range
            if self.jump_n_sample > 1:
                raise ValueError("image-to-image (strength < 1) does not take RePaint's jumps")

    @property
    def start(self) -> int:
        """The step of the plan this sample starts at: 0, or SDEdit's t_start (module docstring)."""
        return 0 if self.strength == 1.0 else sdedit_start(self.num_inference_steps, self.strength)

    @property
    def multistep(self) -> bool:
        """Whether this sample keeps a history of model outputs (`solvers.py`)."""
        return self.sampler in MULTISTEP_SAMPLERS

    def plan(self, num_train_steps: int) -> list[int]:
        """The timesteps this sample visits, ending with −1 (see `timesteps.py`)."""
        sequence = timestep_sequence(
            num_train_steps, self.num_inference_steps, self.timestep_spacing, self.steps_offset
        )
        if self.jump_n_sample > 1:
            walk = diffusers_repaint_plan if self.diffusers_repaint else repaint_plan
            return walk(sequence, self.jump_length, self.jump_n_sample)
        return denoising_plan(sequence)

    def initial_noise_scale(self, alpha_bar_0: float) -> float:
        """x_T = scale · ε for a generated sample (strength 1) whose first level has ᾱ_0:
        √(1 − ᾱ_0) for diffusers' Euler classes at ``linspace`` / ``trailing`` spacing, whose
        `init_noise_sigma` is σ_0 instead of √(σ_0² + 1) (`StepConvention`, 6); else 1."""
        if (
            self.convention == "diffusers"
            and self.sampler in ("euler", "euler_ancestral")
            and self.timestep_spacing in ("linspace", "trailing")
            and self.strength == 1.0
        ):
            return math.sqrt(1.0 - alpha_bar_0)
        return 1.0

    @property
    def diffusers_repaint(self) -> bool:
        """Whether inpainting follows diffusers' `RePaintPipeline` (`StepConvention`, 4): the
        "diffusers" convention on the timestep samplers (ddpm, ddim)."""
        return self.convention == "diffusers" and self.sampler not in SIGMA_SAMPLERS


@dataclass(frozen=True)
class Transition:
    """One move of a plan: a reverse step (one network call at timestep t, towards s; s = −1 is the
    clean image) or a forward jump (RePaint, s > t). For σ-space samplers t is the network's
    integer timestep (`network_t` the exact one of the "diffusers" convention), and consecutive
    steps may share it (Karras levels rounded): `jump` tells them apart."""

    t: int
    s: int
    coefficients: torch.Tensor | None  # [K] float32 for reverse steps; None for jumps
    alpha_bar_t: float
    alpha_bar_s: float
    sigma: float = 0.0  # noise scale of a reverse step: z is drawn only when σ > 0
    jump: bool = False
    # A jump of diffusers' RePaint (`StepConvention`, 4b): the single-step β's it re-noises
    # through, one draw each. Empty: one draw of q(x_s | x_t).
    betas: tuple[float, ...] = ()
    # The timestep the network is called with, for the "diffusers" convention (`StepConvention`,
    # 5): diffusers' own, fractional for Euler's ``linspace`` points and Karras levels. None: t.
    network_t: float | None = None

    @property
    def is_reverse(self) -> bool:
        return not self.jump


class PlanCache:
    """Transitions per (settings, schedule): computed once, shared by every sample that uses them."""

    def __init__(self, schedule: NoiseSchedule, max_entries: int = 256) -> None:
        self.schedule = schedule
        self.max_entries = max_entries
        self._plans: dict[SamplerSettings, tuple[Transition, ...]] = {}

    def transitions(self, settings: SamplerSettings) -> tuple[Transition, ...]:
        cached = self._plans.get(settings)
        if cached is None:
            cached = self._build(settings)
            if len(self._plans) >= self.max_entries:
                self._plans.pop(next(iter(self._plans)))
            self._plans[settings] = cached
        return cached

    def _build(self, settings: SamplerSettings) -> tuple[Transition, ...]:
        if settings.sampler in SIGMA_SAMPLERS:
            return self._build_sigma_plan(settings)
        if settings.start > 0:  # SDEdit: the tail of the whole plan (single-step rows, no jumps)
            whole = self.transitions(dataclasses.replace(settings, strength=1.0))
            return whole[settings.start :]
        plan = settings.plan(self.schedule.num_timesteps)
        alpha_bar = self.schedule.alphas_cumprod_padded.tolist()  # index t + 1
        transitions = []
        for t, s in itertools.pairwise(plan):
            a_t, a_s = alpha_bar[t + 1], alpha_bar[s + 1]
            coefficients, sigma = None, 0.0
            if s < t:
                a_s = self._ddim_target_alpha_bar(settings, t, s, a_s)
                step = step_coefficients(
                    a_t,
                    a_s,
                    sampler=settings.sampler,
                    eta=settings.eta,
                    ddpm_variance=settings.ddpm_variance,
                    classifier_scale=settings.classifier_scale,
                    # diffusers' DDPM adds noise on every step from t > 0 (`StepConvention`, 3).
                    is_last=s == -1 and (settings.convention == "ddserve" or t == 0),
                )
                coefficients = torch.tensor(step.as_row(), dtype=torch.float32)
                sigma = step.sigma
            betas: tuple[float, ...] = ()
            if s > t and settings.diffusers_repaint:
                stride = self.schedule.num_timesteps // settings.num_inference_steps
                betas = tuple(self.schedule.betas[s : s + stride].tolist())
            network_t = float(t) if settings.convention == "diffusers" and s < t else None
            transitions.append(
                Transition(
                    t,
                    s,
                    coefficients,
                    a_t,
                    a_s,
                    sigma,
                    jump=s > t,
                    betas=betas,
                    network_t=network_t,
                )
            )
        return tuple(transitions)

    def _ddim_target_alpha_bar(
        self, settings: SamplerSettings, t: int, s: int, alpha_bar_s: float
    ) -> float:
        """ᾱ where a reverse step t → s lands. DDPM and ddserve's DDIM: ᾱ_s. Diffusers' DDIM
        (`convention="diffusers"`): ᾱ at t − ⌊T/S⌋, whatever the plan's next timestep. Either DDIM
        form's last step (below t = 0) lands on ᾱ = 1, or on ᾱ_0 with `set_alpha_to_one=False`
        (DDIMScheduler's `final_alpha_cumprod`)."""
        if settings.sampler != "ddim":
            return alpha_bar_s
        T = self.schedule.num_timesteps
        if settings.convention == "diffusers":
            s = t - T // settings.num_inference_steps
        if s >= 0:
            return float(self.schedule.alphas_cumprod[s])
        return 1.0 if settings.set_alpha_to_one else float(self.schedule.alphas_cumprod[0])

    def _build_sigma_plan(self, settings: SamplerSettings) -> tuple[Transition, ...]:
        """The σ-space samplers' plans: levels (`sigmas.py`), rows (`solvers.py`), RePaint jumps."""
        levels = noise_levels(
            self.schedule,
            settings.num_inference_steps,
            settings.timestep_spacing,
            euler=not settings.multistep,
            karras=settings.use_karras_sigmas,
            steps_offset=settings.steps_offset,
            diffusers_table=settings.convention == "diffusers",
            truncate=settings.truncate_karras_timesteps,
        )
        sigmas = levels.sigmas
        levels_name = (
            "Karras levels"
            if settings.use_karras_sigmas
            else f"{settings.timestep_spacing!r} spacing"
        )
        if settings.multistep and any(b >= a for a, b in itertools.pairwise(sigmas)):
            raise ValueError(
                f"{settings.num_inference_steps} steps ({levels_name}) "
                f"repeat a noise level of this {self.schedule.num_timesteps}-step schedule, which "
                f"{settings.sampler} cannot step over; use fewer steps"
            )
        scale, start = settings.classifier_scale, settings.start
        rows: list[StepCoefficients]
        if settings.sampler in ("euler", "euler_ancestral"):
            rows = euler_rows(
                levels, ancestral=settings.sampler == "euler_ancestral", classifier_scale=scale
            )[start:]
        elif settings.sampler == "unipc":
            rows = unipc_rows(
                levels, order=settings.solver_order, classifier_scale=scale, start=start
            )
        else:
            rows = dpmpp_2m_rows(
                levels,
                order=settings.solver_order,
                sde=settings.sampler == "dpmpp_2m_sde",
                classifier_scale=scale,
                start=start,
            )
        n = len(levels.timesteps)
        diffusers_t = settings.convention == "diffusers"
        reverse = [
            Transition(
                t=levels.timesteps[i],
                s=levels.timesteps[i + 1] if i + 1 < n else -1,
                coefficients=torch.tensor(rows[i - start].as_row(), dtype=torch.float32),
                alpha_bar_t=levels.alpha_bar(i),
                alpha_bar_s=levels.alpha_bar(i + 1),
                sigma=rows[i - start].sigma,
                network_t=levels.network_timesteps[i] if diffusers_t else None,
            )
            for i in range(start, n)
        ]
        if settings.jump_n_sample == 1:
            return tuple(reverse)
        # RePaint (single-step samplers only) over the levels' ranks r = n − 1 − i (descending
        # in noise like timesteps; −1 is level n, the clean image): a reverse pair repeats step i's
        # row, an upward pair is a forward jump from level i to a noisier level.
        walk = repaint_plan(
            list(range(n - 1, -1, -1)), settings.jump_length, settings.jump_n_sample
        )
        transitions = []
        for a, b in itertools.pairwise(walk):
            i, j = n - 1 - a, n - 1 - b
            if b < a:
                transitions.append(reverse[i])
            else:
                transitions.append(
                    Transition(
                        t=levels.timesteps[i],
                        s=levels.timesteps[j],
                        coefficients=None,
                        alpha_bar_t=levels.alpha_bar(i),
                        alpha_bar_s=levels.alpha_bar(j),
                        jump=True,
                    )
                )
        return tuple(transitions)


@dataclass
class Sample:
    """One image being sampled: its request, its noise stream and where it stands in its plan."""

    settings: SamplerSettings
    generator: torch.Generator
    cond: torch.Tensor | None = None  # one row of conditioning ([] class id, [L] tokens); None = ∅
    # The unconditional row of classifier-free guidance (a negative prompt's row, shaped like
    # cond); None = the model's ∅. Only a guided sample takes one.
    uncond: torch.Tensor | None = None
    class_label: int | None = None  # target of classifier guidance
    known: torch.Tensor | None = None  # [C, H, W] the image to inpaint (x_0 of the known region)
    mask: torch.Tensor | None = None  # [1 or C, H, W] 1 = keep, 0 = generate
    # [C, H, W] the starting noise ε (a pipeline's `latents=`), drawn from the generator when None;
    # x_T = ε, or `initial_noise_scale`·ε for diffusers' Euler at linspace / trailing spacing.
    x: torch.Tensor | None = None
    init_x0: torch.Tensor | None = None  # [C, H, W] image-to-image: the x_0 to start from (SDEdit)
    # Image-to-image from a posterior (an inpainting UNet's strength < 1): init_x0 is drawn from it
    # when the sample joins, before ε (`inpainting_unet.py`).
    init_posterior: ImagePosterior | None = None
    # An inpainting UNet's mask and masked image (`inpainting_unet.py`): drawn into `concat` when
    # the sample joins, right after x_T, and read beside x_t at every network call.
    masked_image: MaskedImageLatents | None = None
    keep_trajectory: bool = False
    keep_x0: bool = False  # keep the latest step's x̂_0 in `x0` (live previews)
    tag: Any = None  # the caller's handle (a job id, an index)
    # Filled in by the batch:
    transitions: tuple[Transition, ...] = ()
    position: int = 0
    trajectory: list[torch.Tensor] = field(default_factory=list)
    x0: torch.Tensor | None = None  # [C, H, W] with keep_x0: the data prediction of its last step
    concat: torch.Tensor | None = None  # [K, H, W] `masked_image` drawn: channels added to x_t

    @property
    def done(self) -> bool:
        return self.position >= len(self.transitions)

    @property
    def steps_total(self) -> int:
        """Network calls this sample needs in all."""
        return sum(1 for tr in self.transitions if tr.is_reverse)

    @property
    def steps_done(self) -> int:
        return sum(1 for tr in self.transitions[: self.position] if tr.is_reverse)

    @property
    def guided(self) -> bool:
        return self.settings.guidance_scale != 0.0

    @property
    def rows(self) -> int:
        """Rows of the network call this sample occupies (two with classifier-free guidance)."""
        return 2 if self.guided else 1


@dataclass(frozen=True)
class RowLayout:
    """What a step needs from the running set's membership alone, built once per change of it
    (`add`, `remove`, a retirement) rather than at every step."""

    rows: int  # rows of the network call: guided samples count twice
    cond: torch.Tensor | None  # [B, ...] conditioning rows (∅ where a sample has none)
    guided: torch.Tensor | None  # [G] long: samples with classifier-free guidance
    uncond: torch.Tensor | None  # [G, ...] their unconditional rows (each ∅ or its own negative)
    concat: torch.Tensor | None  # [B, K, H, W] channels read beside x_t (an inpainting UNet's)
    guidance_scale: torch.Tensor | None  # [G] their w
    clip: torch.Tensor | None  # [B] bool: clamp x̂_0 to [−1, 1] (or to its row's clip_range)
    clip_range: torch.Tensor | None  # [B] the clamp's bound, when some row's is not 1
    keep_eps: torch.Tensor | None  # [B] bool: bounded rows keeping the network's ε (diffusers DDIM)
    threshold: DynamicThreshold | None  # rows with dynamic thresholding (they are not clipped)
    jumps: bool  # some sample's plan has RePaint's forward jumps
    # Per sample: it draws one z at every step, for its step and its known region alike
    # (inpainting as diffusers' RePaint: `StepConvention`, 4c).
    shared_noise: tuple[bool, ...]


class DenoisingBatch:
    """The running set of samples of one model; see the module docstring.

    The batch keeps the samples' x_t stacked in one tensor [B, C, H, W] so that a step costs one
    network call plus a few elementwise operations, whatever the mix of settings.
    """

    def __init__(
        self,
        network: NetworkFn,
        schedule: NoiseSchedule,
        sample_shape: tuple[int, ...],  # (C, H, W)
        *,
        prediction_type: SamplerPrediction = "epsilon",
        null_condition: torch.Tensor | None = None,  # the ∅ row of a conditional network
        classifier: ClassifierFn | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        plan_cache: PlanCache | None = None,
    ) -> None:
        self.network = network
        self.schedule = schedule
        self.sample_shape = tuple(sample_shape)
        self.prediction_type = prediction_type
        self.null_condition = null_condition
        self.classifier = classifier
        self.device = torch.device(device)
        self.dtype = dtype
        self.plans = plan_cache or PlanCache(schedule)
        self.samples: list[Sample] = []
        self.x = torch.empty((0, *self.sample_shape), device=self.device, dtype=dtype)
        self.network_calls = 0
        # [3, B, C, H, W] x_last, m_{i−1}, m_{i−2} per row while some sample is multistep; else None.
        self.history: torch.Tensor | None = None
        self._layout: RowLayout | None = None  # None: membership changed since it was built

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def rows(self) -> int:
        """Rows of the next network call (guided samples count twice)."""
        return self.layout.rows

    @property
    def layout(self) -> RowLayout:
        if self._layout is None:
            self._layout = self._build_layout()
        return self._layout

    def _build_layout(self) -> RowLayout:
        samples = self.samples
        guided = [i for i, s in enumerate(samples) if s.guided]
        thresholded = [i for i, s in enumerate(samples) if s.settings.thresholding]
        clip = [s.settings.clip_denoised and not s.settings.thresholding for s in samples]
        clip_range = [s.settings.clip_sample_range for s in samples]
        keep_eps = [
            (s.settings.clip_denoised or s.settings.thresholding)
            and s.settings.sampler == "ddim"
            and s.settings.convention == "diffusers"
            for s in samples
        ]
        threshold = None
        if thresholded:
            threshold = DynamicThreshold(
                rows=torch.tensor(thresholded, dtype=torch.long, device=self.device),
                ratio=torch.tensor(
                    [samples[i].settings.dynamic_thresholding_ratio for i in thresholded],
                    dtype=torch.float64,
                ),
                max_value=torch.tensor(
                    [samples[i].settings.sample_max_value for i in thresholded],
                    dtype=torch.float64,
                    device=self.device,
                ),
            )
        cond = uncond = None
        null = self.null_condition
        # A network without a ∅ row (a diffusers class-conditional UNet) still takes its samples'
        # conditions: `add` admits such samples only all conditioned or all not.
        conditioned = any(s.cond is not None for s in samples)
        if samples and (null is not None or conditioned):
            rows = [null if s.cond is None else s.cond for s in samples]
            cond = torch.stack(rows).to(self.device)
        if null is not None and guided:
            negatives = [samples[i].uncond for i in guided]
            uncond = torch.stack([null if row is None else row for row in negatives])
            uncond = uncond.to(self.device)
        concat = None
        if samples and samples[0].concat is not None:  # `add`: all samples have it, or none
            concat = torch.stack([s.concat for s in samples]).to(self.device)
        return RowLayout(
            rows=len(samples) + len(guided),
            cond=cond,
            concat=concat,
            guided=torch.tensor(guided, dtype=torch.long, device=self.device) if guided else None,
            uncond=uncond,
            guidance_scale=(
                torch.tensor([samples[i].settings.guidance_scale for i in guided])
                if guided
                else None
            ),
            clip=torch.tensor(clip, device=self.device) if any(clip) else None,
            clip_range=(
                torch.tensor(clip_range, dtype=torch.float64, device=self.device)
                if any(r != 1.0 for r in clip_range)
                else None
            ),
            keep_eps=torch.tensor(keep_eps, device=self.device) if any(keep_eps) else None,
            threshold=threshold,
            jumps=any(s.settings.jump_n_sample > 1 for s in samples),
            shared_noise=tuple(
                s.known is not None and s.settings.diffusers_repaint for s in samples
            ),
        )

    # --- membership -----------------------------------------------------------------------------
    def add(self, samples: Sequence[Sample]) -> None:
        """Admit samples between steps: validate, draw x_T from each one's own stream, append.

        All or nothing: every sample is validated and planned before any joins or draws, so a
        ValueError (a bad setting, a step count the schedule cannot lay out) leaves the running
        set — and the samples' noise streams — as they were."""
        plans = []
        if self.null_condition is None:
            mixed = {s.cond is None for s in [*self.samples, *samples]}
            if len(mixed) > 1:
                raise ValueError(
                    "this network has no ∅ condition: a batch's samples are all conditioned or "
                    "all unconditioned"
                )
        extended = {s.masked_image is None for s in [*self.samples, *samples]}
        if len(extended) > 1:
            raise ValueError(
                "an inpainting UNet reads a mask and a masked image on every row: a batch's "
                "samples all have them or none does"
            )
        for sample in samples:
            self._validate(sample)
            plans.append(self.plans.transitions(sample.settings))
        new_rows = []
        for sample, transitions in zip(samples, plans, strict=True):
            sample.transitions = transitions
            sample.position = 0
            if sample.x is None:
                if sample.init_posterior is not None and sample.init_x0 is None:
                    # Before ε, as the pipeline encodes the image before it draws its latents.
                    sample.init_x0 = sample.init_posterior.draw(sample.generator)
                sample.x = self._starting_point(sample, transitions[0])
            elif sample.settings.strength == 1.0:
                sample.x = self._scaled_start(sample.settings, transitions[0], sample.x)
            if sample.masked_image is not None and sample.concat is None:
                # After x_T, as the pipeline samples the masked image's posterior after its latents.
                sample.concat = sample.masked_image.draw(sample.generator)
            row = sample.x.to(device=self.device, dtype=self.dtype)
            if sample.keep_trajectory:
                sample.trajectory = [row.detach().to("cpu", copy=True)]
            new_rows.append(row)
            self.samples.append(sample)
        if new_rows:
            self.x = torch.cat([self.x, torch.stack(new_rows)])
            self._layout = None
            self._sync_history(len(new_rows))

    def _starting_point(self, sample: Sample, first: Transition) -> torch.Tensor:
        """x at the sample's first step, from its own stream: x_T = ε, or for image-to-image
        (strength < 1) SDEdit's x_{t_0} = √ᾱ_{t_0} x_0 + √(1 − ᾱ_{t_0}) ε (module docstring)."""
        eps = torch.randn(self.sample_shape, generator=sample.generator)  # [C, H, W]
        if sample.settings.strength == 1.0:
            return self._scaled_start(sample.settings, first, eps)
        assert sample.init_x0 is not None  # _validate
        x0 = sample.init_x0.to(eps)
        return math.sqrt(first.alpha_bar_t) * x0 + math.sqrt(1.0 - first.alpha_bar_t) * eps

    @staticmethod
    def _scaled_start(
        settings: SamplerSettings, first: Transition, eps: torch.Tensor
    ) -> torch.Tensor:
        """x_T of a generated sample from its starting noise ε (`initial_noise_scale`)."""
        scale = settings.initial_noise_scale(first.alpha_bar_t)
        return eps if scale == 1.0 else scale * eps

    def _sync_history(self, added: int) -> None:
        """Zero history rows for `added` new samples; none at all while no sample is multistep."""
        if not any(s.settings.multistep for s in self.samples):
            self.history = None
        elif self.history is None:
            self.history = torch.zeros((3, *self.x.shape), device=self.device, dtype=self.dtype)
        elif added:
            pad = self.history.new_zeros((3, added, *self.sample_shape))
            self.history = torch.cat([self.history, pad], dim=1)

    def remove(self, keep: Callable[[Sample], bool]) -> list[Sample]:
        """Drop the samples for which keep(sample) is False (canceled, past deadline); return them."""
        flags = [keep(s) for s in self.samples]
        if all(flags):
            return []
        removed = [s for s, k in zip(self.samples, flags, strict=True) if not k]
        self._retain(flags)
        return removed

    def _retain(self, flags: list[bool]) -> None:
        """Keep the flagged rows; the others take their current x_t with them (on the CPU)."""
        for i, (sample, kept) in enumerate(zip(self.samples, flags, strict=True)):
            if not kept:
                sample.x = self.x[i].detach().cpu()
        index = torch.tensor([i for i, k in enumerate(flags) if k], dtype=torch.long)
        self.x = self.x.index_select(0, index.to(self.device))
        if self.history is not None:
            self.history = self.history.index_select(1, index.to(self.device))
        self.samples = [s for s, k in zip(self.samples, flags, strict=True) if k]
        self._layout = None
        self._sync_history(0)

    def _validate(self, sample: Sample) -> None:
        if sample.guided and self.null_condition is None:
            raise ValueError(
                "classifier-free guidance needs a conditional network (null_condition)"
            )
        if sample.uncond is not None:
            if not sample.guided:
                raise ValueError(
                    "an unconditional row (negative prompt) needs classifier-free guidance "
                    "(guidance_scale ≠ 0), else it would be ignored"
                )
            assert self.null_condition is not None  # a guided sample was checked above
            if sample.uncond.shape != self.null_condition.shape:
                raise ValueError(
                    f"the unconditional row has shape {tuple(sample.uncond.shape)}, expected "
                    f"{tuple(self.null_condition.shape)} (that of the model's ∅)"
                )
        if sample.settings.classifier_scale != 0.0 and (
            self.classifier is None or sample.class_label is None
        ):
            raise ValueError("classifier guidance needs a classifier and a class label")
        if (sample.known is None) != (sample.mask is None):
            raise ValueError("inpainting needs both the known image and the mask")
        if sample.x is not None and tuple(sample.x.shape) != self.sample_shape:
            raise ValueError(f"x_T has shape {tuple(sample.x.shape)}, expected {self.sample_shape}")
        start = sample.init_x0 if sample.init_x0 is not None else sample.init_posterior
        if sample.settings.strength != 1.0 and start is None:
            raise ValueError(
                "image-to-image (strength < 1) needs the image to start from (init_x0)"
            )
        if sample.init_posterior is not None and sample.settings.strength == 1.0:
            raise ValueError("init_posterior is image-to-image's start: it needs strength < 1")
        if sample.masked_image is not None:
            grid = tuple(sample.masked_image.mean.shape[1:])
            if grid != self.sample_shape[1:]:
                raise ValueError(
                    f"the masked image's latents are {grid}, expected {self.sample_shape[1:]}"
                )
            if sample.known is not None or sample.settings.jump_n_sample > 1:
                raise ValueError("an inpainting UNet inpaints by itself: no RePaint with it")
        if sample.init_x0 is not None and tuple(sample.init_x0.shape) != self.sample_shape:
            raise ValueError(
                f"init_x0 has shape {tuple(sample.init_x0.shape)}, expected {self.sample_shape}"
            )
        if (
            sample.init_posterior is not None
            and tuple(sample.init_posterior.mean.shape) != self.sample_shape
        ):
            raise ValueError(
                f"init_posterior has shape {tuple(sample.init_posterior.mean.shape)}, expected "
                f"{self.sample_shape}"
            )

    # --- one step -------------------------------------------------------------------------------
    def step(self) -> list[Sample]:
        """Advance every sample by one network call; return the samples that finished."""
        if not self.samples:
            return []
        self._apply_forward_jumps()
        transitions = [s.transitions[s.position] for s in self.samples]
        t = torch.tensor([tr.t for tr in transitions], dtype=torch.long, device=self.device)  # [B]
        coefficients = torch.stack([tr.coefficients for tr in transitions])  # [B, K]
        coefficients = coefficients.to(device=self.device, dtype=self.dtype)
        eps, x0 = self._guided_prediction(self._network_timesteps(transitions, t), coefficients)
        grad = self._classifier_gradient(t)
        layout = self.layout
        noise = self._noise(
            [tr.sigma > 0 or one for tr, one in zip(transitions, layout.shared_noise, strict=True)]
        )
        x_prev, x0, _ = reverse_step(
            self.x,
            eps,
            coefficients,
            noise,
            grad,
            layout.clip,
            x0,
            layout.clip_range,
            layout.keep_eps,
            layout.threshold,
        )
        if self.history is not None:
            x_prev, self.history = solver_update(self.x, x_prev, x0, coefficients, self.history)
        x_prev = self._merge_known_region(x_prev, transitions, noise)
        self.x = x_prev
        for i, sample in enumerate(self.samples):
            sample.position += 1
            if sample.keep_trajectory:
                # A copy: on the CPU a view would alias self.x, which RePaint's jumps change in place.
                sample.trajectory.append(x_prev[i].detach().to("cpu", copy=True))
            if sample.keep_x0:  # a view of this step's x̂_0 (a new tensor each step: never aliased)
                sample.x0 = x0[i].detach()
        return self._retire_finished()

    def _network_timesteps(self, transitions: list[Transition], t: torch.Tensor) -> torch.Tensor:
        """[B] the timesteps of the network call: t (long), or float32 when some row follows
        diffusers' timesteps (`StepConvention`, 5) — the others' integers are exact in float32."""
        if all(tr.network_t is None for tr in transitions):
            return t
        exact = [tr.t if tr.network_t is None else tr.network_t for tr in transitions]
        return torch.tensor(exact, dtype=torch.float32, device=self.device)

    def _apply_forward_jumps(self) -> None:
        """RePaint: samples whose next move is upward are re-noised until a reverse step is next."""
        if not self.layout.jumps:  # only RePaint plans (jump_n_sample > 1) move upward
            return
        for i, sample in enumerate(self.samples):
            while not sample.done and not sample.transitions[sample.position].is_reverse:
                tr = sample.transitions[sample.position]
                if tr.betas:  # diffusers' undo_step: one single step and one draw per β
                    for beta in tr.betas:
                        z = torch.randn(self.sample_shape, generator=sample.generator).to(self.x)
                        self.x[i] = forward_jump(self.x[i], 1.0, 1.0 - beta, z)
                else:
                    z = torch.randn(self.sample_shape, generator=sample.generator).to(self.x)
                    self.x[i] = forward_jump(self.x[i], tr.alpha_bar_t, tr.alpha_bar_s, z)
                sample.position += 1

    def _guided_prediction(
        self, t: torch.Tensor, coefficients: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ε and, for v / x_0 predictions, x̂_0 straight from the guided output (else None).

        Classifier-free guidance is linear, so it is applied to the network's output whatever it
        predicts; the conversions use each row's exact ᾱ_t from its coefficients (a σ-space
        sampler's level may lie between the table's timesteps)."""
        output = self._guided_output(t)
        if self.prediction_type == "epsilon":
            return output, None
        n = output.dim()
        sqrt_a = coefficients[:, COEFFICIENT_NAMES.index("sqrt_alpha_bar_t")]
        sqrt_1ma = coefficients[:, COEFFICIENT_NAMES.index("sqrt_one_minus_alpha_bar_t")]
        sqrt_a = sqrt_a.reshape(-1, *([1] * (n - 1)))
        sqrt_1ma = sqrt_1ma.reshape(-1, *([1] * (n - 1)))
        if self.prediction_type == "v":  # v = √ᾱ ε − √(1 − ᾱ) x_0
            return sqrt_1ma * self.x + sqrt_a * output, sqrt_a * self.x - sqrt_1ma * output
        if self.prediction_type == "sample":
            return (self.x - sqrt_a * output) / sqrt_1ma, output
        raise ValueError(f"unknown prediction_type {self.prediction_type!r}")

    def _guided_output(self, t: torch.Tensor) -> torch.Tensor:
        """One network call over all rows plus an unconditional copy of each guided row.

        The copy of guided sample i is conditioned on its own ∅'_i (its negative prompt, else the
        model's ∅), so ε̃_i = ε(x_i, ∅'_i) + s_i·(ε(x_i, c_i) − ε(x_i, ∅'_i)) — diffusers'
        `negative_prompt` — while every sample still shares the one call."""
        layout = self.layout
        index, cond = layout.guided, layout.cond
        x_in, t_in, cond_in, concat = self.x, t, cond, layout.concat
        if index is not None:
            assert cond is not None and layout.uncond is not None  # guided ⇒ null_condition
            x_in = torch.cat([self.x, self.x.index_select(0, index)])
            t_in = torch.cat([t, t.index_select(0, index)])
            cond_in = torch.cat([cond, layout.uncond])  # [B + G, ...]
            if concat is not None:  # the unconditional row reads the same mask and image
                concat = torch.cat([concat, concat.index_select(0, index)])
        if concat is not None:
            x_in = torch.cat([x_in, concat.to(x_in)], dim=1)  # [B + G, C + K, H, W]
        output = self.network(x_in, t_in, cond_in)
        self.network_calls += 1
        out = output[: len(self.samples)]
        if index is not None:
            guided = classifier_free_guidance(
                out.index_select(0, index), output[len(self.samples) :], layout.guidance_scale
            )
            out = out.index_copy(0, index, guided)
        return out

    def _classifier_gradient(self, t: torch.Tensor) -> torch.Tensor | None:
        rows = [i for i, s in enumerate(self.samples) if s.settings.classifier_scale != 0.0]
        if not rows:
            return None
        assert self.classifier is not None
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        labels = torch.tensor([self.samples[i].class_label for i in rows], device=self.device)
        g = classifier_log_prob_gradient(
            self.classifier, self.x.index_select(0, index), t.index_select(0, index), labels
        )
        return torch.zeros_like(self.x).index_copy(0, index, g.to(self.x))

    def _noise(self, needed: list[bool]) -> torch.Tensor | None:
        """z for the rows that need it, each from its own stream; zeros elsewhere (not drawn)."""
        rows = [i for i, n in enumerate(needed) if n]
        if not rows:
            return None
        noise = torch.zeros((len(self.samples), *self.sample_shape))
        for i in rows:
            # In place on the row: the same draws as torch.randn(shape, generator), without a
            # temporary and a copy (a quarter of a step's bookkeeping at 64 rows).
            noise[i].normal_(generator=self.samples[i].generator)
        return noise.to(device=self.device, dtype=self.dtype)

    def _merge_known_region(
        self, x_prev: torch.Tensor, transitions: list[Transition], noise: torch.Tensor | None
    ) -> torch.Tensor:
        """RePaint: x_s = m ⊙ x_s^known + (1 − m) ⊙ x_s^unknown, x_s^known ~ q(x_s | x_0), with
        a z of its own, or this step's `noise` row for diffusers' RePaint (`StepConvention`, 4c)."""
        rows = [i for i, s in enumerate(self.samples) if s.known is not None]
        if not rows:
            return x_prev
        x_prev = x_prev.clone()
        shared = self.layout.shared_noise
        for i in rows:
            sample, tr = self.samples[i], transitions[i]
            known = sample.known.to(x_prev)
            if shared[i]:
                assert noise is not None  # `step` drew this row's z
                known = tr.alpha_bar_s**0.5 * known + (1.0 - tr.alpha_bar_s) ** 0.5 * noise[i]
            elif tr.s >= 0:
                z = torch.randn(self.sample_shape, generator=sample.generator).to(x_prev)
                known = tr.alpha_bar_s**0.5 * known + (1.0 - tr.alpha_bar_s) ** 0.5 * z
            mask = sample.mask.to(x_prev)
            x_prev[i] = mask * known + (1.0 - mask) * x_prev[i]
        return x_prev

    def _retire_finished(self) -> list[Sample]:
        flags = [not s.done for s in self.samples]
        if all(flags):
            return []
        finished = [s for s, k in zip(self.samples, flags, strict=True) if not k]
        self._retain(flags)
        return finished


def sample(
    network: NetworkFn,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,  # [B, C, H, W]
    settings: SamplerSettings | Sequence[SamplerSettings] = SamplerSettings(),
    *,
    cond: torch.Tensor | None = None,  # [B, ...] conditioning rows (None = unconditional network)
    null_condition: torch.Tensor | None = None,  # the ∅ row, for classifier-free guidance
    uncond: Sequence[torch.Tensor | None] | None = None,  # per row: its own ∅' (negative prompt)
    prediction_type: SamplerPrediction = "epsilon",
    classifier: ClassifierFn | None = None,
    class_labels: Sequence[int] | None = None,  # per row, for classifier guidance
    known: torch.Tensor | None = None,  # [B, C, H, W] images to inpaint
    mask: torch.Tensor | None = None,  # [B, 1 or C, H, W] 1 = keep
    init_x0: torch.Tensor | None = None,  # [B, C, H, W] image-to-image: the images to start from
    generators: Sequence[torch.Generator] | None = None,  # per row; default streams (0, i)
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Draw x_0 from x_T with each row's own settings: DDPM, DDIM, guidance, RePaint, SDEdit.

    A row whose settings have strength < 1 starts from its `init_x0` image noised by its own
    generator (module docstring) and does not use its x_T row; the others start from x_T.
    Returns x_0 [B, C, H, W] in x_T's dtype and device, and with `return_trajectory` also the list of
    x_t per row ([steps + 1, C, H, W] each, on the CPU).
    """
    batch = x_T.shape[0]
    per_row = [settings] * batch if isinstance(settings, SamplerSettings) else list(settings)
    if len(per_row) != batch:
        raise ValueError(f"{len(per_row)} settings for {batch} samples")
    gens = (
        list(generators)
        if generators is not None
        else [sample_generator(0, i) for i in range(batch)]
    )
    engine = DenoisingBatch(
        network,
        schedule,
        tuple(x_T.shape[1:]),
        prediction_type=prediction_type,
        null_condition=null_condition,
        classifier=classifier,
        device=x_T.device,
        dtype=x_T.dtype,
    )
    samples = [
        Sample(
            settings=per_row[i],
            generator=gens[i],
            cond=None if cond is None else cond[i],
            uncond=None if uncond is None else uncond[i],
            class_label=None if class_labels is None else int(class_labels[i]),
            known=None if known is None else known[i],
            mask=None if mask is None else mask[i],
            init_x0=None if init_x0 is None else init_x0[i],
            x=x_T[i] if per_row[i].strength == 1.0 else None,
            keep_trajectory=return_trajectory,
            tag=i,
        )
        for i in range(batch)
    ]
    engine.add(samples)
    while len(engine):
        engine.step()
    x0 = torch.stack([s.x for s in samples]).to(x_T)
    if return_trajectory:
        return x0, [torch.stack(s.trajectory) for s in samples]
    return x0
