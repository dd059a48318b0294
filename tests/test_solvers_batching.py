"""The σ-space samplers in the running batch: per-sample history, batch invariance, inpainting,
few-step accuracy and the errors a caller can cause."""

from __future__ import annotations

import pytest
import torch

from models.diffusion.noise import sample_generator
from models.diffusion.sampler import DenoisingBatch, PlanCache, Sample, SamplerSettings, sample
from models.diffusion.schedule import NoiseSchedule
from models.diffusion.steps import SAMPLER_NAMES
from tests.conftest import GaussianOptimalEps

ALL_SAMPLERS = [
    SamplerSettings("ddim", 12),
    SamplerSettings("ddpm", 15, guidance_scale=1.5),
    SamplerSettings("euler", 8, timestep_spacing="linspace"),
    SamplerSettings("euler", 9, use_karras_sigmas=True, guidance_scale=2.0),
    SamplerSettings("euler_ancestral", 10, timestep_spacing="trailing"),
    SamplerSettings("dpmpp_2m", 6),
    SamplerSettings("dpmpp_2m", 11, use_karras_sigmas=True, guidance_scale=3.0),
    SamplerSettings("dpmpp_2m", 7, solver_order=1, timestep_spacing="linspace"),
    SamplerSettings("dpmpp_2m_sde", 9, guidance_scale=1.0),
    SamplerSettings("unipc", 5),
    SamplerSettings("unipc", 13, timestep_spacing="trailing", clip_denoised=True),
    SamplerSettings("unipc", 8, solver_order=1, use_karras_sigmas=True),
]


def _make(i: int, settings: SamplerSettings) -> Sample:
    return Sample(settings, sample_generator(100 + i, 0), cond=torch.tensor(i % 3), tag=i)


def _engine(net, schedule) -> DenoisingBatch:
    return DenoisingBatch(net, schedule, (1, 8, 8), null_condition=net.null_condition())


def _run_alone(net, schedule, i: int, settings: SamplerSettings) -> torch.Tensor:
    batch = _engine(net, schedule)
    s = _make(i, settings)
    batch.add([s])
    while len(batch):
        batch.step()
    return s.x


def test_every_sampler_in_one_batch_gives_its_solo_result(linear_schedule, tiny_class_unet) -> None:
    """All samplers, step counts, spacings, Karras levels, orders and guidance scales share one
    network call per step; half the samples join after three steps, when the first ones already
    carry a history; each ends where it ends alone."""
    net = tiny_class_unet
    with torch.no_grad():
        solo = [_run_alone(net, linear_schedule, i, s) for i, s in enumerate(ALL_SAMPLERS)]
        batch = _engine(net, linear_schedule)
        together = [_make(i, s) for i, s in enumerate(ALL_SAMPLERS)]
        batch.add(together[::2])
        for _ in range(3):
            batch.step()
        assert batch.history is not None  # multistep samples in the batch
        batch.add(together[1::2])
        while len(batch):
            batch.step()
    assert batch.network_calls == max(
        s.steps_total + (3 if i % 2 else 0) for i, s in enumerate(together)
    )
    for s, alone in zip(together, solo, strict=True):
        assert torch.allclose(s.x, alone, atol=1e-4), (s.settings, (s.x - alone).abs().max())
    assert batch.history is None


def test_history_follows_its_rows_when_neighbours_leave(linear_schedule) -> None:
    """A canceled neighbour is removed mid-run: the remaining multistep samples keep their own
    history rows (index_select), so they end as they would alone."""
    eps = GaussianOptimalEps(linear_schedule, 0.2, 0.6)
    settings = [SamplerSettings("unipc", 10), SamplerSettings("dpmpp_2m", 10)]

    def make(i: int) -> Sample:
        return Sample(settings[i % 2], sample_generator(i, 0), tag=i)

    alone = []
    for i in range(4):
        b = DenoisingBatch(eps, linear_schedule, (1, 4, 4))
        s = make(i)
        b.add([s])
        while len(b):
            b.step()
        alone.append(s.x)
    b = DenoisingBatch(eps, linear_schedule, (1, 4, 4))
    samples = [make(i) for i in range(4)]
    b.add(samples)
    for _ in range(4):
        b.step()
    removed = b.remove(lambda s: s.tag not in (0, 3))
    assert [s.tag for s in removed] == [0, 3]
    assert b.history is not None and b.history.shape[1] == 2
    while len(b):
        b.step()
    for i in (1, 2):
        assert torch.allclose(samples[i].x, alone[i], atol=1e-6)


