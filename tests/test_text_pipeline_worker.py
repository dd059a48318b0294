"""The worker's side of a text pipeline: a job's prompt and negative prompt become its samples'
conditioning rows through the model's own text encoder, once per distinct prompt (LRU cache)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ddserve.spec import GenerateSpec, parse_job_spec
from models.catalog import Conditioning, ImageSpec, ModelEntry
from models.diffusers_format.text import CrossAttentionUNet, PromptEncoder
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


def test_a_word_model_without_prompt_tokens_fails_the_job_clearly(pipe: Any) -> None:
    model = text_model(pipe)
    model.prompt_encoder = None  # as a zoo text model, whose gateway tokenizes
    with pytest.raises(InvalidJobRequest, match="prompt_tokens"):
        prepare_denoise(spec(), model, "j")
