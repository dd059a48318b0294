"""Image-to-image on an imported text pipeline (the `StableDiffusionPipeline` layout) over HTTP:
`ddserve import` of a tiny pipeline saved locally (`tests/tiny_sd.py`), the whole stack in this
process (`LocalServer`), and `POST /img2img` with a prompt and a negative prompt; the images equal
diffusers' `StableDiffusionImg2ImgPipeline` on the same components.

Same inputs: the worker encodes the uploaded image with the pipeline's VAE, z_0 = s·μ(x) (the
posterior mean: ddserve's latents are deterministic); the pipeline is handed those latents as its
4-channel `image` (which it takes as they are) and, per image, the generator of its seed, from which
both sides draw ε first."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ddserve.client.sync import Client
from ddserve.embedded import LocalServer
from models.catalog import load_catalog
from tests.client_support import tiny_sd_stack
from workers.execute import image_generator

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

NAME = "tiny-sd"


# A folder saved from `StableDiffusionImg2ImgPipeline` holds the same components as one saved from
# `StableDiffusionPipeline` (its model_index.json names the other class) and serves the same.
@pytest.fixture(
    scope="module", params=["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"]
)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalServer, Any]]:
    root = tmp_path_factory.mktemp("sd-img2img")
    saved_as = request.param
    with tiny_sd_stack(root, NAME, "sd-img2img", pipeline_class=saved_as) as (server, pipe):
        assert load_catalog(server.settings.model_repository())[NAME].pipeline == saved_as
        yield server, diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)


def test_the_pipeline_class_is_kept_and_every_task_is_served(
    stack: tuple[LocalServer, Any],
) -> None:
    server, _ = stack
    with Client(server.url) as client:
        model = client.model(NAME)
        assert model.tasks == ["generate", "inpaint"]
        body = {"prompt": "a cat", "num_inference_steps": 3, "seed": 1}
        assert client.generate(NAME, **body).succeeded
        mask = np.ones((16, 16), bool)
        mask[4:12, 4:12] = False
        assert client.inpaint(NAME, picture(), mask, **body).succeeded


def picture() -> np.ndarray:
    """A 16×16 RGB test card: a red disc on a blue-green gradient, uint8."""
    y, x = np.mgrid[0:16, 0:16]
    rgb = np.stack([x * 8, 128 + y * 4, 255 - x * 8], axis=-1)
    rgb[(x - 8) ** 2 + (y - 8) ** 2 < 20] = (230, 30, 30)
    return rgb.astype(np.uint8)


def test_img2img_on_a_text_pipeline_equals_the_img2img_pipeline(
    stack: tuple[LocalServer, Any],
) -> None:
    server, pipe = stack
    strength, steps, seed = 0.6, 10, 4
    with Client(server.url) as client:
        job = client.img2img(
            NAME,
            picture(),
            strength=strength,
            prompt="a red circle",
            negative_prompt="green",
            n=2,
            num_inference_steps=steps,
            seed=seed,
        )
        assert job.succeeded, job.error
        ours = [np.asarray(Image.open(io.BytesIO(d))) for d in client.download_images(job)]
    pixels = torch.from_numpy(picture()).permute(2, 0, 1).float()[None] / 127.5 - 1.0
    with torch.no_grad():
        mean = pipe.vae.encode(pixels).latent_dist.mean  # [1, 4, 8, 8]
    z0 = (mean * pipe.vae.config.scaling_factor).repeat(2, 1, 1, 1)
    theirs = pipe(
        prompt=["a red circle"] * 2,
        negative_prompt=["green"] * 2,
        image=z0,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=[image_generator(seed, i) for i in (0, 1)],
        output_type="np",
    ).images  # [2, 16, 16, 3] in [0, 1]
    expected = (theirs * 255).round().astype(int)
    for got, want in zip(ours, expected, strict=True):
        assert got.shape == (16, 16, 3)
        assert int(np.abs(got.astype(int) - want).max()) <= 1
    assert not np.array_equal(ours[0], ours[1])  # each image its own noise stream
