"""Parity: ddserve's batched sampler on a text-conditioned latent pipeline vs diffusers'
`StableDiffusionPipeline` itself (tiny random components, `tests/tiny_sd.py`).

Same noise: both sides start from the same x_T (the pipeline's `latents=`, ddserve's `Sample.x`);
with η > 0 each image runs through the pipeline alone with `generator=` a clone of the
`torch.Generator` its ddserve sample draws from, so the per-step noise z (one [1, 4, 8, 8] draw per
step on both sides) is the same. Guidance 7.5 with a prompt and a negative prompt (and the empty
one); the latents (`output_type="latent"`) and the decoded images (`output_type="pt"`) must agree
to 1e-4."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from ddserve.params import guidance_weight
from models.diffusers_format.text import CrossAttentionUNet, PromptEncoder, decode_latents
from models.diffusion.noise import sample_generator
from models.diffusion.sampler import DenoisingBatch, Sample, SamplerSettings
from models.diffusion.scheduler_config import from_diffusers
from tests.tiny_sd import tiny_sd_pipeline

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

TOLERANCE = 1e-4
GUIDANCE = 7.5
PROMPTS = ["a red circle", "a blue dog", "yellow square"]
NEGATIVES = ["green", None, "photo of a cat"]  # None: the pipeline's "" (ddserve's ∅)
# Scheduler configs on top of SD 1.x's (tests/tiny_sd.py: scaled_linear, steps_offset 1,
# set_alpha_to_one False): the model's own, DDIM's ᾱ_{-1} = 1 with trailing spacing, v-prediction.
CONFIGS = {
    "sd": {},
    "trailing": {"set_alpha_to_one": True, "timestep_spacing": "trailing"},
    "v": {"prediction_type": "v_prediction", "timestep_spacing": "linspace"},
}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.set_num_threads(1)
    return {
        name: tiny_sd_pipeline(tmp_path_factory.mktemp(name), **config)
        for name, config in CONFIGS.items()
    }


@pytest.fixture
def pipe(pipes: dict[str, Any]) -> Any:
    return pipes["sd"]


def x_T(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(seed))  # [n, 4, 8, 8]


def ddserve_latents(
    pipe: Any,
    encoder: PromptEncoder,
    settings: SamplerSettings,
    prompts: Sequence[str],
    negatives: Sequence[str | None],
    latents: torch.Tensor,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """The samples of `prompts` in one running set of ddserve's sampler on the pipeline's UNet,
    with the schedule of the pipeline's own scheduler config."""
    schedule, options = from_diffusers(dict(pipe.scheduler.config))
    batch = DenoisingBatch(
        CrossAttentionUNet(pipe.unet),
        schedule,
        (4, 8, 8),
        prediction_type=options.prediction_type,
        null_condition=encoder.null_condition(),
    )
    conds = encoder.rows(list(prompts))
    samples = [
        Sample(
            settings,
            generators[i],
            cond=conds[i],
            uncond=None if negatives[i] is None else encoder.rows([negatives[i]])[0],
            x=latents[i],
        )
        for i in range(len(prompts))
    ]
    batch.add(samples)
    with torch.no_grad():
        while len(batch):
            batch.step()
    return torch.stack([s.x for s in samples])


def diffusers_call(pipe: Any, prompts: Sequence[str], negatives: Sequence[str | None], **kw: Any):
    return pipe(
        prompt=list(prompts),
        negative_prompt=[n or "" for n in negatives],
        guidance_scale=GUIDANCE,
        **kw,
    ).images


def settings_of(pipe: Any, steps: int, eta: float = 0.0) -> SamplerSettings:
    """A request's settings on this model: its scheduler config's sampler and options."""
    _, options = from_diffusers(dict(pipe.scheduler.config))
    return options.settings(None, steps, eta=eta, guidance_scale=guidance_weight(GUIDANCE))


