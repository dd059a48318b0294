"""An `LDMTextToImagePipeline` (LDMBert text encoder) imported and served over HTTP: `ddserve
import` of a tiny pipeline saved locally (`tests/tiny_ldm_text.py`), then the whole stack in this
process (`LocalServer`: gateway + batching worker on fakeredis). Prompts reach the worker as text
and are encoded by the pipeline's own BERT tokenizer and LDMBert; images equal the pipeline's own;
mixed prompts and guidance scales in one batch equal each alone; what the pipeline does not take
(a class label, a negative prompt) is a 422."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from ddserve.client.errors import ApiError
from ddserve.client.sync import Client
from ddserve.client.types import Job
from ddserve.embedded import LocalServer
from ddserve.settings import Settings
from models.diffusers_format.importer import import_pipeline
from tests.client_support import assert_batched_equal_alone, job_images, same_pixels
from tests.tiny_ldm_text import IMAGE, LATENT, tiny_ldm_text_pipeline
from workers.execute import image_generator

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

NAME = "tiny-ldm-text"
STEPS = 5


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalServer, Any]]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ldm-text-http")
    pipe = tiny_ldm_text_pipeline(root / "source")
    settings = Settings(
        redis_url=None,
        key_prefix="ldm-text-http",
        zoo_dir=root / "no-zoo",
        model_dirs=str(root / "models"),
        storage_dir=root / "images",
        auth_enabled=False,
        device="cpu",
        log_level="WARNING",
        text_cache_size=4,
    )
    import_pipeline(str(root / "source" / "pipeline"), name=NAME, settings=settings)
    server = LocalServer(settings).start()
    try:
        yield server, pipe
    finally:
        server.stop()


@pytest.fixture
def client(stack: tuple[LocalServer, Any]) -> Iterator[Client]:
    with Client(stack[0].url) as c:
        yield c


def generate(client: Client, **options: Any) -> Job:
    body = {"prompt": "a red circle", "num_inference_steps": STEPS, "seed": 3, **options}
    return client.generate(NAME, **body)


def test_the_model_is_listed_as_a_text_model_with_the_pipelines_defaults(
    client: Client,
) -> None:
    model = client.model(NAME)
    assert model.tasks == ["generate", "inpaint"] and model.defaults is not None
    assert model.defaults.guidance_scale == 1.0  # LDMTextToImagePipeline's own default
    assert (model.image.height, model.image.width) == (IMAGE, IMAGE)
    assert model.conditioning is not None and model.conditioning.type == "text"
    extra = model.conditioning.model_extra or {}  # what a client reads to leave it out
    assert (extra["tokenizer"], extra["negative_prompt"]) == ("bert", False)
    assert f"{NAME}-vae" in {m.name for m in client.models()}


@pytest.mark.parametrize("guidance", [None, 6.0])
def test_generate_equals_the_pipeline(
    client: Client, stack: tuple[LocalServer, Any], guidance: float | None
) -> None:
    pipe = stack[1]
    options = {} if guidance is None else {"guidance_scale": guidance}
    job = generate(client, n=2, **options)
    assert job.input["prompt_tokens"] is None and job.input["prompt"] == "a red circle"
    scale = job.input["guidance_scale"]
    assert scale == (guidance or 1.0)
    ours = job_images(client, job)
    # The same x_T as the worker's samples: image i draws x_T first from the stream of seed + i.
    start = torch.stack(
        [torch.randn((4, LATENT, LATENT), generator=image_generator(3, i)) for i in (0, 1)]
    )
    theirs = pipe(
        ["a red circle"] * 2,
        guidance_scale=scale,
        num_inference_steps=STEPS,
        latents=start,
        output_type="np",
    ).images  # [2, 64, 64, 3] in [0, 1]
    expected = (theirs * 255).round().astype(int)  # diffusers' numpy_to_pil: (x · 255).round()
    for got, want in zip(ours, expected, strict=True):
        assert got.shape == (IMAGE, IMAGE, 3) and same_pixels(got, want)


def test_mixed_prompts_and_guidance_in_one_batch_equal_each_alone(client: Client) -> None:
    bodies: list[dict[str, Any]] = [
        {"seed": 1},
        {"prompt": "a blue dog", "guidance_scale": 3.0, "seed": 2},
        {"prompt": "yellow square", "guidance_scale": 6.0, "seed": 3},
        {"prompt": "a blue dog", "sampler": "ddpm", "seed": 4},
    ]
    base = {"prompt": "a red circle", "num_inference_steps": STEPS, "seed": 3}
    blocker = {"prompt": "a cat", "num_inference_steps": 60}
    alone = assert_batched_equal_alone(client, NAME, bodies, base, blocker)
    assert not same_pixels(alone[0], alone[1])  # the prompts matter


def test_a_class_label_or_a_negative_prompt_is_a_clear_422(
    client: Client, stack: tuple[LocalServer, Any]
) -> None:
    with pytest.raises(ApiError) as caught:
        client.generate(NAME, class_label=1)
    assert caught.value.status_code == 422 and caught.value.code == "not_class_conditional"
    with pytest.raises(ApiError) as caught:
        client.generate(NAME, prompt="a cat", negative_prompt="a dog", guidance_scale=6.0)
    assert caught.value.status_code == 422 and caught.value.code == "negative_prompt_unsupported"
    assert "LDMTextToImagePipeline" in str(caught.value)
    body = {"model": NAME, "prompt": "a cat", "size": f"{IMAGE}x{IMAGE}", "negative_prompt": "x"}
    answer = httpx.post(f"{stack[0].url}/v1/images/generations", json=body, timeout=60)
    assert answer.status_code == 422, answer.text
    assert "negative_prompt_unsupported" in answer.text


def test_img2img_and_inpaint_take_a_prompt(client: Client) -> None:
    """The routes ddserve adds to every latent model (the pipeline has neither): the image goes
    through the `vqvae` component's encoder, the prompt through LDMBert; a seed repeats."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)
    body = {"prompt": "a blue dog", "num_inference_steps": 6, "guidance_scale": 6.0, "seed": 2}
    first = job_images(client, client.img2img(NAME, image, strength=0.6, **body))[0]
    again = job_images(client, client.img2img(NAME, image, strength=0.6, **body))[0]
    other = job_images(
        client, client.img2img(NAME, image, strength=0.6, **{**body, "prompt": "a cat"})
    )
    assert (
        first.shape == (IMAGE, IMAGE, 3)
        and same_pixels(first, again)
        and not same_pixels(first, other[0])
    )
    mask = np.ones((IMAGE, IMAGE), bool)
    mask[:, IMAGE // 2 :] = False  # generate the right half
    job = client.inpaint(NAME, image, mask, **body)
    assert job.input["prompt"] == "a blue dog"
    assert job_images(client, job)[0].shape == (IMAGE, IMAGE, 3)
