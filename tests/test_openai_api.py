"""The OpenAI Images API under /v1, driven by the official `openai` SDK against the live stack
(`LocalServer`: gateway + batching worker thread + uvicorn on loopback, tiny zoo, auth on)."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from ddserve.embedded import LocalServer
from tests.client_support import CODEC, DIFFUSION, tiny_stack

KEY = "openai-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with tiny_stack(tmp_path_factory.mktemp("openai"), api_key=KEY) as stack:
        yield stack


@pytest.fixture
def client(server: LocalServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as sdk:
        yield sdk


def png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_generate_b64_with_ddserve_extras_is_reproducible(client: openai.OpenAI) -> None:
    extras = {"seed": 11, "num_inference_steps": 4, "guidance_scale": 2.0}
    first = client.images.generate(
        model=DIFFUSION, prompt="3", n=2, size="8x8", response_format="b64_json", extra_body=extras
    )
    assert first.created > 0 and len(first.data) == 2
    images = [pixels(item.b64_json or "") for item in first.data]
    assert all(image.shape == (8, 8) for image in images)
    assert not np.array_equal(images[0], images[1])  # image i has its own noise stream
    again = client.images.generate(
        model=DIFFUSION, prompt="3", n=1, response_format="b64_json", extra_body=extras
    )
    assert np.array_equal(pixels(again.data[0].b64_json or ""), images[0])


def test_generate_url_answers_links_that_serve_the_png(client: openai.OpenAI) -> None:
    answer = client.images.generate(model=DIFFUSION, prompt="", extra_body={"seed": 1})
    (item,) = answer.data
    assert item.url and item.b64_json is None
    fetched = httpx.get(item.url)
    assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")


def test_the_default_model_is_a_served_diffusion_model(server: LocalServer) -> None:
    answer = httpx.post(
        f"{server.url}/v1/images/generations",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"prompt": "1", "response_format": "b64_json"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["data"]) == 1


def test_models_list_and_get(client: openai.OpenAI) -> None:
    listed = {model.id for model in client.models.list()}
    assert {DIFFUSION, CODEC} <= listed
    model = client.models.retrieve(DIFFUSION)
    assert model.id == DIFFUSION and model.owned_by == "ddserve"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_errors_map_to_the_sdk_exceptions(server: LocalServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(model="no-such-model", prompt="1")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as size:
        client.images.generate(model=DIFFUSION, prompt="1", size="1024x1024")
    assert size.value.code == "unsupported_size" and "8x8" in size.value.message
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model=DIFFUSION, prompt="not a class")
    with pytest.raises(openai.BadRequestError):  # a codec cannot generate
        client.images.generate(model=CODEC, prompt="")
    with pytest.raises(openai.UnprocessableEntityError):  # over the image cap
        client.images.generate(model=DIFFUSION, prompt="1", n=99)
    with pytest.raises(openai.UnprocessableEntityError):  # an extra that ddserve does not have
        client.images.generate(model=DIFFUSION, prompt="1", extra_body={"strength": 0.5})
    with (
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as intruder,
        pytest.raises(openai.AuthenticationError),
    ):
        intruder.images.generate(model=DIFFUSION, prompt="1")


def digit_and_mask() -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L")
    alpha = np.full((8, 8), 255, np.uint8)
    alpha[:, 4:] = 0  # transparent right half: generate there
    mask = Image.fromarray(np.dstack([np.zeros((8, 8, 3), np.uint8), alpha]), mode="RGBA")
    return image, mask


def test_edit_with_a_mask_keeps_the_opaque_region(client: openai.OpenAI) -> None:
    image, mask = digit_and_mask()
    answer = client.images.edit(
        model=DIFFUSION,
        image=("digit.png", png(image), "image/png"),
        mask=("mask.png", png(mask), "image/png"),
        prompt="5",
        n=2,
        response_format="b64_json",
        extra_body={"seed": 3, "num_inference_steps": 4},
    )
    assert len(answer.data) == 2
    kept = np.asarray(image)[:, :4]
    for item in answer.data:
        out = pixels(item.b64_json or "")
        assert np.abs(out[:, :4].astype(int) - kept.astype(int)).max() <= 1  # RePaint keeps it


def test_edit_without_mask_uses_the_image_transparency(client: openai.OpenAI) -> None:
    image, mask = digit_and_mask()
    rgba = image.convert("RGBA")
    rgba.putalpha(mask.getchannel("A"))
    answer = client.images.edit(
        model=DIFFUSION,
        image=("digit.png", png(rgba), "image/png"),
        prompt="",
        response_format="b64_json",
        extra_body={"seed": 3, "num_inference_steps": 4},
    )
    assert len(answer.data) == 1


def test_bad_edits_are_clear_4xx(server: LocalServer, client: openai.OpenAI) -> None:
    image, mask = digit_and_mask()
    with pytest.raises(openai.BadRequestError) as no_alpha:
        client.images.edit(
            model=DIFFUSION,
            image=("d.png", png(image), "image/png"),
            mask=("m.png", png(image), "image/png"),
            prompt="",
        )
    assert no_alpha.value.code == "mask_without_alpha"
    with pytest.raises(openai.BadRequestError) as other_size:
        client.images.edit(
            model=DIFFUSION,
            image=("d.png", png(image), "image/png"),
            mask=("m.png", png(mask.resize((16, 16))), "image/png"),
            prompt="",
        )
    assert other_size.value.code == "mask_size_mismatch"
    with pytest.raises(openai.BadRequestError) as not_png:
        client.images.edit(
            model=DIFFUSION, image=("d.png", b"not an image", "image/png"), prompt=""
        )
    assert not_png.value.code == "invalid_image"
    broken = httpx.post(
        f"{server.url}/v1/images/edits",
        headers={
            "Authorization": f"Bearer {KEY}",
            "Content-Type": "multipart/form-data; boundary=xyz",
        },
        content=b'--xyz\r\nContent-Disposition: form-data; name="image"\r\n\r\nunterminated',
    )
    assert broken.status_code == 400, broken.text
    assert broken.json()["error"]["code"] in {"invalid_multipart", "invalid_value"}


def test_a_job_not_finished_in_time_is_a_503_naming_the_job(tmp_path: Path) -> None:
    """The SDK does not poll: past DDSERVE_OPENAI_WAIT_S the answer is 503 + Retry-After, and the
    job it names goes on to finish."""
    headers = {"Authorization": f"Bearer {KEY}"}
    with tiny_stack(tmp_path, api_key=KEY, openai_wait_s=0.001) as stack:
        answer = httpx.post(
            f"{stack.url}/v1/images/generations",
            headers=headers,
            json={"model": DIFFUSION, "prompt": "1", "num_inference_steps": 50, "n": 4},
            timeout=60,
        )
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"]
        job_id = answer.headers["Location"].split("/")[-1]
        assert job_id in answer.json()["error"]["message"]
        deadline = time.monotonic() + 60
        status = "queued"
        while status not in {"succeeded", "failed", "canceled"} and time.monotonic() < deadline:
            time.sleep(0.1)
            status = httpx.get(f"{stack.url}/jobs/{job_id}", headers=headers).json()["status"]
        assert status == "succeeded"
