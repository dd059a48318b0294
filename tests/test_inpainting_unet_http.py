"""An inpainting UNet (`StableDiffusionInpaintPipeline`, runwayml/stable-diffusion-inpainting's
9-channel layout) imported and served over HTTP: `ddserve import` of a tiny pipeline saved locally
(`tests/tiny_sd.py`), the whole stack in this process (`LocalServer`).

`/inpaint` runs the pipeline's own method (the UNet reads the mask and the masked image's latents
at every step; `models.diffusion.inpainting_unet`), not RePaint, and gives the pipeline's images at
the input image's size; ddserve's mask (white = keep) is the pipeline's inverted. Jobs of different
masks, prompts and strengths share the running set's network calls; the OpenAI edits route maps to it; the
tasks it does not serve are refused."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from ddserve.client.errors import ApiError
from ddserve.client.sync import Client
from ddserve.embedded import LocalServer
from tests.client_support import job_images, same_pixels, tiny_sd_stack
from workers.execute import image_generator

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

NAME = "tiny-sd-inpainting"
STEPS = 6


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalServer, Any]]:
    root = tmp_path_factory.mktemp("sd-inpainting-http")
    with tiny_sd_stack(
        root,
        NAME,
        "sd-inpainting-http",
        pipeline_class="StableDiffusionInpaintPipeline",
        unet_channels=9,
    ) as served:
        yield served


@pytest.fixture
def client(stack: tuple[LocalServer, Any]) -> Iterator[Client]:
    with Client(stack[0].url) as c:
        yield c


def picture(size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def keep_mask(size: int = 16, box: tuple[int, int, int, int] = (3, 11, 5, 14)) -> np.ndarray:
    """ddserve's mask: True (white) = keep; the box (rows, columns) is generated."""
    mask = np.ones((size, size), bool)
    top, bottom, left, right = box
    mask[top:bottom, left:right] = False
    return mask


def pipeline_images(
    pipe: Any, image: np.ndarray, keep: np.ndarray, seed: int, n: int, **call: Any
) -> np.ndarray:
    """The pipeline's images (uint8 [n, H, W, 3]) for the same image, mask and per-image
    generators: its mask is 1 where ddserve's is black."""
    size = image.shape[0]
    pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0  # [1, 3, H, W]
    repaint = torch.from_numpy(~keep).float()[None, None]  # [1, 1, H, W]
    out = pipe(
        image=pixels.repeat(n, 1, 1, 1),
        mask_image=repaint.repeat(n, 1, 1, 1),
        height=size,
        width=size,
        generator=[image_generator(seed, i) for i in range(n)],
        output_type="np",
        **call,
    ).images
    return (out * 255).round().astype(int)


def test_the_model_only_inpaints(client: Client) -> None:
    model = client.model(NAME)
    assert model.tasks == ["inpaint"] and model.defaults is not None
    assert model.defaults.guidance_scale == 7.5
    for call in (
        lambda: client.generate(NAME, prompt="a cat"),
        lambda: client.img2img(NAME, picture(), prompt="a cat"),
    ):
        with pytest.raises(ApiError) as caught:
            call()
        assert caught.value.status_code == 400 and caught.value.code == "unsupported_task"


@pytest.mark.parametrize("size", [16, 24])
def test_inpaint_equals_the_inpaint_pipeline(
    client: Client, stack: tuple[LocalServer, Any], size: int
) -> None:
    pipe = stack[1]
    image, keep = picture(size), keep_mask(size)
    body = {"prompt": "a red circle", "negative_prompt": "green", "seed": 7, "n": 2}
    job = client.inpaint(NAME, image, keep, num_inference_steps=STEPS, **body)
    assert job.input["guidance_scale"] == 7.5
    ours = job_images(client, job)
    theirs = pipeline_images(
        pipe,
        image,
        keep,
        7,
        2,
        prompt=["a red circle"] * 2,
        negative_prompt=["green"] * 2,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
    )
    assert ours[0].shape == (size, size, 3) and not np.array_equal(ours[0], ours[1])
    for got, want in zip(ours, theirs, strict=True):
        assert same_pixels(got, want)


