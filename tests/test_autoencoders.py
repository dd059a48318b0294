"""The autoencoder family: shapes, short training runs on real digits (the loss falls, and the
reconstructions beat the mean image), and the formulas — sparsity penalty, the VAE's closed-form KL
against Monte Carlo, the straight-through gradient, the DAE's corruption fractions."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch
import torch.nn.functional as F

from models.autoencoders import (
    AUTOENCODERS,
    NOISE_KINDS,
    VAE,
    VQVAE,
    AdversarialAutoencoder,
    SparseAutoencoder,
    VQEncoding,
    build_autoencoder,
    corrupt,
)
from models.autoencoders.quantizer import code_perplexity
from models.autoencoders.sparse import sparsity_penalty
from models.autoencoders.vae import gaussian_kl
from models.builders import BUILDERS
from models.catalog import AUTOENCODER_KINDS, ModelKind
from models.data import load_dataset

TINY = {"channels": [8, 16, 16]}  # small and fast; every model keeps its own other defaults
DIGIT_KINDS = [k for k in AUTOENCODERS if k != "kl-autoencoder"]


def test_every_model_kind_has_a_builder_and_every_autoencoder_kind_a_class() -> None:
    """The kinds a zoo card may name (`models.catalog`) are the kinds the registry can build: one
    list of autoencoder kinds serves the catalog, the builders and the evaluation."""
    assert set(BUILDERS) == set(get_args(ModelKind))
    assert list(AUTOENCODERS) == list(AUTOENCODER_KINDS)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_dataset("digits", "train").images, load_dataset("digits", "test").images


@pytest.fixture(scope="module")
def shapes() -> tuple[torch.Tensor, torch.Tensor]:
    """Real shapes images, average-pooled to 16×16 so that a test-sized run learns them quickly."""
    return (
        F.avg_pool2d(load_dataset("shapes", "train", n=512).images, 2),
        F.avg_pool2d(load_dataset("shapes", "test", n=128).images, 2),
    )


def tiny(kind: str, **network: object) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "kl-autoencoder":
        return build_autoencoder(kind, {"channels": [8, 16, 16], "num_res_blocks": 1, **network})
    return build_autoencoder(kind, {**TINY, **network})


def train(
    model: torch.nn.Module, images: torch.Tensor, steps: int, lr: float = 3e-3, batch: int = 64
) -> list[float]:
    """Adam on random batches; the AAE's discriminator gets its own step. Returns the losses."""
    generator = torch.Generator().manual_seed(0)
    if isinstance(model, AdversarialAutoencoder):
        main = torch.optim.Adam(model.autoencoder_parameters(), lr)
        disc = torch.optim.Adam(model.discriminator.parameters(), lr)
    else:
        main, disc = torch.optim.Adam(model.parameters(), lr), None
    losses = []
    model.train()
    for _ in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=generator)]
        loss, _ = model.loss(x, generator)
        main.zero_grad()
        loss.backward()
        main.step()
        losses.append(float(loss.detach()))
        if disc is not None:
            d_loss, _ = model.discriminator_loss(x, generator)
            disc.zero_grad()
            d_loss.backward()
            disc.step()
    return losses


# --- shapes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(AUTOENCODERS))
def test_shapes_of_encode_decode_reconstruct(kind: str) -> None:
    model = tiny(kind).eval()
    c, s = model.config.in_channels, model.config.image_size
    x = torch.rand(3, c, s, s) * 2 - 1
    with torch.no_grad():
        encoded = model.encode(x)
        if isinstance(model, VQVAE):
            assert isinstance(encoded, VQEncoding)
            assert encoded.codes.dtype == torch.int64
            assert list(encoded.codes.shape) == [3, *model.code_shape]
            assert int(encoded.codes.max()) < model.config.codebook_size
            latents = encoded.latents
            decoded = model.decode_codes(encoded.codes)
        else:
            latents = encoded
            decoded = model.decode(latents)
        recon = model.reconstruct(x)
    assert list(latents.shape) == [3, *model.latent_shape]
    assert decoded.shape == recon.shape == x.shape
    assert recon.min() >= -1 and recon.max() <= 1
    assert torch.allclose(decoded, recon)


