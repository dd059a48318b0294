"""The σ-space samplers (euler, euler_ancestral, dpmpp_2m, dpmpp_2m_sde, unipc) configured from a
diffusers `scheduler_config.json`, and a model's samples mixed in one batch.

Parity: as in `test_scheduler_config.py`, ddserve runs `from_diffusers(config)` and
`SchedulerOptions.settings(...)`, diffusers `<Class>.from_config(config)` of the same dict, both
driven by `FakeNetwork` from the same starting noise x_T (a pipeline's `latents=`). The Euler
classes work on x̃ = x/α: they start from x_T · `init_noise_sigma` (√(1 + σ_0²) at ``leading``
spacing, σ_0 at ``linspace`` / ``trailing``, which ddserve reproduces) and call the network on
`scale_model_input(x̃, t)` = x at their own, possibly fractional, timestep `t` (ddserve too); both
end at σ = 0 where x̃ = x. Same noise: diffusers' stochastic steps (EulerAncestral, DPM-Solver++ SDE) are handed
generators `sample_generator(SEED, i)`, one per row, from which `randn_tensor` draws row i's
[1, C, H, W] noise per step — what ddserve draws from the sample's own stream (diffusers also draws
on its last step, where the noise has weight 0 and nothing follows).
"""

from __future__ import annotations

import pytest
import torch

from models.diffusion.noise import sample_generator
from models.diffusion.sampler import DenoisingBatch, Sample, sample
from models.diffusion.scheduler_config import from_diffusers
from tests.test_scheduler_config import BETAS, SEED, SHAPE, TOLERANCE, FakeNetwork

diffusers = pytest.importorskip("diffusers")

CLASSES = {
    "euler": {"_class_name": "EulerDiscreteScheduler"},
    "euler_ancestral": {"_class_name": "EulerAncestralDiscreteScheduler"},
    "dpmpp_2m": {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++"},
    "dpmpp_2m_sde": {
        "_class_name": "DPMSolverMultistepScheduler",
        "algorithm_type": "sde-dpmsolver++",
    },
    "unipc": {"_class_name": "UniPCMultistepScheduler"},
}
SAMPLERS = tuple(CLASSES)
STOCHASTIC = ("euler_ancestral", "dpmpp_2m_sde")


def _config(sampler: str, betas: str, prediction: str, **extra) -> dict:
    return {
        **CLASSES[sampler],
        "num_train_timesteps": 1000,
        "prediction_type": prediction,
        **BETAS[betas],
        **extra,
    }


def _theirs(config: dict, steps: int, x_T: torch.Tensor, x0_scale: float = 1.0) -> torch.Tensor:
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    scheduler.set_timesteps(steps)
    network = FakeNetwork(from_diffusers(config)[0], config["prediction_type"], x0_scale)
    generators = [sample_generator(SEED, i) for i in range(x_T.shape[0])]
    euler = config["_class_name"].startswith("Euler")
    stochastic = isinstance(scheduler, diffusers.EulerAncestralDiscreteScheduler) or (
        config.get("algorithm_type") == "sde-dpmsolver++"
    )
    x = x_T.clone()
    if euler:
        x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t) if euler else x
        out = network(model_in, t, None)
        kwargs = {"generator": generators} if stochastic else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def _ours(config: dict, steps: int, x_T: torch.Tensor, x0_scale: float = 1.0) -> torch.Tensor:
    schedule, options = from_diffusers(config)
    return sample(
        FakeNetwork(schedule, config["prediction_type"], x0_scale),
        schedule,
        x_T,
        options.settings(num_inference_steps=steps),
        prediction_type=options.prediction_type,
        generators=[sample_generator(SEED, i) for i in range(x_T.shape[0])],
    )


def _check(config: dict, steps: int, x0_scale: float = 1.0, tolerance: float = TOLERANCE) -> None:
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    theirs = _theirs(config, steps, x_T, x0_scale)
    ours = _ours(config, steps, x_T, x0_scale)
    assert torch.isfinite(ours).all()
    difference = (ours - theirs).abs().max().item()
    assert difference <= tolerance, difference


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_stable_diffusion_style_config(sampler: str) -> None:
    """scaled_linear, ``leading`` with `steps_offset=1` (SD 1.x), ε and v, 10 and 25 steps."""
    for steps, prediction in ((10, "epsilon"), (25, "v_prediction")):
        config = _config(
            sampler,
            "scaled_linear",
            prediction,
            timestep_spacing="leading",
            steps_offset=1,
        )
        _check(config, steps)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_trailing_config(sampler: str) -> None:
    """``trailing`` (its np.arange ties at 48 steps), linear β, v and x_0 predictions."""
    for steps, prediction in ((48, "v_prediction"), (12, "sample")):
        if sampler == "euler_ancestral" and prediction == "sample":
            continue  # EulerAncestralDiscreteScheduler does not implement x_0 prediction
        _check(_config(sampler, "linear", prediction, timestep_spacing="trailing"), steps)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_zero_terminal_snr_config(sampler: str) -> None:
    """`rescale_betas_zero_snr`: diffusers' σ-space classes read ᾱ_999 = 0 as 2^−24 (σ = 4096)."""
    config = _config(
        sampler,
        "scaled_linear",
        "v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
    )
    _check(config, 10)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_thresholding_config(sampler: str) -> None:
    """Dynamic thresholding of the data predictions the multistep histories keep."""
    config = _config(
        sampler,
        "linear",
        "epsilon",
        timestep_spacing="leading",
        thresholding=True,
        dynamic_thresholding_ratio=0.9,
        sample_max_value=1.3,
    )
    _check(config, 15, x0_scale=2.0)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "unipc"])