def test_jobs_of_different_masks_and_prompts_share_calls_and_give_their_solo_images(
    client: Client,
) -> None:
    image = picture(seed=2)
    bodies: list[dict[str, Any]] = [
        {"prompt": "a blue dog", "seed": 1, "mask": keep_mask(box=(0, 16, 8, 16))},
        {"prompt": "yellow square", "negative_prompt": "red", "seed": 2, "mask": keep_mask()},
        {"prompt": "a cat", "guidance_scale": 1.0, "sampler": "euler", "seed": 3,
         "mask": keep_mask(box=(2, 6, 2, 6))},
        {"prompt": "a red circle", "strength": 0.6, "seed": 4, "mask": keep_mask()},
    ]  # fmt: skip

    def send(body: dict[str, Any], wait: bool) -> Any:
        rest = {"num_inference_steps": STEPS, **{k: v for k, v in body.items() if k != "mask"}}
        return client.inpaint(NAME, image, body["mask"], wait=wait, **rest)

    alone = [job_images(client, send(body, True))[0] for body in bodies]
    blocker = send(
        {"prompt": "photo", "seed": 9, "mask": keep_mask(), "num_inference_steps": 60}, False
    )
    jobs = [send(body, False) for body in bodies]
    for body, solo, job in zip(bodies, alone, jobs, strict=True):
        done = client.wait(job)
        assert (done.metrics.batch_size or 0) >= 3, done.metrics  # it shared its network calls
        assert same_pixels(job_images(client, done)[0], solo), body["prompt"]
    assert client.wait(blocker).succeeded


@pytest.mark.parametrize("field", ["jump_n_sample", "jump_length"])
def test_repaint_resampling_is_refused(client: Client, field: str) -> None:
    with pytest.raises(ApiError) as caught:
        client.inpaint(NAME, picture(), keep_mask(), prompt="a cat", **{field: 2})
    assert caught.value.status_code == 422
    assert caught.value.code == "resampling_unsupported" and caught.value.param == field


def test_the_openai_edit_route_inpaints_the_transparent_region(
    client: Client, stack: tuple[LocalServer, Any]
) -> None:
    image, keep = picture(seed=4), keep_mask()
    alpha = Image.fromarray(np.where(keep, 255, 0).astype(np.uint8))
    mask = Image.new("RGBA", (16, 16))
    mask.putalpha(alpha)  # OpenAI's mask: fully transparent = generate

    def png(picture: Image.Image) -> bytes:
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return buffer.getvalue()

    answer = httpx.post(
        f"{stack[0].url}/v1/images/edits",
        files={
            "image": ("image.png", png(Image.fromarray(image)), "image/png"),
            "mask": ("mask.png", png(mask), "image/png"),
        },
        data={
            "model": NAME,
            "prompt": "a red circle",
            "response_format": "b64_json",
            "seed": "5",
            "num_inference_steps": str(STEPS),
        },
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    edited = np.asarray(
        Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
    )
    own = client.inpaint(
        NAME, image, keep, prompt="a red circle", seed=5, num_inference_steps=STEPS
    )
    assert same_pixels(edited, job_images(client, own)[0])
    # Without a mask (an opaque image) an edit is image-to-image, which this model does not do.
    unmasked = httpx.post(
        f"{stack[0].url}/v1/images/edits",
        files={"image": ("image.png", png(Image.fromarray(image)), "image/png")},
        data={"model": NAME, "prompt": "a red circle"},
        timeout=60,
    )
    assert unmasked.status_code == 400 and unmasked.json()["error"]["code"] == "unsupported_task"


def test_inpaint_strength_equals_the_pipelines(
    client: Client, stack: tuple[LocalServer, Any]
) -> None:
    """`strength` 0.6: the image's posterior sample noised to the 6-step tail of 10 steps, as
    `StableDiffusionInpaintPipeline(strength=0.6)`; ⌊steps·strength⌋ = 0 is refused."""
    pipe = stack[1]
    image, keep = picture(seed=6), keep_mask()
    body = {"prompt": "a red circle", "seed": 11, "n": 2, "num_inference_steps": 10}
    job = client.inpaint(NAME, image, keep, strength=0.6, **body)
    assert job.input["strength"] == 0.6
    ours = job_images(client, job)
    theirs = pipeline_images(
        pipe,
        image,
        keep,
        11,
        2,
        prompt=["a red circle"] * 2,
        num_inference_steps=10,
        guidance_scale=7.5,
        strength=0.6,
    )
    for got, want in zip(ours, theirs, strict=True):
        assert same_pixels(got, want)
    whole = job_images(client, client.inpaint(NAME, image, keep, **body))
    assert not same_pixels(whole[0], ours[0])  # strength 1 (omitted) starts from pure noise
    with pytest.raises(ApiError) as caught:
        client.inpaint(NAME, image, keep, strength=0.05, **body)
    assert caught.value.status_code == 422
    assert caught.value.code == "strength_too_low" and caught.value.param == "strength"
