"""Image-to-image (SDEdit) in the sampling library: parity with diffusers' img2img arithmetic,
strength → 0 and strength = 1, batch invariance with generate samples in the same running set.

Parity: diffusers' side replicates `StableDiffusionImg2ImgPipeline` around the scheduler alone —
`set_timesteps(S)`, `get_timesteps` (init = min(int(S·strength), S), t_start = max(S − init, 0),
timesteps[t_start·order:], `set_begin_index(t_start·order)`), then the noise of every row drawn
first from its generator (`randn_tensor` with one generator per row, shape [1, C, H, W]),
`add_noise(x_0, noise, timesteps[:1])` and the usual loop of `scale_model_input` / network / `step`
with the same generators. ddserve draws the same ε first from each sample's own stream, then its
steps' noise. The network is `test_solvers_parity.fake_network` (nonlinear in x, varying with t);
schedulers are configured as in `test_solvers_parity` (`steps_offset=0`, DDIM and DDPM as
`test_samplers` configures them). Tolerance: 1e-4 on the final sample.
"""

from __future__ import annotations

import pytest
import torch

from models.diffusion.noise import sample_generator
from models.diffusion.sampler import DenoisingBatch, PlanCache, Sample, SamplerSettings, sample
from models.diffusion.schedule import NoiseSchedule
from models.diffusion.steps import SAMPLER_NAMES
from models.diffusion.timesteps import sdedit_start

diffusers = pytest.importorskip("diffusers")

from tests.test_solvers_parity import PREDICTIONS, SCHEDULES, fake_network  # noqa: E402

SHAPE = (2, 3, 8, 8)
SEED = 23
TOLERANCE = 1e-4


def _x0() -> torch.Tensor:
    """A structured 'image' in [−1, 1]: [B, C, H, W]."""
    grid = torch.linspace(-1, 1, SHAPE[-1])
    image = torch.tanh(3 * grid[None, :, None] * grid[None, None, :] + 0.2)  # [1, H, W]
    return image.expand(SHAPE).clone() * torch.tensor([1.0, -0.5])[:, None, None, None]


def _scheduler(sampler: str, schedule: str, prediction: str, spacing: str):
    config = dict(
        num_train_timesteps=1000,
        prediction_type=PREDICTIONS[prediction],
        timestep_spacing=spacing,
        steps_offset=0,
        **SCHEDULES[schedule],
    )
    if sampler == "ddim":
        return diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **config)
    if sampler == "ddpm":
        return diffusers.DDPMScheduler(variance_type="fixed_small", clip_sample=False, **config)
    if sampler == "euler":
        return diffusers.EulerDiscreteScheduler(**config)
    if sampler == "euler_ancestral":
        return diffusers.EulerAncestralDiscreteScheduler(**config)
    if sampler == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **config)
    if sampler == "dpmpp_2m_sde":
        return diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", **config)
    return diffusers.UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, **config)


def _diffusers_img2img(sampler, schedule, prediction, spacing, steps, strength, x0, eta=0.0):
    """StableDiffusionImg2ImgPipeline's timestep arithmetic and noising around the scheduler."""
    scheduler = _scheduler(sampler, schedule, prediction, spacing)
    scheduler.set_timesteps(steps)
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    generators = [sample_generator(SEED, i) for i in range(SHAPE[0])]
    noise = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in generators])
    x = scheduler.add_noise(x0, noise, timesteps[:1].repeat(SHAPE[0]))
    network = fake_network(schedule, prediction)
    for t in timesteps:
        out = network(scheduler.scale_model_input(x, t), t.repeat(SHAPE[0]), None)
        kwargs = {"eta": eta} if sampler == "ddim" else {}
        if sampler in ("ddpm", "euler_ancestral", "dpmpp_2m_sde") or eta > 0:
            kwargs["generator"] = generators
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x, len(timesteps)


def _settings(sampler: str, steps: int, spacing: str, strength: float, eta: float = 0.0):
    return SamplerSettings(
        sampler,  # type: ignore[arg-type]
        steps,
        eta=eta,
        timestep_spacing=spacing,  # type: ignore[arg-type]
        strength=strength,
    )


def _ours(settings, schedule, prediction, x0, batch: DenoisingBatch | None = None):
    batch = (
        batch
        or DenoisingBatch(
            fake_network(schedule, prediction),
            NoiseSchedule.create(schedule, 1000),  # type: ignore[arg-type]
            SHAPE[1:],
            prediction_type=prediction,  # type: ignore[arg-type]
        )
    )
    samples = [Sample(settings, sample_generator(SEED, i), init_x0=x0[i]) for i in range(SHAPE[0])]
    batch.add(samples)
    while len(batch):
        batch.step()
    return torch.stack([s.x for s in samples]), samples[0].steps_total