def test_ddim_only_batch_keeps_no_history(linear_schedule) -> None:
    eps = GaussianOptimalEps(linear_schedule, 0.0, 1.0)
    b = DenoisingBatch(eps, linear_schedule, (1, 4, 4))
    b.add([Sample(SamplerSettings("ddim", 5), sample_generator(0, 0))])
    b.add([Sample(SamplerSettings("euler_ancestral", 5), sample_generator(1, 0))])
    b.step()
    assert b.history is None


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc"])
def test_few_steps_reach_the_data_distribution_better_than_ddim(sampler: str) -> None:
    """With the exact ε of Gaussian data N(1, 0.5²), the probability-flow ODE maps N(0, I) onto it.
    DDIM's first-order steps undershoot the spread at 10 calls (by 0.12); the second-order solvers
    on Karras levels miss it by far less at the same cost, and converge as steps are added."""
    schedule = NoiseSchedule.create("linear", 1000)
    eps = GaussianOptimalEps(schedule, 1.0, 0.5)
    x_T = torch.randn((64, 1, 16, 16), generator=torch.Generator().manual_seed(0))

    def spread_error(settings: SamplerSettings) -> float:
        out = sample(eps, schedule, x_T, settings)
        assert abs(out.mean().item() - 1.0) < 0.01
        return abs(out.std().item() - 0.5)

    ddim = spread_error(SamplerSettings("ddim", 10))
    ten = spread_error(SamplerSettings(sampler, 10, use_karras_sigmas=True))
    twenty = spread_error(SamplerSettings(sampler, 20, use_karras_sigmas=True))
    assert ten < 0.65 * ddim, (ten, ddim)
    assert twenty < 0.6 * ten, (twenty, ten)


