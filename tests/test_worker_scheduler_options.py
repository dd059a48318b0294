"""The worker builds each sample's settings from its model's scheduler options (`execute._sampler_settings`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ddserve.params import KARRAS_SAMPLERS, ORDER_SAMPLERS
from ddserve.spec import GenerateSpec
from models.diffusion.sampler import PlanCache, SamplerSettings
from models.diffusion.schedule import NoiseSchedule
from models.diffusion.scheduler_config import SchedulerOptions, from_diffusers
from workers.errors import InvalidJobRequest
from workers.execute import _sampler_settings


def _model(schedule: NoiseSchedule, options: SchedulerOptions) -> SimpleNamespace:
    """What `_sampler_settings` reads of a `DiffusionModel`."""
    return SimpleNamespace(
        name="m",
        schedule=schedule,
        entry=SimpleNamespace(samplers=[]),
        null_condition=None,
        classifier=None,
        scheduler=options,
    )


def _spec(sampler: str, steps: int, clip: bool = True) -> GenerateSpec:
    """A resolved spec; the gateway fills the solver options of the samplers that take them."""
    return GenerateSpec(
        model="m",
        n=1,
        sampler=sampler,
        num_inference_steps=steps,
        eta=0.0,
        clip_denoised=clip,
        seed=1,
        use_karras_sigmas=False if sampler in KARRAS_SAMPLERS else None,
        solver_order=2 if sampler in ORDER_SAMPLERS else None,
    )


def test_zoo_model_settings_are_unchanged() -> None:
    model = _model(NoiseSchedule.create("linear", 1000), SchedulerOptions())
    for clip in (True, False):
        assert _sampler_settings(_spec("ddim", 20, clip), model) == SamplerSettings(
            "ddim", 20, clip_denoised=clip
        )
    assert _sampler_settings(_spec("dpmpp_2m", 20), model) == SamplerSettings(
        "dpmpp_2m", 20, clip_denoised=True
    )


def test_diffusers_model_settings_follow_its_config() -> None:
    schedule, options = from_diffusers(
        {
            "_class_name": "DDIMScheduler",
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
        }
    )
    model = _model(schedule, options)
    ddim = _sampler_settings(_spec("ddim", 50), model)
    assert (ddim.convention, ddim.steps_offset, ddim.set_alpha_to_one) == ("diffusers", 1, False)
    assert not ddim.clip_denoised  # the config's clip_sample, not the spec's default
    assert not _sampler_settings(_spec("euler", 50), model).clip_denoised
    # The spec's solver options (the gateway resolves them) win over the model's.
    karras = _spec("euler", 50).model_copy(update={"use_karras_sigmas": True})
    assert _sampler_settings(karras, model).use_karras_sigmas
    # 1000 leading steps shifted by 1 would call timestep 1000: refused when planned (a ValueError
    # fails the job as invalid_request, workers.errors).
    with pytest.raises(ValueError, match="steps_offset"):
        _sampler_settings(_spec("ddim", 1000), model).plan(1000)
    with pytest.raises(InvalidJobRequest, match="num_inference_steps"):
        _sampler_settings(_spec("ddim", 1001), model)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_cosine_karras_requests_follow_diffusers_and_plan_where_diffusers_fails(sampler) -> None:
    """A cosine-schedule model asked for Karras levels by the request: DPM-Solver++ floors their
    timesteps as diffusers' DPMSolverMultistepScheduler would (UniPC rounds), and 20 steps — where
    diffusers' own `step` fails on the repeated first timestep (`sigmas.py`) — plan without error:
    the job is served, not failed."""
    schedule, options = from_diffusers(
        {"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "squaredcos_cap_v2"}
    )
    karras = _spec(sampler, 20).model_copy(update={"use_karras_sigmas": True})
    settings = _sampler_settings(karras, _model(schedule, options))
    assert settings.use_karras_sigmas
    assert settings.truncate_karras_timesteps == (sampler != "unipc")
    steps = PlanCache(schedule).transitions(settings)
    first = 998.0 if sampler != "unipc" else 999.0
    assert [tr.network_t for tr in steps[:2]] == [first, first]  # repeated, σ's distinct
    assert steps[0].alpha_bar_t < steps[1].alpha_bar_t