def test_kl_autoencoder_latent_is_4x8x8_for_32x32_rgb() -> None:
    model = build_autoencoder("kl-autoencoder", {})
    assert model.latent_shape == [4, 8, 8]
    assert model.encode(torch.zeros(2, 3, 32, 32)).shape == (2, 4, 8, 8)


def test_config_round_trip_and_unknown_kind() -> None:
    model = tiny("vqvae")
    again = build_autoencoder("vqvae", {**model.config.to_dict(), "latent_std": 1.0})
    assert again.config == model.config
    with pytest.raises(KeyError, match="not an autoencoder"):
        build_autoencoder("diffusion", {})
    with pytest.raises(ValueError, match="exactly one"):
        build_autoencoder("autoencoder", {"latent_dim": 8, "latent_channels": 4})


# --- short training runs on real data -----------------------------------------------------------
def assert_learns(
    model: torch.nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    batch: int = 64,
    drop: float = 0.8,
) -> None:
    """The loss (mean of the last 5 steps vs the first 5) falls below `drop` of its start, and the
    test reconstructions have a lower MSE than the train set's mean image."""
    train_images, test_images = data
    losses = train(model, train_images, steps=steps, batch=batch)
    assert sum(losses[-5:]) / 5 < drop * sum(losses[:5]) / 5, losses
    model.eval()
    with torch.no_grad():
        mse = (model.reconstruct(test_images) - test_images).pow(2).mean()
    baseline = (train_images.mean(0, keepdim=True) - test_images).pow(2).mean()
    assert mse < baseline, (float(mse), float(baseline))


@pytest.mark.parametrize("kind", DIGIT_KINDS)
def test_training_lowers_the_loss_and_beats_the_mean_image(kind: str, digits) -> None:
    assert_learns(tiny(kind), digits, steps=60)


def test_kl_autoencoder_trains_on_shapes(shapes) -> None:
    torch.manual_seed(0)
    network = {"image_size": 16, "channels": [16, 32], "num_res_blocks": 0}
    model = build_autoencoder("kl-autoencoder", network)
    assert_learns(model, shapes, steps=200, batch=32, drop=0.5)


# --- sparse autoencoder -----------------------------------------------------------------------
def test_sparsity_penalty_equals_its_formula() -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.rand(16, 5, generator=g) * 0.9 + 0.05  # [N, J] in (0, 1)
    rho = 0.05
    expected = 0.0
    for j in range(5):
        rho_hat = float(hidden[:, j].mean())
        expected += rho * math.log(rho / rho_hat) + (1 - rho) * math.log((1 - rho) / (1 - rho_hat))
    assert float(sparsity_penalty(hidden, rho)) == pytest.approx(expected, rel=1e-5)
    assert float(sparsity_penalty(torch.full((4, 3), rho), rho)) == pytest.approx(0.0, abs=1e-6)


def test_sparse_loss_is_reconstruction_plus_beta_penalty(digits) -> None:
    model = tiny("sparse-autoencoder", beta=0.7)
    assert isinstance(model, SparseAutoencoder)
    x = digits[0][:32]
    loss, _ = model.loss(x)
    hidden = model.encode(x)
    recon = 0.5 * (model.decoder_output(hidden) - x).pow(2).flatten(1).sum(1).mean()
    expected = recon + 0.7 * sparsity_penalty(hidden, 0.05)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(hidden.min()) > 0 and float(hidden.max()) < 1