def test_euler_is_ddim_on_the_same_levels(linear_schedule) -> None:
    """At S = 10 the linspace levels are whole timesteps (999 = 9 · 111), so Euler visits DDIM's."""
    eps = GaussianOptimalEps(linear_schedule, 1.0, 0.5)
    x_T = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    ddim = sample(
        eps, linear_schedule, x_T, SamplerSettings("ddim", 10, timestep_spacing="linspace")
    )
    euler = sample(
        eps, linear_schedule, x_T, SamplerSettings("euler", 10, timestep_spacing="linspace")
    )
    assert torch.allclose(euler, ddim, atol=1e-5)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_keeps_the_known_region(linear_schedule, sampler: str) -> None:
    """Inpainting without RePaint jumps works with every sampler: the known region is q(x_s | x_0)
    after each step and x_0 itself at the end."""
    eps = GaussianOptimalEps(linear_schedule, 0.0, 0.5)
    known = torch.rand((2, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros((2, 1, 8, 8))
    mask[..., :4] = 1.0
    x_T = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    out = sample(eps, linear_schedule, x_T, SamplerSettings(sampler, 8), known=known, mask=mask)
    kept = mask.bool()
    assert torch.allclose(out[kept], known[kept], atol=1e-6)
    assert not torch.allclose(out[~kept], known[~kept], atol=0.1)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_repaint_jumps_with_the_single_step_euler_samplers(linear_schedule, sampler: str) -> None:
    eps = GaussianOptimalEps(linear_schedule, 0.0, 0.5)
    settings = SamplerSettings(sampler, 10, jump_length=2, jump_n_sample=3)
    plan = PlanCache(linear_schedule).transitions(settings)
    jumps = [tr for tr in plan if tr.jump]
    assert len(jumps) == 4 * 2 * 2  # jump points k = 0, 2, 4, 6, two extra passes of 2 levels
    assert all(tr.alpha_bar_s < tr.alpha_bar_t for tr in jumps)  # upward: more noise
    assert sum(tr.is_reverse for tr in plan) == 10 + len(jumps)
    known = torch.zeros((1, 1, 4, 4))
    mask = torch.ones((1, 1, 4, 4))
    mask[..., 2:] = 0.0
    out = sample(eps, linear_schedule, torch.randn((1, 1, 4, 4)), settings, known=known, mask=mask)
    assert torch.equal(out[mask.bool()], known[mask.bool()])


def test_karras_plans_count_every_step_even_when_rounded_timesteps_repeat() -> None:
    """Karras levels crowd near σ_min, where several round to the same network timestep: such a
    pair is still a reverse step (not a RePaint jump), so the plan has exactly S network calls."""
    schedule = NoiseSchedule.create("linear", 100)
    settings = SamplerSettings("dpmpp_2m", 60, use_karras_sigmas=True)
    plan = PlanCache(schedule).transitions(settings)
    assert any(tr.s == tr.t for tr in plan)  # a repeated timestep
    assert len(plan) == 60 and all(tr.is_reverse for tr in plan)


# --- errors a caller can cause ------------------------------------------------------------------
def test_unknown_sampler_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match="unknown sampler 'heun'; expected one of ddpm, ddim, euler"
    ):
        SamplerSettings("heun")  # type: ignore[arg-type]


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_multistep_solvers_refuse_repaint_jumps(sampler: str) -> None:
    with pytest.raises(
        ValueError, match="needs a single-step sampler \\(ddpm, ddim, euler, euler_"
    ):
        SamplerSettings(sampler, 20, jump_length=5, jump_n_sample=2)  # type: ignore[arg-type]


def test_invalid_solver_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"use_karras_sigmas applies to euler, .*not 'ddim'"):
        SamplerSettings("ddim", 10, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="solver_order must be 1 or 2"):
        SamplerSettings("unipc", 10, solver_order=3)
    with pytest.raises(ValueError, match="unknown timestep spacing 'middle'; expected one of"):
        SamplerSettings("euler", 10, timestep_spacing="middle")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (SamplerSettings("euler", 1001), r"num_steps must be in \[1, 1000\]"),
        (SamplerSettings("dpmpp_2m", 1000), r"num_steps must be in \[1, 999\]"),
    ],
)
def test_steps_beyond_the_schedule_are_rejected_when_added(
    linear_schedule, settings: SamplerSettings, message: str
) -> None:
    batch = DenoisingBatch(
        GaussianOptimalEps(linear_schedule, 0.0, 1.0), linear_schedule, (1, 4, 4)
    )
    with pytest.raises(ValueError, match=message):
        batch.add([Sample(settings, sample_generator(0, 0))])
    assert len(batch) == 0 and batch.history is None


def test_a_multistep_solver_refuses_repeated_noise_levels() -> None:
    """A one-step schedule has σ_min = σ_max: Karras levels coincide and h = λ_{i+1} − λ_i = 0."""
    schedule = NoiseSchedule.create("linear", 1)
    batch = DenoisingBatch(GaussianOptimalEps(schedule, 0.0, 1.0), schedule, (1, 4, 4))
    settings = SamplerSettings("dpmpp_2m", 3, use_karras_sigmas=True)
    with pytest.raises(
        ValueError, match=r"3 steps \(Karras levels\) repeat a noise level .* use fewer steps"
    ):
        batch.add([Sample(settings, sample_generator(0, 0))])


