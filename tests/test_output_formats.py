"""Output formats (#19 item 5, #20 item 1): png (lossless, the default), jpeg and webp at a quality,
on ddserve's routes (`output.format`, `output.quality`) and on the OpenAI Images API
(`output_format`, `output_compression`), against the live stack (gateway + batching worker)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
from PIL import Image

from ddserve.embedded import LocalServer
from ddserve.storage import content_type_for, image_key
from tests.client_support import DIFFUSION, tiny_stack
from workers.execute import encode_image

KEY = "formats-key"
MAGIC = {"png": b"\x89PNG", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with tiny_stack(tmp_path_factory.mktemp("formats"), api_key=KEY) as stack:
        yield stack


def generate(server: LocalServer, output: dict) -> httpx.Response:
    return httpx.post(
        f"{server.url}/generate",
        json={
            "model": DIFFUSION,
            "class_label": 1,
            "seed": 3,
            "num_inference_steps": 3,
            "output": output,
        },
        headers={"Authorization": f"Bearer {KEY}", "Prefer": "wait=30"},
        timeout=60,
    )


def test_encode_image_writes_each_format_and_quality_matters() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.rand((3, 32, 32), generator=g) * 2 - 1  # noise: quality shows in the size
    for image_format, magic in MAGIC.items():
        assert encode_image(image, image_format).startswith(magic)
    assert encode_image(image, "webp")[8:12] == b"WEBP"
    low, high = encode_image(image, "jpeg", 10), encode_image(image, "jpeg", 95)
    assert len(low) < len(high)
    assert Image.open(io.BytesIO(low)).format == "JPEG"
    assert content_type_for(image_key("j", 0, "jpeg")) == "image/jpeg"
    assert content_type_for(image_key("j", 0, "webp")) == "image/webp"


@pytest.mark.parametrize("image_format", ["jpeg", "webp"])
def test_generate_stores_and_serves_the_format_asked_for(
    server: LocalServer, image_format: str
) -> None:
    r = generate(server, {"format": image_format, "quality": 80, "return": "b64"})
    assert r.status_code == 200, r.text
    (image,) = r.json()["output"]["images"]
    assert base64.b64decode(image["b64"]).startswith(MAGIC[image_format])
    fetched = httpx.get(image["url"])
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == f"image/{image_format}"
    assert fetched.content.startswith(MAGIC[image_format])


@pytest.mark.parametrize(
    "output",
    [
        {"format": "png", "quality": 80},  # png is lossless: no quality
        {"format": "jpeg", "quality": 0},
        {"format": "jpeg", "quality": 101},
        {"format": "gif"},
    ],
)
def test_bad_output_options_are_422(server: LocalServer, output: dict) -> None:
    r = generate(server, output)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_value"


def test_openai_output_format_and_compression(server: LocalServer) -> None:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as client:
        for image_format in ("jpeg", "webp", "png"):
            answer = client.images.generate(
                model=DIFFUSION,
                prompt="2",
                response_format="b64_json",
                output_format=image_format,
                output_compression=60,  # png: not applied
                extra_body={"seed": 2, "num_inference_steps": 3},
            )
            data = base64.b64decode(answer.data[0].b64_json or "")
            assert data.startswith(MAGIC[image_format]), image_format
        with pytest.raises(openai.UnprocessableEntityError):  # as every out-of-range value
            client.images.generate(model=DIFFUSION, prompt="2", output_compression=101)
        with pytest.raises(openai.UnprocessableEntityError):
            client.images.generate(model=DIFFUSION, prompt="2", extra_body={"output_format": "gif"})


def test_openai_edit_output_format(server: LocalServer) -> None:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, format="PNG")  # opaque: image-to-image
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as client:
        answer = client.images.edit(
            model=DIFFUSION,
            image=("d.png", buffer.getvalue(), "image/png"),
            prompt="2",
            response_format="b64_json",
            output_format="webp",
            output_compression=50,
            extra_body={"seed": 1, "num_inference_steps": 4},
        )
        assert base64.b64decode(answer.data[0].b64_json or "").startswith(MAGIC["webp"])
        with pytest.raises(openai.BadRequestError) as bad:
            client.images.edit(
                model=DIFFUSION,
                image=("d.png", buffer.getvalue(), "image/png"),
                prompt="2",
                extra_body={"output_format": "tiff"},
            )
        assert bad.value.code == "invalid_value"
