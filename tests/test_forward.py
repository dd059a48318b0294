"""The forward process and its posterior (Ho et al. 2020, eq. 4, 6, 7)."""

import torch

from models.diffusion.forward import (
    eps_from_v,
    predict_x0_from_eps,
    q_posterior,
    q_sample,
    v_target,
)
from models.diffusion.losses import diffusion_loss, min_snr_weight
from models.diffusion.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule.create("linear", 1000)


def test_q_sample_monte_carlo_mean_and_variance() -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([0.7, -0.4]).reshape(1, 2, 1, 1)
    for t in (0, 100, 500, 999):
        n = 200_000
        noise = torch.randn((n, 2, 1, 1), generator=g)
        xt = q_sample(SCHEDULE, x0.expand(n, -1, -1, -1), torch.full((n,), t), noise)
        a = SCHEDULE.alphas_cumprod[t].item()
        assert torch.allclose(xt.mean(0).flatten(), (a**0.5 * x0).flatten().float(), atol=0.01)
        assert torch.allclose(xt.var(0).flatten(), torch.full((2,), 1 - a), atol=0.01)


def test_posterior_equals_bayes_rule_gaussian_product() -> None:
    """q(x_{t−1} | x_t, x_0) ∝ q(x_t | x_{t−1}) q(x_{t−1} | x_0): the product of two Gaussians in
    x_{t−1}, computed here independently by completing the square."""
    x0 = torch.tensor([0.3, -0.8, 0.1], dtype=torch.float64).reshape(3, 1, 1, 1)
    xt = torch.tensor([1.2, 0.4, -2.0], dtype=torch.float64).reshape(3, 1, 1, 1)
    t = torch.tensor([1, 300, 999])
    mean, var = q_posterior(SCHEDULE, x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        beta = SCHEDULE.betas[ti].item()
        a_prev = SCHEDULE.alphas_cumprod[ti - 1].item()
        # q(x_t | x_{t-1}) = N(√(1−β) x_{t−1}, β): as a density in x_{t−1}, precision (1−β)/β, mean x_t/√(1−β)
        prec1, mu1 = (1 - beta) / beta, xt[i].item() / (1 - beta) ** 0.5
        # q(x_{t−1} | x_0) = N(√ᾱ_{t−1} x_0, 1 − ᾱ_{t−1})
        prec2, mu2 = 1 / (1 - a_prev), a_prev**0.5 * x0[i].item()
        post_var = 1 / (prec1 + prec2)
        post_mean = post_var * (prec1 * mu1 + prec2 * mu2)
        assert abs(var[i].item() - post_var) < 1e-12
        assert abs(mean[i].item() - post_mean) < 1e-10


def test_prediction_conversions_round_trip() -> None:
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn((4, 1, 3, 3), generator=g, dtype=torch.float64)
    eps = torch.randn((4, 1, 3, 3), generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    a = SCHEDULE.alpha_bar_at(t)
    xt = q_sample(SCHEDULE, x0, t, eps)
    assert torch.allclose(predict_x0_from_eps(xt, eps, a), x0, atol=1e-9)
    assert torch.allclose(eps_from_v(xt, v_target(x0, eps, a), a), eps, atol=1e-9)


def test_min_snr_weights() -> None:
    snr = torch.tensor([0.1, 5.0, 100.0], dtype=torch.float64)
    assert torch.allclose(
        min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.05], dtype=torch.float64)
    )
    assert torch.allclose(
        min_snr_weight(snr, 5.0, "v"),
        torch.tensor([0.1 / 1.1, 5 / 6, 5 / 101], dtype=torch.float64),
    )


def test_simple_loss_is_zero_for_the_true_noise_and_weighted_options_run() -> None:
    x0 = torch.zeros((8, 1, 2, 2))

    # With x_0 = 0, x_t = √(1−ᾱ_t) ε, so the ideal ε-predictor is x_t / √(1−ᾱ_t).
    def oracle(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = SCHEDULE.alpha_bar_at(t).to(xt).reshape(-1, 1, 1, 1)
        return xt / (1 - a).sqrt()

    g = torch.Generator().manual_seed(0)
    assert diffusion_loss(oracle, SCHEDULE, x0, generator=g).item() < 1e-10
    zero = lambda xt, t: torch.zeros_like(xt)  # noqa: E731
    plain = diffusion_loss(zero, SCHEDULE, x0, generator=torch.Generator().manual_seed(0))
    assert 0.3 < plain.item() < 3.0  # E‖ε‖² per element is 1
    weighted = diffusion_loss(
        zero, SCHEDULE, x0, min_snr_gamma=5.0, generator=torch.Generator().manual_seed(0)
    )
    assert weighted.item() < plain.item()
    v_loss = diffusion_loss(
        zero, SCHEDULE, x0, prediction_type="v", generator=torch.Generator().manual_seed(0)
    )
    assert v_loss.item() > 0