def test_karras_config(sampler: str) -> None:
    config = _config(
        sampler,
        "scaled_linear",
        "epsilon",
        use_karras_sigmas=True,
        timestep_spacing="leading",
        steps_offset=1,
    )
    _check(config, 20)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("karras", [False, True])
def test_linspace_config(sampler: str, karras: bool) -> None:
    """``linspace`` spacing (the σ-space classes' default, here left unset): Euler starts from
    σ_0·ε and calls the network at fractional timesteps (its ``linspace`` points, Karras levels),
    which `FakeNetwork` reads as they are. Regression: ddserve started from √(σ_0² + 1)·ε and
    rounded the timesteps (0.1 away on an SD pipeline, `test_sigma_spacing_parity.py`)."""
    if karras and sampler == "euler_ancestral":
        pytest.skip("EulerAncestralDiscreteScheduler has no Karras sigmas")
    extra = {"use_karras_sigmas": True} if karras else {}
    for steps, prediction in ((7, "epsilon"), (13, "v_prediction")):
        _check(_config(sampler, "scaled_linear", prediction, **extra), steps)


def test_solver_timesteps_equal_diffusers_with_offsets() -> None:
    """Every 23rd step count S < 1000 and the tie / overshoot counts of ``trailing``, each spacing, steps_offset 0 and 1: DPM-Solver / UniPC lay
    S + 1 points less the last, Euler S fractional ones (diffusers' −1 artefact of ``trailing``
    dropped, as for DDIM; a ``leading`` offset past timestep 999 refused)."""
    from models.diffusion.timesteps import euler_timesteps, multistep_timesteps

    for spacing in ("leading", "trailing", "linspace"):
        for offset in (0, 1):
            config = dict(timestep_spacing=spacing, steps_offset=offset)
            multistep = [
                diffusers.DPMSolverMultistepScheduler(**config),
                diffusers.UniPCMultistepScheduler(**config),
            ]
            euler = diffusers.EulerDiscreteScheduler(**config)
            for steps in [*range(1, 1000, 23), 48, 61, 96, 103, 999]:
                for scheduler in multistep:
                    scheduler.set_timesteps(steps)
                    theirs = [t for t in scheduler.timesteps.tolist() if t >= 0]
                    if theirs[0] >= 1000:  # diffusers would call timestep 1000; ddserve refuses
                        with pytest.raises(ValueError, match="steps_offset"):
                            multistep_timesteps(1000, steps, spacing, offset)
                        continue
                    ours = multistep_timesteps(1000, steps, spacing, offset)
                    assert ours == theirs, (type(scheduler).__name__, spacing, offset, steps)
                euler.set_timesteps(steps)
                theirs = [t for t in euler.timesteps.tolist() if t >= 0]
                if theirs[0] >= 1000:
                    with pytest.raises(ValueError, match="steps_offset"):
                        euler_timesteps(1000, steps, spacing, offset)
                    continue
                ours = euler_timesteps(1000, steps, spacing, offset)
                assert ours == pytest.approx(theirs, abs=1e-3), (spacing, offset, steps)


def test_mixed_batch_equals_each_sample_alone() -> None:
    """Samples of one model (a non-default config: scaled_linear, v, trailing, steps_offset,
    set_alpha_to_one=False, thresholding) with different samplers, step counts, η and
    guidance-free settings, joining at different steps, end exactly as when sampled alone."""
    config = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "clip_sample": True,
        "clip_sample_range": 1.5,
        "thresholding": True,
        "dynamic_thresholding_ratio": 0.9,
        "sample_max_value": 1.3,
        **BETAS["scaled_linear"],
    }
    schedule, options = from_diffusers(config)
    network = FakeNetwork(schedule, "v_prediction", 2.0)
    shape = SHAPE[1:]
    requests = [
        options.settings("ddim", 48),
        options.settings("ddim", 7, eta=1.0),
        options.settings("ddpm", 10),
        options.settings("euler", 9),
        options.settings("euler_ancestral", 6),
        options.settings("dpmpp_2m", 12),
        options.settings("dpmpp_2m_sde", 8),
        options.settings("unipc", 11),
        options.settings("ddim", 13, clip_denoised=False),
    ]

    def draw(i: int) -> Sample:
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(100 + i))
        return Sample(requests[i], sample_generator(SEED, i), x=x_T, tag=i)

    def run(samples: list[Sample], join_at: dict[int, int]) -> dict[int, torch.Tensor]:
        batch = DenoisingBatch(network, schedule, shape, prediction_type=options.prediction_type)
        done: dict[int, torch.Tensor] = {}
        waiting = list(samples)
        step = 0
        while waiting or len(batch):
            joining = [s for s in waiting if join_at.get(s.tag, 0) <= step]
            waiting = [s for s in waiting if s not in joining]
            batch.add(joining)
            for finished in batch.step():
                done[finished.tag] = finished.x
            step += 1
        return done

    alone = {}
    for i in range(len(requests)):
        alone.update(run([draw(i)], {}))
    mixed = run([draw(i) for i in range(len(requests))], {i: (3 * i) % 7 for i in range(9)})
    for i in range(len(requests)):
        assert torch.allclose(mixed[i], alone[i], atol=1e-5), (requests[i].sampler, i)