def test_v_prediction_and_classifier_guidance_mix_without_touching_neighbours(
    linear_schedule,
) -> None:
    """v-prediction rows convert to x̂_0 directly; classifier guidance shifts ε (and that x̂_0) of its
    own rows only: guided and unguided samples of every kind end as they do alone."""
    direction = torch.randn((1, 4, 4), generator=torch.Generator().manual_seed(0))

    def classifier(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = (torch.tanh(x) * direction).flatten(1).sum(1)
        return torch.stack([s, -s], dim=1)

    eps = GaussianOptimalEps(linear_schedule, 0.2, 0.7)

    def v_network(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        a = linear_schedule.alphas_cumprod[t].to(x).reshape(-1, 1, 1, 1)
        e = eps(x, t) + 0.05 * torch.sin(3 * x)
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        return a.sqrt() * e - (1 - a).sqrt() * x0

    settings = [
        SamplerSettings(name, 8, classifier_scale=scale)
        for name in ("ddim", "euler_ancestral", "dpmpp_2m", "unipc")
        for scale in (0.0, 1.5)
    ]

    def make(i: int) -> Sample:
        return Sample(settings[i], sample_generator(i, 0), class_label=0, tag=i)

    def engine() -> DenoisingBatch:
        return DenoisingBatch(
            v_network, linear_schedule, (1, 4, 4), prediction_type="v", classifier=classifier
        )

    alone = []
    for i in range(len(settings)):
        b = engine()
        s = make(i)
        b.add([s])
        while len(b):
            b.step()
        alone.append(s.x)
    b = engine()
    together = [make(i) for i in range(len(settings))]
    b.add(together)
    while len(b):
        b.step()
    for s, x in zip(together, alone, strict=True):
        assert torch.allclose(s.x, x, atol=1e-5), (s.settings, (s.x - x).abs().max())
    for i in range(0, len(settings), 2):  # the guided twin moved
        assert (alone[i + 1] - alone[i]).abs().max() > 1e-3
    # The same network written as ε gives the same samples: the guided x̂_0 of a v row is the one
    # of its shifted ε.
    eps_batch = DenoisingBatch(
        lambda x, t, c: eps(x, t) + 0.05 * torch.sin(3 * x),
        linear_schedule,
        (1, 4, 4),
        classifier=classifier,
    )
    as_eps = [make(i) for i in range(len(settings))]
    eps_batch.add(as_eps)
    while len(eps_batch):
        eps_batch.step()
    for s, x in zip(as_eps, alone, strict=True):
        assert torch.allclose(s.x, x, atol=1e-4), (s.settings, (s.x - x).abs().max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_result_for_every_sampler(linear_schedule, tiny_class_unet) -> None:
    """The history tensor and the coefficient rows live on the batch's device; the noise streams
    are drawn on the CPU, so CUDA and CPU agree up to float rounding."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {}
    for device in ("cpu", "cuda"):
        net = tiny_class_unet.to(device)
        batch = DenoisingBatch(
            net, linear_schedule, (1, 8, 8), null_condition=net.null_condition(), device=device
        )
        samples = [_make(i, s) for i, s in enumerate(ALL_SAMPLERS)]
        with torch.no_grad():
            batch.add(samples[:6])
            batch.step()
            batch.add(samples[6:])
            while len(batch):
                batch.step()
        results[device] = torch.stack([s.x.cpu() for s in samples])
    tiny_class_unet.to("cpu")
    difference = (results["cuda"] - results["cpu"]).abs().max()
    assert difference < 1e-3, difference


def test_a_rejected_sample_leaves_the_running_set_as_it_was(linear_schedule) -> None:
    """Regression: `add` appended the samples before a bad one to the list but not their rows to x
    (and drew their x_T), so the next step failed on mismatched shapes."""
    eps = GaussianOptimalEps(linear_schedule, 0.0, 1.0)
    batch = DenoisingBatch(eps, linear_schedule, (1, 4, 4))
    running = Sample(SamplerSettings("unipc", 6), sample_generator(0, 0))
    batch.add([running])
    batch.step()
    good = Sample(SamplerSettings("dpmpp_2m", 5), sample_generator(1, 0))
    bad = Sample(SamplerSettings("ddim", 1001), sample_generator(2, 0))
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 1000\]"):
        batch.add([good, bad])
    assert len(batch) == 1 and batch.x.shape[0] == 1 and batch.history.shape[1] == 1
    assert good.x is None  # nothing drawn from its stream
    while len(batch):
        batch.step()
    assert running.done and torch.isfinite(running.x).all()
