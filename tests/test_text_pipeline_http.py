"""A text pipeline (the `StableDiffusionPipeline` layout) imported and served over HTTP: `ddserve
import` of a tiny pipeline saved locally (`tests/tiny_sd.py`), then the whole stack in this process
(`LocalServer`: gateway + batching worker on fakeredis). Prompts and negative prompts reach the
worker as text; images equal the pipeline's own; mixed requests in one batch equal each alone."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from ddserve.client.errors import ApiError
from ddserve.client.sync import Client
from ddserve.client.types import Job
from ddserve.embedded import LocalServer
from ddserve.settings import Settings
from models.diffusers_format.importer import ImportFailed, import_pipeline
from tests.client_support import assert_batched_equal_alone, job_images, same_pixels, tiny_sd_stack
from workers.execute import image_generator

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

NAME = "tiny-sd"
STEPS = 5


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalServer, Any]]:
    root = tmp_path_factory.mktemp("sd-http")
    with tiny_sd_stack(root, NAME, "sd-http", text_cache_size=4) as served:
        yield served


@pytest.fixture
def client(stack: tuple[LocalServer, Any]) -> Iterator[Client]:
    with Client(stack[0].url) as c:
        yield c


def generate(client: Client, **options: Any) -> Job:
    body = {"prompt": "a red circle", "num_inference_steps": STEPS, "seed": 3, **options}
    return client.generate(NAME, **body)


def test_the_model_is_listed_as_a_text_model(client: Client) -> None:
    model = client.model(NAME)
    assert model.tasks == ["generate", "inpaint"] and model.defaults is not None
    assert model.defaults.guidance_scale == 7.5  # the pipeline's own default
    assert (model.image.height, model.image.width) == (16, 16)


def test_generate_with_a_negative_prompt_equals_the_pipeline(
    client: Client, stack: tuple[LocalServer, Any]
) -> None:
    pipe = stack[1]
    job = generate(client, n=2, negative_prompt="photo of a cat")
    assert job.input["prompt_tokens"] is None and job.input["negative_prompt"] == "photo of a cat"
    assert job.input["guidance_scale"] == 7.5
    ours = job_images(client, job)
    # The same x_T as the worker's samples: image i draws x_T first from the stream of seed + i.
    start = torch.stack([torch.randn((4, 8, 8), generator=image_generator(3, i)) for i in (0, 1)])
    theirs = pipe(
        prompt=["a red circle"] * 2,
        negative_prompt=["photo of a cat"] * 2,
        guidance_scale=7.5,
        num_inference_steps=STEPS,
        latents=start,
        output_type="np",
    ).images  # [2, 16, 16, 3] in [0, 1]
    expected = (theirs * 255).round().astype(int)  # diffusers' numpy_to_pil: (x · 255).round()
    for got, want in zip(ours, expected, strict=True):
        assert got.shape == (16, 16, 3) and same_pixels(got, want)


def test_the_empty_negative_prompt_is_the_null_condition(client: Client) -> None:
    plain, empty = generate(client), generate(client, negative_prompt="")
    assert np.array_equal(job_images(client, plain)[0], job_images(client, empty)[0])
    steered = job_images(client, generate(client, negative_prompt="green"))[0]
    assert not same_pixels(job_images(client, plain)[0], steered)


def test_mixed_prompts_and_guidance_in_one_batch_equal_each_alone(client: Client) -> None:
    bodies: list[dict[str, Any]] = [
        {"negative_prompt": "green", "seed": 1},
        {"prompt": "a blue dog", "guidance_scale": 3.0, "seed": 2},
        {"prompt": "yellow square", "guidance_scale": 1.0, "seed": 3},
        {"prompt": "a blue dog", "negative_prompt": "red", "sampler": "ddpm", "seed": 4},
    ]
    base = {"prompt": "a red circle", "num_inference_steps": STEPS, "seed": 3}
    blocker = {"prompt": "a cat", "num_inference_steps": 60}
    assert_batched_equal_alone(client, NAME, bodies, base, blocker)


def test_a_class_label_or_a_prompt_for_the_wrong_model_is_a_clear_422(client: Client) -> None:
    with pytest.raises(ApiError) as caught:
        client.generate(NAME, class_label=1)
    assert caught.value.status_code == 422 and caught.value.code == "not_class_conditional"
    with pytest.raises(ApiError) as caught:
        client.generate(NAME, prompt="a cat", negative_prompt="a dog", guidance_scale=1.0)
    assert caught.value.code == "negative_prompt_needs_guidance"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"text_encoder": ["transformers", "T5EncoderModel"]}, "supported: CLIPTextModel"),
        ({"tokenizer": None}, "has no 'tokenizer' component"),
    ],
    ids=["t5-encoder", "no-tokenizer"],
)
def test_a_text_pipeline_ddserve_cannot_encode_for_is_refused_by_name(
    stack: tuple[LocalServer, Any], tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    source = Path(stack[0].settings.model_dirs) / NAME
    folder = tmp_path / "edited"
    shutil.copytree(source, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(change)
    (folder / "model_index.json").write_text(json.dumps(index))
    settings = Settings(zoo_dir=tmp_path / "none", model_dirs=str(tmp_path / "models"))
    with pytest.raises(ImportFailed, match=message):
        import_pipeline(str(folder), name="edited", settings=settings)


def test_inpaint_with_a_prompt_and_a_negative_prompt(client: Client) -> None:
    """RePaint on the latents (the worker encodes the image with the pipeline's VAE), guided by
    the prompt against the negative prompt; the same seed gives the same images."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.ones((16, 16), bool)
    mask[:, 8:] = False  # generate the right half
    body = {"prompt": "a red circle", "negative_prompt": "green", "seed": 5, "n": 2}
    first = client.inpaint(NAME, image, mask, num_inference_steps=STEPS, **body)
    assert first.input["negative_prompt"] == "green" and first.input["guidance_scale"] == 7.5
    again = client.inpaint(NAME, image, mask, num_inference_steps=STEPS, **body)
    pictures, repeated = job_images(client, first), job_images(client, again)
    assert pictures[0].shape == (16, 16, 3) and not np.array_equal(pictures[0], pictures[1])
    assert all(same_pixels(a, b) for a, b in zip(pictures, repeated, strict=True))
    unsteered = client.inpaint(
        NAME, image, mask, num_inference_steps=STEPS, **{**body, "negative_prompt": ""}
    )
    assert not same_pixels(job_images(client, unsteered)[0], pictures[0])


def test_the_openai_route_takes_the_prompt_and_a_negative_prompt(
    stack: tuple[LocalServer, Any], client: Client
) -> None:
    body = {
        "model": NAME,
        "prompt": "a red circle",
        "size": "16x16",
        "response_format": "b64_json",
        "negative_prompt": "green",  # what the SDK's extra_body sends
        "seed": 6,
        "num_inference_steps": STEPS,
    }
    answer = httpx.post(f"{stack[0].url}/v1/images/generations", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    item = answer.json()["data"][0]
    assert item["revised_prompt"] == "a red circle"
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))
    own = job_images(client, generate(client, negative_prompt="green", seed=6))[0]
    assert same_pixels(picture, own)


def test_img2img_takes_a_negative_prompt(client: Client) -> None:
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    body = {"prompt": "a blue dog", "num_inference_steps": 6, "strength": 0.6, "seed": 2}
    plain = job_images(client, client.img2img(NAME, image, **body))[0]
    empty = client.img2img(NAME, image, negative_prompt="", **body)
    assert empty.input["negative_prompt"] == "" and np.array_equal(
        job_images(client, empty)[0], plain
    )
    steered = job_images(client, client.img2img(NAME, image, negative_prompt="red", **body))[0]
    assert not same_pixels(steered, plain)
