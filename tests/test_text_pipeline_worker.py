"""The worker's side of a text pipeline: a job's prompt and negative prompt become its samples'
conditioning rows through the model's own text encoder, once per distinct prompt (LRU cache), and a
job runs as diffusers' `StableDiffusionPipeline` runs the same inputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ddserve.spec import GenerateSpec, parse_job_spec
from models.catalog import Conditioning, ImageSpec, ModelEntry
from models.diffusers_format.text import CrossAttentionUNet, PromptEncoder, decode_latents
from models.diffusion.scheduler_config import from_diffusers
from tests import specs
from tests.tiny_sd import tiny_sd_pipeline
from workers.execute import InvalidJobRequest, prepare_denoise
from workers.model_pool import Denoiser, DiffusionModel

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

NAME = "tiny-sd"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    torch.set_num_threads(1)
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd-worker"))


def text_model(pipe: Any, cache_size: int = 8) -> DiffusionModel:
    """The DiffusionModel a worker holds for the pipeline (as the pool builds it)."""
    schedule, options = from_diffusers(dict(pipe.scheduler.config))
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, cache_size)
    entry = ModelEntry(
        name=NAME,
        kind="latent-diffusion",
        tasks=["generate"],
        dataset="",
        image=ImageSpec(channels=3, height=16, width=16),
        latent_shape=[4, 8, 8],
        conditioning=Conditioning(type="text", context_len=77),
        prediction_type=options.prediction_type,
    )
    return DiffusionModel(
        entry=entry,
        denoiser=Denoiser(CrossAttentionUNet(pipe.unet), channels_last=False),
        schedule=schedule,
        sample_shape=(4, 8, 8),
        device=torch.device("cpu"),
        null_condition=encoder.null_condition(),
        prompt_encoder=encoder,
        scheduler=options,
    )


def spec(**fields: Any) -> GenerateSpec:
    base = {"prompt": "a red circle", "guidance_scale": 7.5, "n": 2, "num_inference_steps": 4}
    parsed = parse_job_spec(specs.generate(NAME, **{**base, **fields}))
    assert isinstance(parsed, GenerateSpec)
    return parsed


def test_each_distinct_prompt_costs_one_text_encoder_call(pipe: Any) -> None:
    model = text_model(pipe)
    encoder = model.prompt_encoder
    assert encoder is not None and encoder.encoder_calls == 1  # "" for ∅, at load
    first = prepare_denoise(spec(negative_prompt="green"), model, "j1")
    assert encoder.encoder_calls == 2  # the prompt and the negative prompt, one call
    cond, uncond = first.samples[0].cond, first.samples[0].uncond
    assert cond is not None and cond.shape == (77, 32) and uncond is not None
    assert all(s.cond is cond and s.uncond is uncond for s in first.samples)  # shared rows
    again = prepare_denoise(spec(negative_prompt="green", seed=9), model, "j2")
    plain = prepare_denoise(spec(), model, "j3")
    empty = prepare_denoise(spec(negative_prompt=""), model, "j4")
    assert encoder.encoder_calls == 2  # all cached: no call
    assert again.samples[0].cond is cond and plain.samples[0].uncond is None
    assert empty.samples[0].uncond is model.null_condition  # "" is ∅ itself
    prepare_denoise(spec(prompt="a blue dog", negative_prompt="green"), model, "j5")
    assert encoder.encoder_calls == 3  # only the new prompt


def test_a_job_runs_as_the_pipeline_does(pipe: Any) -> None:
    """The worker's samples of one job, stepped to the end and decoded, equal the pipeline's
    images from the same x_T (each sample's own, drawn from its seed's stream)."""
    model = text_model(pipe)
    job = spec(negative_prompt="photo of a cat", num_inference_steps=6, seed=4)
    work = prepare_denoise(job, model, "j")
    batch = model.new_batch()
    batch.add(work.samples)
    start = torch.stack([s.x for s in work.samples if s.x is not None]).clone()  # [2, 4, 8, 8]
    with torch.no_grad():
        while len(batch):
            batch.step()
    latents = torch.stack([s.x for s in work.samples if s.x is not None])
    images = pipe(
        prompt=[job.prompt] * 2,
        negative_prompt=[job.negative_prompt] * 2,
        guidance_scale=7.5,
        num_inference_steps=6,
        latents=start,
        output_type="pt",
    ).images  # [2, 3, 16, 16] in [0, 1]
    decoded = decode_latents(pipe.vae, latents, pipe.vae.config.scaling_factor)
    assert ((decoded / 2 + 0.5).clamp(0, 1) - images).abs().max().item() <= 1e-4


def test_a_word_model_without_prompt_tokens_fails_the_job_clearly(pipe: Any) -> None:
    model = text_model(pipe)
    model.prompt_encoder = None  # as a zoo text model, whose gateway tokenizes
    with pytest.raises(InvalidJobRequest, match="prompt_tokens"):
        prepare_denoise(spec(), model, "j")


def run(model: DiffusionModel, works: list[Any], join_after: int = 0) -> list[torch.Tensor]:
    """The works' samples in one running set (all but the first joining after `join_after`
    steps); their final latents, in order."""
    batch = model.new_batch()
    batch.add(works[0].samples)
    with torch.no_grad():
        for _ in range(join_after):
            batch.step()
        for work in works[1:]:
            batch.add(work.samples)
        while len(batch):
            batch.step()
    return [s.x for work in works for s in work.samples]


def test_mixed_prompts_negatives_and_guidance_in_one_batch_equal_each_alone(pipe: Any) -> None:
    model = text_model(pipe)
    jobs = [
        spec(negative_prompt="green", seed=1),
        spec(prompt="a blue dog", seed=2, guidance_scale=3.0, num_inference_steps=6),
        spec(prompt="yellow square", seed=3, guidance_scale=1.0, n=1),
        spec(negative_prompt="photo of a cat", seed=4, sampler="ddpm", num_inference_steps=5),
        spec(prompt="a red circle", negative_prompt="", seed=1),  # = the first without negative
    ]
    alone = [run(model, [prepare_denoise(job, model, f"a{i}")]) for i, job in enumerate(jobs)]
    works = [prepare_denoise(job, model, f"b{i}") for i, job in enumerate(jobs)]
    together = run(model, works, join_after=2)
    flat = [x for rows in alone for x in rows]
    assert len(flat) == len(together) == 9
    # Equal up to float summation order: the UNet's matrix products vary in the last bits with
    # the number of rows (measured ≤ 1.5e-5 here, DDPM with clipping the largest).
    for i, (a, b) in enumerate(zip(flat, together, strict=True)):
        assert torch.allclose(a, b, atol=1e-4), (i, (a - b).abs().max().item())
    assert (alone[0][0] - alone[4][0]).abs().max() > 1e-2  # the negative prompt steered