PARITY_CASES = [  # sampler, schedule, prediction, spacing, steps, strength
    ("ddim", "linear", "epsilon", "leading", 20, 0.3),
    ("ddim", "scaled_linear", "v", "trailing", 10, 0.75),
    ("ddpm", "linear", "epsilon", "leading", 20, 0.6),
    ("ddpm", "scaled_linear", "epsilon", "trailing", 25, 0.37),
    ("euler", "scaled_linear", "epsilon", "linspace", 20, 0.5),
    ("euler", "linear", "v", "leading", 13, 0.8),
    ("euler_ancestral", "scaled_linear", "epsilon", "linspace", 12, 0.66),
    ("dpmpp_2m", "scaled_linear", "epsilon", "leading", 20, 0.6),
    ("dpmpp_2m", "linear", "v", "linspace", 25, 0.9),
    ("dpmpp_2m", "scaled_linear", "epsilon", "trailing", 10, 0.35),
    ("dpmpp_2m_sde", "scaled_linear", "epsilon", "leading", 15, 0.7),
    ("unipc", "scaled_linear", "epsilon", "leading", 20, 0.55),
    ("unipc", "linear", "v", "trailing", 12, 0.42),
]


@pytest.mark.parametrize(
    ("sampler", "schedule", "prediction", "spacing", "steps", "strength"), PARITY_CASES
)
def test_img2img_matches_diffusers(
    sampler: str, schedule: str, prediction: str, spacing: str, steps: int, strength: float
) -> None:
    x0 = _x0()
    theirs, their_steps = _diffusers_img2img(
        sampler, schedule, prediction, spacing, steps, strength, x0
    )
    settings = _settings(sampler, steps, spacing, strength)
    ours, our_steps = _ours(settings, schedule, prediction, x0)
    assert our_steps == their_steps == steps - sdedit_start(steps, strength) < steps
    difference = (ours - theirs).abs().max().item()
    assert difference <= TOLERANCE, difference


def test_ddim_with_eta_matches_diffusers() -> None:
    x0 = _x0()
    theirs, _ = _diffusers_img2img("ddim", "linear", "epsilon", "leading", 20, 0.5, x0, eta=0.7)
    ours, _ = _ours(_settings("ddim", 20, "leading", 0.5, eta=0.7), "linear", "epsilon", x0)
    assert (ours - theirs).abs().max().item() <= TOLERANCE


def test_tail_arithmetic_is_diffusers_get_timesteps() -> None:
    """⌊S·strength⌋ in float, as diffusers computes it: 0.29·100 = 28.999… gives 28 steps."""
    assert sdedit_start(100, 0.29) == 72
    assert sdedit_start(10, 0.3) == 7  # 10·0.3 = 3.0000000000000004
    assert sdedit_start(50, 1.0) == 0
    assert sdedit_start(50, 0.02) == 49
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            sdedit_start(50, bad)
    with pytest.raises(ValueError, match="takes no denoising step"):
        sdedit_start(50, 0.019)
    with pytest.raises(ValueError, match="takes no denoising step"):
        SamplerSettings("ddim", 10, strength=0.05)
    with pytest.raises(ValueError, match="RePaint"):
        SamplerSettings("ddim", 10, strength=0.5, jump_n_sample=2)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_strength_towards_zero_returns_nearly_the_input(sampler: str) -> None:
    """One step from the least noisy level of a 50-step plan (t = 0 for the single-step samplers,
    t = 19 for the multistep ones, whose plans stop short of 0): the input comes back closer than
    that level's noise √(1 − ᾱ_{t_0}) (the fake network does not know the image); strength 0.8
    moves it far away."""
    x0 = _x0()
    settings = _settings(sampler, 50, "leading", 0.02)
    first = PlanCache(NoiseSchedule.create("linear", 1000)).transitions(settings)[0]
    low, steps = _ours(settings, "linear", "epsilon", x0)
    high, _ = _ours(_settings(sampler, 50, "leading", 0.8), "linear", "epsilon", x0)
    near = (low - x0).abs().mean().item()
    far = (high - x0).abs().mean().item()
    assert steps == 1
    assert near < min((1.0 - first.alpha_bar_t) ** 0.5, 0.06), near
    assert far > 10 * near, (near, far)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_strength_one_is_generate_with_the_same_seed(sampler: str) -> None:
    """strength = 1 ignores the image: the same x_T = ε, the same steps, bit for bit."""
    schedule = NoiseSchedule.create("linear", 1000)
    network = fake_network("linear", "epsilon")
    settings = SamplerSettings(sampler, 10)  # type: ignore[arg-type]
    results = []
    for image in (None, _x0()[0]):
        batch = DenoisingBatch(network, schedule, SHAPE[1:])
        s = Sample(settings, sample_generator(SEED, 0), init_x0=image)
        batch.add([s])
        while len(batch):
            batch.step()
        results.append(s.x)
    assert torch.equal(results[0], results[1])