@pytest.mark.parametrize(("config", "steps"), [("sd", 10), ("sd", 25), ("trailing", 48), ("v", 12)])
def test_ddim_with_prompts_and_negative_prompts_matches_the_pipeline(
    pipes: dict[str, Any], config: str, steps: int
) -> None:
    pipe = pipes[config]
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    start = x_T(len(PROMPTS))
    settings = settings_of(pipe, steps)
    assert settings.sampler == "ddim"  # the model's own scheduler class
    gens = [sample_generator(0, i) for i in range(len(PROMPTS))]  # unused at η = 0
    ours = ddserve_latents(pipe, encoder, settings, PROMPTS, NEGATIVES, start, gens)
    common = dict(num_inference_steps=steps, latents=start.clone(), eta=0.0)
    theirs = diffusers_call(pipe, PROMPTS, NEGATIVES, output_type="latent", **common)
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    images = diffusers_call(pipe, PROMPTS, NEGATIVES, output_type="pt", **common)  # [n, 3, 16, 16]
    decoded = decode_latents(pipe.vae, ours, pipe.vae.config.scaling_factor)
    decoded = (decoded / 2 + 0.5).clamp(0, 1)  # the pipeline's postprocessing to [0, 1]
    assert decoded.shape == images.shape == (3, 3, 16, 16)
    assert (decoded - images).abs().max().item() <= TOLERANCE
    assert (ours[0] - ours[1]).abs().max() > 1e-2  # the prompts matter


def test_ddim_eta_one_with_the_same_per_step_noise_matches_the_pipeline(pipe: Any) -> None:
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    start = x_T(1, seed=3)
    settings = settings_of(pipe, 8, eta=1.0)
    prompts, negatives = PROMPTS[:1], NEGATIVES[:1]
    ours = ddserve_latents(
        pipe, encoder, settings, prompts, negatives, start, [sample_generator(7, 0)]
    )
    theirs = diffusers_call(
        pipe,
        prompts,
        negatives,
        num_inference_steps=8,
        latents=start.clone(),
        eta=1.0,
        generator=sample_generator(7, 0),
        output_type="latent",
    )
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    deterministic = ddserve_latents(
        pipe,
        encoder,
        settings_of(pipe, 8),
        prompts,
        negatives,
        start,
        [sample_generator(7, 0)],
    )
    assert (ours - deterministic).abs().max() > 1e-2  # the noise was drawn and used


def test_the_prompt_encoder_caches_rows_and_matches_the_pipelines_embeddings(pipe: Any) -> None:
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, cache_size=2)
    embeds, negative = pipe.encode_prompt(
        PROMPTS[:2], "cpu", 1, True, negative_prompt=["green", ""]
    )  # [2, 77, 32] each
    rows = encoder.rows(PROMPTS[:2])
    assert encoder.encoder_calls == 1  # two prompts, one call
    assert torch.allclose(torch.stack(rows), embeds, atol=1e-6)
    assert torch.allclose(encoder.rows(["green"])[0], negative[0], atol=1e-6)
    assert torch.allclose(encoder.null_condition(), negative[1], atol=1e-6)
    calls = encoder.encoder_calls
    assert encoder.rows([""])[0] is encoder.null_condition()  # cached: no call
    assert encoder.encoder_calls == calls and len(encoder) == 2
    encoder.rows([PROMPTS[0]])  # evicted by "green" (∅ is kept apart): one more call
    assert encoder.encoder_calls == calls + 1


def test_decode_applies_the_shift_factor(pipe: Any, tmp_path: Path) -> None:
    z = x_T(2, seed=5)
    scale, shift = pipe.vae.config.scaling_factor, 0.25
    with torch.no_grad():
        want = pipe.vae.decode(z / scale + shift).sample
    assert torch.equal(decode_latents(pipe.vae, z, scale, shift), want)


def test_a_prompt_past_the_context_length_is_cut_with_a_warning(
    pipe: Any, caplog: pytest.LogCaptureFixture
) -> None:
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    long_prompt = " ".join(["red"] * 100)  # 100 words, 102 tokens with the specials
    with caplog.at_level("WARNING", logger="models.diffusers_format.text"):
        (row,) = encoder.rows([long_prompt])
    assert row.shape == (77, 32)
    assert "prompt of 102 tokens cut to the text encoder's 77" in caplog.text
    (embeds,) = pipe.encode_prompt([long_prompt], "cpu", 1, False)[:1]
    assert torch.allclose(row, embeds[0], atol=1e-6)  # cut as the pipeline cuts it
