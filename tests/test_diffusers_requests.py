"""Requests to imported diffusers models checked by the gateway (torch-free): what each model
accepts follows from its pipeline's JSON files."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddserve.requests import GenerateBody
from models.catalog import load_catalog
from service.errors import ApiError
from service.normalize import RequestNormalizer
from service.uploads import UploadLimits


@pytest.fixture(scope="module")
def normalizer(pipelines_dir: Path) -> RequestNormalizer:
    catalog = load_catalog(pipelines_dir)
    served = {name for name, entry in catalog.items() if entry.tasks}
    return RequestNormalizer(catalog, served, UploadLimits(1 << 20, 1 << 20))


def rejected(normalizer: RequestNormalizer, **body: object) -> ApiError:
    with pytest.raises(ApiError) as caught:
        normalizer.generate(GenerateBody.model_validate(body))
    assert caught.value.status == 422
    return caught.value


def test_defaults_come_from_the_scheduler_config(normalizer: RequestNormalizer) -> None:
    spec = normalizer.generate(GenerateBody(model="ddim", seed=1))
    assert (spec.sampler, spec.num_inference_steps, spec.clip_denoised) == ("ddim", 50, False)
    spec = normalizer.generate(GenerateBody(model="ddpm", seed=1, num_inference_steps=10))
    assert (spec.sampler, spec.clip_denoised) == ("ddpm", True)
    spec = normalizer.generate(GenerateBody(model="ddpm-class", class_label=3, seed=1))
    assert spec.class_label == 3 and spec.guidance_scale == 1.0


def test_class_conditional_unet_needs_a_label_and_takes_no_guidance(
    normalizer: RequestNormalizer,
) -> None:
    assert rejected(normalizer, model="ddpm-class").code == "class_label_required"
    error = rejected(normalizer, model="ddpm-class", class_label=4)
    assert error.code == "class_out_of_range" and "0 ≤ class_label < 4" in error.message
    error = rejected(normalizer, model="ddpm-class", class_label=1, guidance_scale=3.0)
    assert error.code == "guidance_unsupported"


def test_unconditional_models_refuse_labels_and_prompts(normalizer: RequestNormalizer) -> None:
    assert rejected(normalizer, model="ddpm", class_label=0).code == "not_class_conditional"
    assert rejected(normalizer, model="ldm", prompt="a cat").code == "not_text_conditional"
    assert rejected(normalizer, model="ddim", num_inference_steps=1001).code == "too_many_steps"
