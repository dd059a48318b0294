"""Parity: the σ-space samplers on an imported Stable Diffusion pipeline, at every timestep
spacing, vs diffusers' `StableDiffusionPipeline` with the matching scheduler class (tiny random
components, `tests/tiny_sd.py`; SD 1.x's config: scaled_linear, steps_offset 1).

Two things differ between the spacings in diffusers' Euler classes and are reproduced here:
- the starting noise: `init_noise_sigma` is σ_max at ``linspace`` / ``trailing`` spacing and
  √(σ_max² + 1) at ``leading`` (in ddserve's VP variable: x_T = √(1 − ᾱ_0)·ε, else ε);
- the network's timestep: Euler's ``linspace`` points and Karras levels are fractional, and the
  UNet is called at them (`scheduler.timesteps` float32), not at their rounding.
The multistep solvers (`init_noise_sigma` = 1, integer timesteps) are checked alongside.

Same noise: the pipeline gets one generator per row, `sample_generator(SEED, i)`, from which it
draws x_T and then Euler ancestral's step noise; ddserve's sample i draws from the same stream.
Latents (`output_type="latent"`) within 1e-4; the images differ per prompt. Before the fix the
Euler classes at ``linspace`` / ``trailing`` were 0.11–0.17 away (``leading``: 3–4e-5)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ddserve.params import guidance_weight
from models.diffusers_format.text import CrossAttentionUNet, PromptEncoder
from models.diffusion.noise import sample_generator
from models.diffusion.sampler import DenoisingBatch, Sample, SamplerSettings
from models.diffusion.schedule import NoiseSchedule
from models.diffusion.scheduler_config import from_diffusers
from tests.tiny_sd import tiny_sd_pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

TOLERANCE = 1e-4
# Guidance amplifies the float32 rounding of the two branches: at 7.5 the gaps were 0.7–1.3e-4 on
# latents of magnitude ~50 (2e-6 relative), at 2 they are ≤ 5e-5.
GUIDANCE = 2.0
PROMPTS = ["a red circle", "a blue dog"]
NEGATIVES = ["green", None]  # None: the pipeline's "" (ddserve's ∅)
SEED = 23
STEPS = 7  # does not divide 1000: ``linspace`` points are fractional, ``trailing`` ties round

EULER = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
MULTISTEP = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
SPACINGS = ("linspace", "leading", "trailing")
CASES = [
    *[(scheduler, spacing, False) for scheduler in EULER + MULTISTEP for spacing in SPACINGS],
    *[
        (scheduler, spacing, True)
        for scheduler in ("EulerDiscreteScheduler", *MULTISTEP)  # EulerAncestral has no Karras
        for spacing in ("linspace", "trailing")
    ],
]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    torch.set_num_threads(1)
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd-spacing"))


def with_scheduler(pipe: Any, scheduler: str, spacing: str, karras: bool, **extra: Any) -> Any:
    config = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
    config["timestep_spacing"] = spacing
    config.update(extra)
    if karras:
        config["use_karras_sigmas"] = True
    pipe = diffusers.StableDiffusionPipeline(
        **{**pipe.components, "scheduler": getattr(diffusers, scheduler).from_config(config)}
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ddserve_latents(pipe: Any, steps: int = STEPS) -> torch.Tensor:
    """The prompts' latents from ddserve's sampler on the pipeline's UNet and scheduler config,
    each sample drawing x_T (and any step noise) from its own stream."""
    schedule, options = from_diffusers(dict(pipe.scheduler.config))
    settings = options.settings(None, steps, guidance_scale=guidance_weight(GUIDANCE))
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    batch = DenoisingBatch(
        CrossAttentionUNet(pipe.unet),
        schedule,
        (4, 8, 8),
        prediction_type=options.prediction_type,
        null_condition=encoder.null_condition(),
    )
    samples = [
        Sample(
            settings,
            sample_generator(SEED, i),
            cond=encoder.rows([prompt])[0],
            uncond=None if NEGATIVES[i] is None else encoder.rows([NEGATIVES[i]])[0],
        )
        for i, prompt in enumerate(PROMPTS)
    ]
    batch.add(samples)
    with torch.no_grad():
        while len(batch):
            batch.step()
    return torch.stack([s.x for s in samples])


def pipeline_latents(pipe: Any, steps: int = STEPS) -> torch.Tensor:
    return pipe(
        prompt=PROMPTS,
        negative_prompt=[n or "" for n in NEGATIVES],
        height=16,
        width=16,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        generator=[sample_generator(SEED, i) for i in range(len(PROMPTS))],
        output_type="latent",
    ).images


@pytest.mark.parametrize(("scheduler", "spacing", "karras"), CASES)
def test_sigma_samplers_match_the_pipeline_at_every_spacing(
    pipe: Any, scheduler: str, spacing: str, karras: bool
) -> None:
    pipe = with_scheduler(pipe, scheduler, spacing, karras)
    theirs = pipeline_latents(pipe)
    mine = ddserve_latents(pipe)
    gap = (mine - theirs).abs().max().item()
    print(f"{scheduler} {spacing} karras={karras}: max |ddserve − diffusers| = {gap:.2e}")
    assert gap <= TOLERANCE
    assert (mine[0] - mine[1]).abs().mean() > 1e-2


# Karras levels on the cosine schedule (`sigmas.py`): diffusers' DPM-Solver++ floors their
# timesteps and runs only where its plan's first timestep is not repeated (S ≤ 3 of 1000), UniPC
# rounds them (S = 5 runs). σ_max is 2e4 here and the random UNet's x̂_0 = x̃ − σ·ε̂ reaches
# |latent| ≈ 7e4, where one float32 ulp is 8e-3 and diffusers works on x̃ = x/α of that size: so the
# bound is relative, 1e-6 of the largest latent (a few ulps). Measured after the fix: 1.1–4.5e-7;
# before it (UNet at 999 for diffusers' 998, Euler timesteps up to 0.03 away): Euler 6.3–6.7e-6,
# DPM-Solver++ 1.6e-2, UniPC 7.4e-6 (Euler at leading: 3.9e-6).
COSINE_RELATIVE = 1e-6
COSINE_KARRAS = [
    ("EulerDiscreteScheduler", "linspace", 7),
    ("EulerDiscreteScheduler", "trailing", 7),
    ("EulerDiscreteScheduler", "leading", 7),
    ("DPMSolverMultistepScheduler", "linspace", 2),
    ("DPMSolverMultistepScheduler", "trailing", 3),
    ("UniPCMultistepScheduler", "linspace", 5),
]


@pytest.mark.parametrize(("scheduler", "spacing", "steps"), COSINE_KARRAS)
def test_karras_levels_on_the_cosine_schedule_match_the_pipeline(
    pipe: Any, scheduler: str, spacing: str, steps: int
) -> None:
    pipe = with_scheduler(pipe, scheduler, spacing, True, beta_schedule="squaredcos_cap_v2")
    theirs = pipeline_latents(pipe, steps)
    mine = ddserve_latents(pipe, steps)
    gap = (mine - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    print(f"{scheduler} {spacing} cosine karras S={steps}: max |ddserve − diffusers| = {gap:.2e}")
    print(f"  relative to max |latent| = {scale:.2e}: {gap / scale:.2e}")
    assert gap <= COSINE_RELATIVE * scale
    assert (mine[0] - mine[1]).abs().mean() > 1e-2


def test_a_call_with_diffusers_rows_gets_float_timesteps_exact_for_integer_rows() -> None:
    """Euler ``linspace`` rows of a diffusers model call the network at fractional float32
    timesteps; DDIM rows in the same call keep their integers exactly; a batch of ddserve's own
    rows still gets long timesteps, at the rounded points."""
    seen: list[torch.Tensor] = []

    def network(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        seen.append(t.clone())
        return 0.1 * x

    schedule = NoiseSchedule.create("linear", 1000)
    euler = SamplerSettings("euler", 7, timestep_spacing="linspace", convention="diffusers")
    ddim = SamplerSettings("ddim", 7, timestep_spacing="linspace", convention="diffusers")
    batch = DenoisingBatch(network, schedule, (1, 2, 2))
    batch.add([Sample(euler, sample_generator(0, 0)), Sample(ddim, sample_generator(0, 1))])
    batch.step()
    assert seen[-1].dtype == torch.float32
    assert seen[-1].tolist() == [999.0, 999.0]
    batch.step()
    assert seen[-1].tolist() == [pytest.approx(832.5), 832.0]  # 999·5/6 vs its rounding
    zoo = DenoisingBatch(network, schedule, (1, 2, 2))
    zoo.add(
        [Sample(SamplerSettings("euler", 7, timestep_spacing="linspace"), sample_generator(0, 0))]
    )
    zoo.step()
    zoo.step()
    assert seen[-1].dtype == torch.long and seen[-1].tolist() == [832]


@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_starts_from_diffusers_init_noise_sigma(spacing: str) -> None:
    """x_T = √(1 − ᾱ_0)·ε (σ_0·ε in x̃ = x/α) for diffusers' Euler at linspace / trailing, ε at
    leading and for ddserve's own convention; the same for a given ε (a pipeline's `latents=`)."""
    schedule = NoiseSchedule.create("scaled_linear", 1000)
    shape = (1, 2, 2)
    for convention in ("diffusers", "ddserve"):
        settings = SamplerSettings("euler", 5, timestep_spacing=spacing, convention=convention)
        batch = DenoisingBatch(lambda x, t, c: x, schedule, shape)
        eps = torch.randn(shape, generator=sample_generator(1, 0))
        drawn, given = (
            Sample(settings, sample_generator(1, 0)),
            Sample(settings, sample_generator(1, 0), x=eps),
        )
        batch.add([drawn, given])
        alpha_bar_0 = drawn.transitions[0].alpha_bar_t
        scaled = convention == "diffusers" and spacing != "leading"
        want = (1.0 - alpha_bar_0) ** 0.5 * eps if scaled else eps
        assert torch.allclose(drawn.x, want, rtol=0, atol=1e-7)
        assert torch.allclose(given.x, want, rtol=0, atol=1e-7)
