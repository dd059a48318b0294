"""Image-to-image through the whole stack (`LocalServer`: gateway + batching worker on the tiny
zoo, auth on): the official `openai` SDK's `images.edit` without a mask, and ddserve's own client
`img2img` on `POST /img2img`, which must give the same pixels for the same request."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import openai
import pytest
from PIL import Image

from ddserve.client import ValidationError
from ddserve.client.sync import Client
from ddserve.embedded import LocalServer
from tests.client_support import CODEC, DIFFUSION, tiny_stack

KEY = "img2img-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with tiny_stack(tmp_path_factory.mktemp("img2img"), api_key=KEY) as stack:
        yield stack


@pytest.fixture
def sdk(server: LocalServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as client:
        yield client


def digit() -> np.ndarray:
    image = np.zeros((8, 8), dtype=np.uint8)
    image[1:7, 3:5] = 255
    return image


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    picture = Image.fromarray(array)
    (picture.convert(mode) if mode else picture).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def edit(sdk: openai.OpenAI, image: bytes, **extra: object) -> list[np.ndarray]:
    answer = sdk.images.edit(
        model=DIFFUSION,
        image=("digit.png", image, "image/png"),
        prompt="1",
        n=2,
        response_format="b64_json",
        extra_body={"seed": 5, "num_inference_steps": 10, **extra},
    )
    return [pixels(base64.b64decode(item.b64_json or "")) for item in answer.data]


def test_an_edit_without_mask_is_img2img_and_equals_the_ddserve_route(
    server: LocalServer, sdk: openai.OpenAI
) -> None:
    """An opaque image without a mask is image-to-image with the default strength (0.8, 8 of 10
    steps); with `strength` in extra_body it is that strength; `/img2img` through ddserve's client
    with the same parameters gives the same pixels."""
    image = png(digit(), "RGBA")  # an alpha channel, fully opaque: still image-to-image
    default = edit(sdk, image)
    assert len(default) == 2 and not np.array_equal(default[0], default[1])
    gentle = edit(sdk, image, strength=0.1)
    with Client(server.url, api_key=KEY) as client:
        job = client.img2img(
            DIFFUSION, digit(), strength=0.1, class_label=1, n=2, seed=5, num_inference_steps=10
        )
        assert job.kind == "img2img" and job.input["strength"] == 0.1
        assert [image.seed for image in job.images] == [5, 6]
        ours = [pixels(data) for data in client.download_images(job)]
        default_job = client.img2img(
            DIFFUSION, digit(), class_label=1, n=1, seed=5, num_inference_steps=10
        )
        assert default_job.input["strength"] == 0.8
        assert np.array_equal(pixels(client.download_images(default_job)[0]), default[0])
    assert all(np.array_equal(a, b) for a, b in zip(gentle, ours, strict=True))
    # One step from t = 0 keeps the picture (tiny network, clipped x̂_0); 8 steps do not.
    near = np.abs(gentle[0].astype(float) - digit()).mean()
    far = np.abs(default[0].astype(float) - digit()).mean()
    assert near < 8 and far > 3 * near, (near, far)


def test_bad_img2img_edits_are_clear_4xx(sdk: openai.OpenAI) -> None:
    image = png(digit())
    with pytest.raises(openai.BadRequestError) as zero:
        edit(sdk, image, strength=0)
    assert zero.value.code == "invalid_value" and zero.value.param == "strength"
    with pytest.raises(openai.BadRequestError) as above:
        edit(sdk, image, strength=1.5)
    assert above.value.code == "invalid_value"
    with pytest.raises(openai.UnprocessableEntityError) as weak:
        edit(sdk, image, strength=0.05)  # ⌊10 · 0.05⌋ = 0 steps
    assert weak.value.code == "strength_too_low"
    alpha = np.full((8, 8), 255, np.uint8)
    alpha[:, 4:] = 0
    mask = png(np.dstack([np.zeros((8, 8, 3), np.uint8), alpha]))
    with pytest.raises(openai.BadRequestError) as masked:
        sdk.images.edit(
            model=DIFFUSION,
            image=("d.png", image, "image/png"),
            mask=("m.png", mask, "image/png"),
            prompt="",
            extra_body={"strength": 0.5},
        )
    assert masked.value.code == "invalid_value" and masked.value.param == "strength"
    with pytest.raises(openai.BadRequestError) as codec:  # an autoencoder does not generate
        sdk.images.edit(model=CODEC, image=("d.png", image, "image/png"), prompt="")
    assert codec.value.code == "unsupported_task"
    with pytest.raises(openai.UnprocessableEntityError) as size:
        sdk.images.edit(
            model=DIFFUSION,
            image=("d.png", png(np.zeros((6, 6), np.uint8)), "image/png"),
            prompt="",
        )
    assert size.value.code == "wrong_image_size"


def test_the_client_reports_a_bad_strength_by_name(server: LocalServer) -> None:
    with Client(server.url, api_key=KEY) as client, pytest.raises(ValidationError) as error:
        client.img2img(DIFFUSION, digit(), strength=0.0)
    assert error.value.status_code == 422 and error.value.param == "strength"