# --- VAE --------------------------------------------------------------------------------------
def test_vae_closed_form_kl_matches_monte_carlo() -> None:
    """KL(q ‖ p) = E_q[log q(z) − log p(z)], estimated with 200k samples per posterior."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, generator=g)
    logvar = torch.randn(3, 4, generator=g) * 0.5
    std = (0.5 * logvar).exp()
    z = mu + std * torch.randn(200_000, 3, 4, generator=g)  # [S, N, D]
    q = torch.distributions.Normal(mu, std)
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)  # [N]
    closed = gaussian_kl(mu, logvar)
    assert torch.allclose(closed, monte_carlo, rtol=0.02, atol=0.01), (closed, monte_carlo)
    torch_kl = torch.distributions.kl_divergence(q, p).sum(-1)
    assert torch.allclose(closed, torch_kl, atol=1e-5)


def test_vae_elbo_bits_per_dim_sampling_and_interpolation(digits) -> None:
    model = tiny("vae").eval()
    assert isinstance(model, VAE)
    x = digits[1][:6]
    with torch.no_grad():
        elbo = model.elbo_nats(x, torch.Generator().manual_seed(0))
        bpd = model.bits_per_dim(x, torch.Generator().manual_seed(0))
        loss, _ = model.loss(x, torch.Generator().manual_seed(0))
    dims = x[0].numel()
    assert elbo.shape == bpd.shape == (6,)
    expected_bpd = (-elbo + dims * math.log(127.5)) / (dims * math.log(2))
    assert torch.allclose(bpd, expected_bpd, atol=1e-4)
    assert float(loss) == pytest.approx(float(-elbo.mean() / dims), rel=1e-5)  # same noise
    samples = model.sample_prior(5, torch.Generator().manual_seed(1))
    assert samples.shape == (5, 1, 16, 16) and samples.abs().max() <= 1
    path = model.interpolate(x[:2], x[2:4], steps=7)
    assert path.shape == (2, 7, 1, 16, 16)
    assert torch.allclose(path[:, 0], model.reconstruct(x[:2]), atol=1e-6)
    assert torch.allclose(path[:, -1], model.reconstruct(x[2:4]), atol=1e-6)
    assert model.interpolate(x[0], x[1], steps=3).shape == (3, 1, 16, 16)


# --- AAE --------------------------------------------------------------------------------------
def test_aae_prior_samples_and_discriminator_objective(digits) -> None:
    model = tiny("adversarial-autoencoder")
    assert isinstance(model, AdversarialAutoencoder)
    samples = model.sample_prior(4, torch.Generator().manual_seed(0))
    assert samples.shape == (4, 1, 16, 16)
    loss, logs = model.discriminator_loss(digits[0][:32], torch.Generator().manual_seed(0))
    assert float(loss) > 0 and 0 <= logs["disc_acc"] <= 1
    # the discriminator's loss reaches the discriminator only, never the encoder
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.discriminator.parameters())


# --- VQ-VAE -----------------------------------------------------------------------------------
def test_straight_through_gradient_reaches_the_encoder(digits) -> None:
    model = tiny("vqvae")
    assert isinstance(model, VQVAE)
    x = digits[0][:16]
    z_e = model.encoder(x)
    z_e.retain_grad()
    z_q, codes, _ = model.quantizer(z_e)
    assert torch.allclose(z_q, model.quantizer.lookup(codes), atol=1e-6)  # forward: e_k
    z_q.retain_grad()
    (model.decoder_output(z_q) - x).pow(2).mean().backward()  # the reconstruction term only
    assert torch.equal(z_e.grad, z_q.grad)  # ∂L/∂z_q copied to z_e
    encoder_grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in encoder_grads)
    assert model.quantizer.codebook.grad is None  # codebook: only through L_vq


def test_codebook_starts_at_encoder_outputs() -> None:
    quantizer = tiny("vqvae").quantizer.train()
    z_e = torch.randn(2, quantizer.dim, 4, 4)
    quantizer(z_e, torch.Generator().manual_seed(0))
    vectors = z_e.permute(0, 2, 3, 1).reshape(-1, quantizer.dim)
    assert is_row_of(quantizer.codebook.detach(), vectors).all()
    assert bool(quantizer.initialized)


def test_vq_losses_and_perplexity() -> None:
    model = tiny("vqvae")
    quantizer = model.quantizer
    z_e = torch.randn(2, quantizer.dim, 4, 4, requires_grad=True)
    _, codes, loss = quantizer.eval()(z_e)
    e_k = quantizer.lookup(codes)
    expected = (e_k - z_e).pow(2).mean() * (1 + quantizer.beta)  # codebook + β·commitment
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    k = model.config.codebook_size
    assert float(code_perplexity(torch.arange(k), k)) == pytest.approx(k, rel=1e-4)
    assert float(code_perplexity(torch.zeros(10, dtype=torch.long), k)) == pytest.approx(1.0)


def is_row_of(rows: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """For each row of rows [R, D], whether it equals one of vectors [M, D] exactly → [R] bool."""
    return (rows[:, None, :] == vectors[None, :, :]).all(-1).any(1)


def test_dead_codes_restart_at_encoder_outputs() -> None:
    model = tiny("vqvae").train()
    quantizer = model.quantizer
    quantizer.initialized.fill_(True)  # skip the data-dependent start: test the restarts alone
    z_e = torch.randn(4, quantizer.dim, 4, 4) * 5  # [N, D, h, w], 64 positions
    vectors = z_e.permute(0, 2, 3, 1).reshape(-1, quantizer.dim)
    before = quantizer.codebook.detach().clone()
    used = torch.zeros(quantizer.codebook_size, dtype=torch.bool)
    used[quantizer.nearest(z_e).unique()] = True
    assert not used.all()
    for _ in range(400):  # the unchosen codes' usage decays below dead_share / K (~350 steps)
        quantizer(z_e, torch.Generator().manual_seed(0))
    restarted = (quantizer.codebook.detach() != before).any(1)
    assert torch.equal(restarted, ~used)  # every dead code and only those
    assert is_row_of(quantizer.codebook.detach()[restarted], vectors).all()


# --- DAE corruption -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["masking", "salt_pepper"])
@pytest.mark.parametrize("amount", [0.1, 0.25, 0.5])
def test_corruption_changes_exactly_the_fraction_asked(kind: str, amount: float) -> None:
    x = torch.zeros(8, 3, 16, 16)  # mid-grey: every corrupted pixel changes
    noisy = corrupt(x, kind, amount, torch.Generator().manual_seed(0))
    changed = (noisy != x).any(1)  # [N, H, W]: pixels, all channels alike
    assert torch.equal((noisy != x).all(1), changed)
    assert changed.flatten(1).sum(1).tolist() == [round(amount * 256)] * 8
    values = noisy.permute(0, 2, 3, 1)[changed]
    if kind == "masking":
        assert torch.all(values == -1.0)
    else:
        assert torch.all((values == -1.0) | (values == 1.0))
        assert 0.3 < float((values == 1.0).float().mean()) < 0.7


def test_gaussian_corruption_has_the_asked_sigma() -> None:
    x = torch.zeros(16, 1, 16, 16)
    noisy = corrupt(x, "gaussian", 0.2, torch.Generator().manual_seed(0))
    assert float((noisy - x).std()) == pytest.approx(0.2, rel=0.05)
    assert (noisy != x).float().mean() > 0.99


def test_corruption_is_seeded_and_validated() -> None:
    x = torch.zeros(2, 1, 8, 8)
    for kind in NOISE_KINDS:
        a = corrupt(x, kind, 0.3, torch.Generator().manual_seed(3))
        b = corrupt(x, kind, 0.3, torch.Generator().manual_seed(3))
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown noise kind"):
        corrupt(x, "speckle", 0.1)
    with pytest.raises(ValueError, match="fraction"):
        corrupt(x, "masking", 1.5)
