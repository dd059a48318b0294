"""Parity: an inpainting UNet (`StableDiffusionInpaintPipeline`'s 9-channel layout) served by
ddserve's batched sampler vs diffusers' `StableDiffusionInpaintPipeline` itself (tiny random
components, `tests/tiny_sd.py`; SD 1.x's scheduler config with the tiny folder's DDIMScheduler).

Same inputs: each row's image and mask (the pipeline's mask is 1 = repaint, ddserve's 1 = keep),
prompts and negative prompts, guidance 7.5; the pipeline gets one generator per row, from which it
draws x_T, then the masked image's posterior sample, then DDIM's step noise (η > 0) — ddserve the
same from the sample's own stream. Latents within 1e-4 (or 4e-6 of their magnitude); rows of different masks, prompts,
samplers and step counts share each network call and give their solo latents."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ddserve.params import guidance_weight
from models.diffusers_format.text import CrossAttentionUNet, PromptEncoder
from models.diffusion.inpainting_unet import (
    ImagePosterior,
    MaskedImageLatents,
    latent_repaint_mask,
    masked_pixels,
)
from models.diffusion.noise import sample_generator
from models.diffusion.sampler import DenoisingBatch, Sample, SamplerSettings
from models.diffusion.scheduler_config import from_diffusers
from tests.tiny_sd import tiny_sd_pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

TOLERANCE = 1e-4
GUIDANCE = 7.5
PROMPTS = ["a red circle", "a blue dog"]
NEGATIVES = ["green", None]  # None: the pipeline's "" (ddserve's ∅)
SEED = 17


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    torch.set_num_threads(1)
    return tiny_sd_pipeline(
        tmp_path_factory.mktemp("sd-inpaint"),
        pipeline_class="StableDiffusionInpaintPipeline",
        unet_channels=9,
    )


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Images [2, 3, 16, 16] in [−1, 1] and ddserve masks [2, 1, 16, 16] (1 = keep): the right
    half, and a 6×5 block off the latent grid's patches (odd edges)."""
    images = 2.0 * torch.rand((2, 3, 16, 16), generator=torch.Generator().manual_seed(3)) - 1.0
    keep = torch.ones((2, 1, 16, 16))
    keep[0, :, :, 8:] = 0
    keep[1, :, 3:9, 5:10] = 0
    return images, keep


def masked_image(pipe: Any, image: torch.Tensor, keep: torch.Tensor) -> MaskedImageLatents:
    """What the worker builds (`DiffusionModel.masked_image_latents`), with the pipeline's VAE."""
    with torch.no_grad():
        posterior = pipe.vae.encode(masked_pixels(image, keep)[None]).latent_dist
    return MaskedImageLatents(
        mask=latent_repaint_mask(keep, (8, 8)),
        mean=posterior.mean[0],
        std=posterior.std[0],
        scaling_factor=pipe.vae.config.scaling_factor,
    )


def image_posterior(pipe: Any, image: torch.Tensor) -> ImagePosterior:
    """The whole image's posterior, where a row of strength < 1 starts (the worker's
    `DiffusionModel.image_posterior`), with the pipeline's VAE."""
    with torch.no_grad():
        posterior = pipe.vae.encode(image[None]).latent_dist
    return ImagePosterior(posterior.mean[0], posterior.std[0], pipe.vae.config.scaling_factor)


def settings_of(pipe: Any, steps: int, **request: Any) -> tuple[Any, SamplerSettings, Any]:
    schedule, options = from_diffusers(dict(pipe.scheduler.config))
    settings = options.settings(
        request.pop("sampler", "ddim"),
        steps,
        guidance_scale=guidance_weight(GUIDANCE),
        **request,
    )
    return schedule, settings, options


def new_batch(pipe: Any, schedule: Any, options: Any, encoder: PromptEncoder) -> DenoisingBatch:
    return DenoisingBatch(
        CrossAttentionUNet(pipe.unet),
        schedule,
        (4, 8, 8),
        prediction_type=options.prediction_type,
        null_condition=encoder.null_condition(),
    )


def samples_of(
    pipe: Any, encoder: PromptEncoder, settings: list[SamplerSettings], rows: list[int]
) -> list[Sample]:
    images, keep = inputs()
    return [
        Sample(
            settings[k],
            sample_generator(SEED, i),
            cond=encoder.rows([PROMPTS[i]])[0],
            uncond=None if NEGATIVES[i] is None else encoder.rows([NEGATIVES[i]])[0],
            masked_image=masked_image(pipe, images[i], keep[i]),
            init_posterior=image_posterior(pipe, images[i]) if settings[k].strength < 1 else None,
            tag=i,
        )
        for k, i in enumerate(rows)
    ]


