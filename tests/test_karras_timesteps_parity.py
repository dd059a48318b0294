"""Parity of the σ-space samplers' plans with diffusers' `set_timesteps`, for every scheduler class
ddserve maps, spacing, Karras or not, β schedule and step count: the network's timestep per step
(integers equal, Euler's fractional float32 ones equal) and the σ's.

diffusers 0.42.1: DPMSolverMultistepScheduler floors (int64 cast) its Karras timesteps with
`beta_schedule="squaredcos_cap_v2"` and rounds them otherwise; UniPC always rounds; the Euler
classes keep them fractional (float32). Before the fix ddserve rounded DPM-Solver++'s squaredcos
ones (999 where diffusers has 998) and its Euler Karras timesteps were up to 0.036 away (float64
σ table vs diffusers' float32 one; `sigmas.py`).

`set_timesteps` never raises on these combos, but diffusers' `step` does on some: see
`test_diffusers_fails_where_the_first_timestep_repeats_and_ddserve_serves_the_plan`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.diffusion.noise import sample_generator
from models.diffusion.sampler import PlanCache, sample
from models.diffusion.scheduler_config import from_diffusers
from models.diffusion.sigmas import noise_levels
from tests.test_scheduler_config_solvers import CLASSES  # sampler → diffusers class config

diffusers = pytest.importorskip("diffusers")

BETAS = {
    "linear": {"beta_schedule": "linear"},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
}
SPACINGS = ("linspace", "leading", "trailing")
STEPS = (5, 7, 20, 50)
CASES = [
    (sampler, betas, spacing, karras, steps)
    for sampler in CLASSES
    for betas in BETAS
    for spacing in SPACINGS
    for karras in (False, True)
    if not (karras and sampler == "euler_ancestral")  # EulerAncestral has no Karras sigmas
    for steps in STEPS
]


def _config(sampler: str, betas: str, spacing: str, karras: bool) -> dict:
    return {
        **CLASSES[sampler],
        "num_train_timesteps": 1000,
        **BETAS[betas],
        "timestep_spacing": spacing,
        "steps_offset": 1 if spacing == "leading" else 0,
        "use_karras_sigmas": karras,
    }


def _ours(config: dict, steps: int) -> tuple[list[float], list[float]]:
    """The network's timestep per step (the transitions') and the plan's σ's."""
    schedule, options = from_diffusers(config)
    settings = options.settings(num_inference_steps=steps)
    network = [tr.network_t for tr in PlanCache(schedule).transitions(settings)]
    levels = noise_levels(
        schedule,
        steps,
        settings.timestep_spacing,
        euler=not settings.multistep,
        karras=settings.use_karras_sigmas,
        steps_offset=settings.steps_offset,
        diffusers_table=True,
        truncate=settings.truncate_karras_timesteps,
    )
    return network, list(levels.sigmas)


@pytest.mark.parametrize(("sampler", "betas", "spacing", "karras", "steps"), CASES)
def test_plan_matches_diffusers_set_timesteps(
    sampler: str, betas: str, spacing: str, karras: bool, steps: int
) -> None:
    config = _config(sampler, betas, spacing, karras)
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    scheduler.set_timesteps(steps)
    network, sigmas = _ours(config, steps)
    theirs = scheduler.timesteps.numpy()
    assert len(network) == len(theirs)
    if theirs.dtype == np.int64:  # the multistep solvers: integers, equal
        assert [int(t) for t in network] == theirs.tolist()
        assert all(t == int(t) for t in network)
    else:  # Euler: float32, equal
        assert np.array_equal(np.asarray(network, dtype=np.float32), theirs)
    # σ's: diffusers' come from its float32 table (`sigmas.py`): float32-close where ddserve uses
    # it (Karras), else within the float64 table's 3e-4 at the smallest σ's.
    their_sigmas = scheduler.sigmas.numpy().astype(np.float64)
    assert sigmas[-1] == their_sigmas[-1] == 0.0
    rel = np.abs(np.asarray(sigmas[:-1]) / their_sigmas[:-1] - 1.0).max()
    assert rel <= (2e-6 if karras else 3e-4)


def test_dpm_solver_floors_cosine_karras_timesteps_and_unipc_rounds_them() -> None:
    """The regression: diffusers' DPM-Solver++ plan at 3 steps (which its `step` can run) starts at
    998 — σ(999)'s t is 998.99998 in its float32 logs, truncated — where ddserve had 999."""
    dpm = _config("dpmpp_2m", "squaredcos_cap_v2", "linspace", True)
    unipc = _config("unipc", "squaredcos_cap_v2", "linspace", True)
    assert _ours(dpm, 3)[0] == [998.0, 997.0, 0.0]
    assert _ours(unipc, 3)[0] == [999.0, 997.0, 0.0]
    # ddserve's own models (no scheduler config) keep rounding on their float64 table.
    schedule, _ = from_diffusers(dpm)
    own = noise_levels(schedule, 3, "linspace", euler=False, karras=True)
    assert own.network_timesteps == (999.0, 997.0, 0.0)


def _diffusers_runs(config: dict, steps: int) -> bool:
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    scheduler.set_timesteps(steps)
    x = torch.ones(1, 1, 2, 2)
    sde = config.get("algorithm_type") == "sde-dpmsolver++"
    kwargs = {"generator": torch.Generator().manual_seed(0)} if sde else {}
    try:
        for t in scheduler.timesteps:
            x = scheduler.step(0.1 * x, t, x, **kwargs).prev_sample
    except (IndexError, AssertionError):
        return False
    return True


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "unipc"])
@pytest.mark.parametrize("steps", [2, 3, 4, 5, 7, 20, 50])
def test_diffusers_fails_where_the_first_timestep_repeats_and_ddserve_serves_the_plan(
    sampler: str, steps: int
) -> None:
    """squaredcos_cap_v2 + Karras: diffusers' `step` starts at the second of two equal first
    timesteps and runs off its σ list (IndexError, UniPC: AssertionError) exactly when its plan
    starts with a repeated timestep; ddserve walks the same plan level by level, finite."""
    config = _config(sampler, "squaredcos_cap_v2", "linspace", True)
    config["prediction_type"] = "epsilon"
    network, _ = _ours(config, steps)
    assert _diffusers_runs(config, steps) == (network[0] != network[1] if steps > 1 else True)
    schedule, options = from_diffusers(config)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x_0 = sample(
        lambda x, t, c: 0.1 * x,
        schedule,
        x_T,
        options.settings(num_inference_steps=steps),
        prediction_type=options.prediction_type,
        generators=[sample_generator(0, i) for i in range(2)],
    )
    assert bool(torch.isfinite(x_0).all()) and not math.isnan(float(x_0.abs().max()))
