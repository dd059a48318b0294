"""Noise schedules against their closed forms (Ho et al. 2020; Nichol & Dhariwal 2021, eq. 17)."""

import math

import pytest
import torch

from models.diffusion.schedule import NoiseSchedule


def test_linear_schedule_endpoints_and_products() -> None:
    s = NoiseSchedule.create("linear", 1000)
    assert s.betas.dtype == torch.float64
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(
        s.betas[1:] - s.betas[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64)
    )
    expected = 1.0
    for t in range(1000):
        expected *= 1.0 - s.betas[t].item()
        if t in (0, 10, 500, 999):
            assert s.alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-12)


def test_linear_schedule_scales_with_T() -> None:
    s = NoiseSchedule.create("linear", 250)
    assert s.betas[0].item() == pytest.approx(1e-4 * 4)
    assert s.betas[-1].item() == pytest.approx(0.02 * 4)


def test_cosine_schedule_matches_nichol_dhariwal() -> None:
    T, s_off = 1000, 0.008
    s = NoiseSchedule.create("cosine", T)

    def f(t: float) -> float:
        return math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2

    for t in (0, 1, 100, 500, 900, 998):
        # ᾱ at 0-based index t is ᾱ(t + 1) of the paper: f(t + 1) / f(0), while β stays below 0.999.
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert s.betas.max().item() == pytest.approx(0.999)
    assert (s.betas > 0).all()


def test_alpha_bar_at_minus_one_is_one() -> None:
    s = NoiseSchedule.create("linear", 1000)
    assert s.alpha_bar_at(-1).item() == 1.0
    assert s.alpha_bar_at(torch.tensor([0, 999])).tolist() == s.alphas_cumprod[[0, 999]].tolist()
    with pytest.raises(IndexError):
        s.alpha_bar_at(1000)


def test_unknown_schedule_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown schedule"):
        NoiseSchedule.create("quadratic", 1000)  # type: ignore[arg-type]