def pipeline_latents(
    pipe: Any, images: torch.Tensor, keep: torch.Tensor, steps: int, **options: Any
) -> torch.Tensor:
    """`StableDiffusionInpaintPipeline`'s latents for `inputs()` (PROMPTS, NEGATIVES, GUIDANCE,
    one generator per image seeded as ddserve seeds its rows), with `options` (eta, strength)."""
    return pipe(
        prompt=PROMPTS,
        negative_prompt=[n or "" for n in NEGATIVES],
        image=(images + 1.0) / 2.0,  # the pipeline takes [0, 1] and maps it to 2x − 1
        mask_image=1.0 - keep,  # the pipeline's mask: 1 = repaint
        height=16,
        width=16,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        generator=[sample_generator(SEED, i) for i in range(2)],
        output_type="latent",
        **options,
    ).images


def run(batch: DenoisingBatch, samples: list[Sample]) -> torch.Tensor:
    batch.add(samples)
    with torch.no_grad():
        while len(batch):
            batch.step()
    return torch.stack([s.x for s in samples])


@pytest.mark.parametrize(
    ("scheduler", "eta"),
    [
        ("DDIMScheduler", 0.0),  # the tiny folder's own scheduler class
        ("DDIMScheduler", 1.0),  # step noise drawn after x_T and the posterior sample
        ("EulerDiscreteScheduler", 0.0),  # σ-space: the UNet reads scale_model_input(x̃) = x
        ("EulerAncestralDiscreteScheduler", 0.0),
    ],
)
def test_inpainting_unet_matches_the_inpaint_pipeline(
    pipe: Any, scheduler: str, eta: float
) -> None:
    steps = 8
    # The σ-space classes at their own default ``linspace`` spacing (Euler: σ_0·ε to start,
    # fractional timesteps; `test_sigma_spacing_parity.py` covers every spacing).
    config = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
    if scheduler.startswith("Euler"):
        config["timestep_spacing"] = "linspace"
    pipe = diffusers.StableDiffusionInpaintPipeline(
        **{**pipe.components, "scheduler": getattr(diffusers, scheduler).from_config(config)}
    )
    pipe.set_progress_bar_config(disable=True)
    images, keep = inputs()
    theirs = pipeline_latents(pipe, images, keep, steps, eta=eta)
    _, options = from_diffusers(dict(pipe.scheduler.config))
    request = {"eta": eta} if options.sampler == "ddim" else {}
    schedule, settings, options = settings_of(pipe, steps, sampler=options.sampler, **request)
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    mine = run(
        new_batch(pipe, schedule, options, encoder),
        samples_of(pipe, encoder, [settings] * 2, [0, 1]),
    )
    gap = (mine - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    print(f"{scheduler} η {eta}: max |ddserve − diffusers| = {gap:.2e} (latents up to {scale:.0f})")
    # 1e-4, or 4e-6 of the latents' magnitude where that is more: Euler ancestral's ``linspace``
    # latents reach ~51 here (``leading``'s ~29), and float32 rounding amplified by guidance 7.5
    # leaves 1.4e-4 (2.7e-6 of it; ``leading`` 4.9e-5, 1.7e-6). Rounding, not another trajectory:
    # at guidance 2 the same gap is 3.8e-5.
    assert gap <= max(TOLERANCE, 4e-6 * scale)
    assert (mine[0] - mine[1]).abs().mean() > 1e-2


STRENGTH = 0.6


@pytest.mark.parametrize(
    ("scheduler", "spacing"),
    [
        ("DDIMScheduler", "leading"),
        ("DDIMScheduler", "linspace"),
        ("EulerDiscreteScheduler", "leading"),
        ("EulerDiscreteScheduler", "linspace"),
    ],
)
def test_strength_below_one_matches_the_inpaint_pipeline(
    pipe: Any, scheduler: str, spacing: str
) -> None:
    """`strength` 0.6 of 10 steps: the pipeline draws the image's posterior sample, then ε, then
    the masked image's, noises the image latents to the 6-step tail's first timestep and walks it
    (η = 0 for DDIM: no step noise)."""
    steps = 10
    config = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
    config["timestep_spacing"] = spacing
    pipe = diffusers.StableDiffusionInpaintPipeline(
        **{**pipe.components, "scheduler": getattr(diffusers, scheduler).from_config(config)}
    )
    pipe.set_progress_bar_config(disable=True)
    images, keep = inputs()
    theirs = pipeline_latents(pipe, images, keep, steps, strength=STRENGTH)
    _, options = from_diffusers(dict(pipe.scheduler.config))
    schedule, settings, options = settings_of(
        pipe, steps, sampler=options.sampler, strength=STRENGTH
    )
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    batch = new_batch(pipe, schedule, options, encoder)
    mine = run(batch, samples_of(pipe, encoder, [settings] * 2, [0, 1]))
    gap = (mine - theirs).abs().max().item()
    print(f"{scheduler} {spacing} strength {STRENGTH}: max |ddserve − diffusers| = {gap:.2e}")
    assert batch.network_calls == int(steps * STRENGTH)  # the tail only
    assert gap <= TOLERANCE
    # The image shows through: strength 1 from the same streams lands elsewhere.
    _, full, _ = settings_of(pipe, steps, sampler=options.sampler)
    generated = run(
        new_batch(pipe, schedule, options, encoder), samples_of(pipe, encoder, [full], [0])
    )
    assert (generated[0] - mine[0]).abs().mean() > 1e-2


def test_rows_of_strength_one_and_below_share_calls_and_give_their_solo_latents(
    pipe: Any,
) -> None:
    schedule, whole, options = settings_of(pipe, 8)
    _, tail, _ = settings_of(pipe, 8, strength=STRENGTH)
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    alone = []
    for k, i in enumerate([0, 1]):
        batch = new_batch(pipe, schedule, options, encoder)
        alone.append(run(batch, samples_of(pipe, encoder, [[whole, tail][k]], [i]))[0])
    together = new_batch(pipe, schedule, options, encoder)
    mixed = run(together, samples_of(pipe, encoder, [whole, tail], [0, 1]))
    assert together.network_calls == 8  # the strength-0.6 row joins the others' calls
    for got, want in zip(mixed, alone, strict=True):
        assert (got - want).abs().max().item() <= 1e-5


def test_rows_of_different_masks_and_samplers_share_calls_and_give_their_solo_latents(
    pipe: Any,
) -> None:
    schedule, ddim, options = settings_of(pipe, 8)
    _, euler, _ = settings_of(pipe, 5, sampler="euler")
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    alone, calls_alone = [], 0
    for k, i in enumerate([0, 1]):
        batch = new_batch(pipe, schedule, options, encoder)
        alone.append(run(batch, samples_of(pipe, encoder, [[ddim, euler][k]], [i]))[0])
        calls_alone += batch.network_calls
    together = new_batch(pipe, schedule, options, encoder)
    mixed = run(together, samples_of(pipe, encoder, [ddim, euler], [0, 1]))
    assert together.network_calls == 8 < calls_alone == 13
    for got, want in zip(mixed, alone, strict=True):
        assert (got - want).abs().max().item() <= 1e-5


def test_a_batch_does_not_mix_inpainting_rows_with_plain_ones(pipe: Any) -> None:
    schedule, settings, options = settings_of(pipe, 4)
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    batch = new_batch(pipe, schedule, options, encoder)
    batch.add(samples_of(pipe, encoder, [settings], [0]))
    plain = Sample(settings, sample_generator(SEED, 1), cond=encoder.rows(["a cat"])[0])
    with pytest.raises(ValueError, match="all have them or none"):
        batch.add([plain])


def test_a_row_that_fails_alone_is_a_nan_row_of_the_prediction_shape() -> None:
    """Regression: the engine's `IsolatingNetwork` made a failed row's NaN output of the input's
    shape, which for an inpainting UNet (9 channels in, 4 out) could not join the other rows."""
    from workers.isolation import IsolatingNetwork

    def network(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if bool((t == 7).any()):
            raise RuntimeError("this row breaks the network")
        return x[:, :4]

    isolating = IsolatingNetwork(network, out_channels=4)
    out = isolating(torch.zeros((3, 9, 8, 8)), torch.tensor([1, 7, 2]), None)
    assert out.shape == (3, 4, 8, 8) and set(isolating.failures) == {1}
    assert bool(out[1].isnan().all()) and bool(torch.isfinite(out[[0, 2]]).all())