def test_img2img_samples_join_a_running_batch_and_give_their_solo_result(
    linear_schedule, tiny_class_unet
) -> None:
    """Generate samples start; img2img samples of every sampler and several strengths join
    after three steps (at a later timestep of their own plans), guided or not; each ends where it
    ends alone, and the generate samples end where they end without the newcomers."""
    net = tiny_class_unet
    image = torch.tanh(torch.linspace(-2, 2, 64)).reshape(1, 8, 8)
    generate = [
        SamplerSettings("ddim", 12),
        SamplerSettings("dpmpp_2m", 9, guidance_scale=2.0),
        SamplerSettings("unipc", 8),
    ]
    img2img = [
        SamplerSettings(name, 10, strength=strength, guidance_scale=1.5 if i % 2 else 0.0)  # type: ignore[arg-type]
        for i, (name, strength) in enumerate(
            zip(SAMPLER_NAMES, (0.5, 0.3, 0.7, 0.45, 0.6, 0.8, 0.55), strict=True)
        )
    ]

    def make(i: int, settings: SamplerSettings) -> Sample:
        init = image if settings.strength < 1 else None
        return Sample(
            settings, sample_generator(300 + i, 0), cond=torch.tensor(i % 3), init_x0=init
        )

    def run(samples: list[Sample], late: list[Sample]) -> None:
        batch = DenoisingBatch(net, linear_schedule, (1, 8, 8), null_condition=net.null_condition())
        batch.add(samples)
        for _ in range(3):
            batch.step()
        batch.add(late)
        while len(batch):
            batch.step()

    everything = generate + img2img
    with torch.no_grad():
        solo = []
        for i, settings in enumerate(everything):
            s = make(i, settings)
            run([s], [])
            solo.append(s.x)
        together = [make(i, s) for i, s in enumerate(everything)]
        run(together[: len(generate)], together[len(generate) :])
    for s, alone in zip(together, solo, strict=True):
        assert torch.allclose(s.x, alone, atol=1e-4), (s.settings, (s.x - alone).abs().max())
    assert all(s.steps_total < 10 for s in together[len(generate) :])


def test_img2img_needs_its_image_of_the_batch_shape(linear_schedule) -> None:
    network = fake_network("linear", "epsilon")
    batch = DenoisingBatch(network, linear_schedule, SHAPE[1:])
    settings = SamplerSettings("ddim", 10, strength=0.5)
    with pytest.raises(ValueError, match="needs the image"):
        batch.add([Sample(settings, sample_generator(0, 0))])
    with pytest.raises(ValueError, match="init_x0 has shape"):
        batch.add([Sample(settings, sample_generator(0, 0), init_x0=torch.zeros(1, 8, 8))])
    assert len(batch) == 0


def test_the_one_call_form_takes_images_per_row() -> None:
    """`sample(..., init_x0=...)`: rows with strength < 1 start from their image (their x_T row
    unused), the others from x_T, each as in its own running set."""
    x0 = _x0()
    schedule = NoiseSchedule.create("linear", 1000)
    network = fake_network("linear", "epsilon")
    settings = [_settings("ddim", 10, "leading", 0.4), SamplerSettings("dpmpp_2m", 10)]
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    both = sample(
        network,
        schedule,
        x_T,
        settings,
        init_x0=x0,
        generators=[sample_generator(SEED, i) for i in range(SHAPE[0])],
    )
    edited, _ = _ours(settings[0], "linear", "epsilon", x0)
    generated = sample(network, schedule, x_T[1:], settings[1])
    assert torch.allclose(both[0], edited[0], atol=1e-6)
    assert torch.allclose(both[1], generated[0], atol=1e-6)


SD15_CONFIG = {  # Stable Diffusion 1.x's scheduler_config.json, under each class's name
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "timestep_spacing": "leading",
}
SD_CLASSES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@pytest.mark.parametrize("sampler", sorted(SD_CLASSES))
def test_img2img_of_a_diffusers_model_matches_its_pipeline(sampler: str) -> None:
    """An imported model's scheduler config (SD 1.x: steps_offset 1, set_alpha_to_one False,
    diffusers' step conventions) through `from_diffusers` and `SchedulerOptions.settings`, against
    `<Class>.from_config(config)` under the img2img pipeline's arithmetic."""
    from models.diffusion.scheduler_config import from_diffusers

    steps, strength = 20, 0.6
    config = {"_class_name": SD_CLASSES[sampler], **SD15_CONFIG}
    schedule, options = from_diffusers(config)
    settings = options.settings(sampler, steps, strength=strength)  # type: ignore[arg-type]
    scheduler = getattr(diffusers, SD_CLASSES[sampler]).from_config(config)
    scheduler.set_timesteps(steps)
    t_start = steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    x0 = _x0()
    generators = [sample_generator(SEED, i) for i in range(SHAPE[0])]
    noise = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in generators])
    x = scheduler.add_noise(x0, noise, timesteps[:1].repeat(SHAPE[0]))
    network = fake_network("scaled_linear", "epsilon")
    for t in timesteps:
        out = network(scheduler.scale_model_input(x, t), t.repeat(SHAPE[0]), None)
        stochastic = sampler in ("ddpm", "euler_ancestral")
        kwargs = {"generator": generators} if stochastic else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    batch = DenoisingBatch(network, schedule, SHAPE[1:], prediction_type=options.prediction_type)
    ours, our_steps = _ours(settings, "scaled_linear", "epsilon", x0, batch)
    assert our_steps == len(timesteps) == 12
    assert (ours - x).abs().max().item() <= TOLERANCE
