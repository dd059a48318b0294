"""`negative_prompt` over HTTP on the zoo's text model `shapes-ldm` (the whole stack in this process:
`LocalServer`, gateway + batching worker on fakeredis), and the gateway's refusals."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from ddserve.client.sync import Client
from ddserve.embedded import LocalServer
from ddserve.settings import Settings
from models.catalog import DEFAULT_ZOO
from service.app import create_app
from tests.client_support import assert_batched_equal_alone, job_images, same_pixels

MODEL = "shapes-ldm"
STEPS = 6  # few DDIM steps: the images differ by prompt all the same


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("negative")
    settings = Settings(
        redis_url=None,
        key_prefix="negative-test",
        zoo_dir=DEFAULT_ZOO,
        models=MODEL,
        storage_dir=root / "images",
        auth_enabled=False,
        device="cpu",
        onnx_providers="CPUExecutionProvider",
        log_level="WARNING",
    )
    with LocalServer(settings) as stack:
        yield stack


@pytest.fixture
def client(server: LocalServer) -> Iterator[Client]:
    with Client(server.url) as c:
        yield c


def generate(client: Client, **options: Any) -> list[np.ndarray]:
    body = {"prompt": "red circle", "num_inference_steps": STEPS, "seed": 7, **options}
    return job_images(client, client.generate(MODEL, **body))


def test_a_negative_prompt_steers_and_the_empty_one_is_the_null_condition(client: Client) -> None:
    plain = generate(client, n=2)
    empty = generate(client, n=2, negative_prompt="")
    steered = generate(client, n=2, negative_prompt="red")
    assert all(np.array_equal(a, b) for a, b in zip(plain, empty, strict=True))
    assert all(not same_pixels(a, b) for a, b in zip(plain, steered, strict=True))
    # Image i of a job is regenerated alone with its seed, negative prompt and all.
    second = generate(client, n=1, seed=8, negative_prompt="red")
    assert same_pixels(second[0], steered[1])


def test_the_job_input_shows_the_negative_prompt_and_its_tokens(client: Client) -> None:
    job = client.generate(
        MODEL, prompt="blue square", negative_prompt="Blue", num_inference_steps=2, seed=1
    )
    assert job.succeeded
    assert job.input["negative_prompt"] == "Blue"
    assert job.input["negative_prompt_tokens"] == [3, 0, 0, 0]  # "blue", padded to 4
    assert job.input["guidance_scale"] == 4.0  # the card's default: guidance is on


def test_mixed_negative_prompts_and_guidance_in_one_batch_equal_each_alone(
    client: Client,
) -> None:
    bodies: list[dict[str, Any]] = [
        {"negative_prompt": "red", "seed": 3},
        {"negative_prompt": "green circle", "seed": 3, "guidance_scale": 7.5},
        {"seed": 3},
        {"prompt": "yellow cross", "seed": 4, "guidance_scale": 1.0},
        {"negative_prompt": "cyan", "seed": 5, "sampler": "dpmpp_2m", "num_inference_steps": 5},
    ]
    base = {"prompt": "red circle", "num_inference_steps": STEPS}
    blocker = {"prompt": "blue cross", "num_inference_steps": 200}
    assert_batched_equal_alone(client, MODEL, bodies, base, blocker)


def test_the_openai_route_takes_negative_prompt_as_an_extra(
    server: LocalServer, client: Client
) -> None:
    extras = {"negative_prompt": "red", "seed": 9, "num_inference_steps": STEPS}
    answer = httpx.post(
        f"{server.url}/v1/images/generations",
        json={"model": MODEL, "prompt": "red circle", "response_format": "b64_json", **extras},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    data = base64.b64decode(answer.json()["data"][0]["b64_json"])
    assert same_pixels(np.asarray(Image.open(io.BytesIO(data))), generate(client, **extras)[0])
    refused = httpx.post(
        f"{server.url}/v1/images/generations",
        json={"model": MODEL, "prompt": "red circle", "guidance_scale": 1.0, **extras},
        timeout=60,
    )
    assert refused.json()["error"]["code"] == "negative_prompt_needs_guidance", refused.text


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        zoo_dir=DEFAULT_ZOO, storage_dir=tmp_path, auth_enabled=False, signing_secret="x"
    )
    with TestClient(create_app(settings, fakeredis.FakeRedis())) as client:
        yield client


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (
            {"model": "digits-ddpm", "class_label": 1, "negative_prompt": "x"},
            "not_text_conditional",
        ),
        ({"model": MODEL, "negative_prompt": "red"}, "negative_prompt_needs_prompt"),
        (
            {"model": MODEL, "prompt": "red circle", "negative_prompt": "red", "guidance_scale": 1},
            "negative_prompt_needs_guidance",
        ),
        ({"model": MODEL, "prompt": "red circle", "negative_prompt": "purple"}, "invalid_prompt"),
        (
            {"model": MODEL, "prompt": "red", "negative_prompt": "red green blue cyan circle"},
            "invalid_prompt",
        ),
    ],
    ids=["class-model", "no-prompt", "no-guidance", "unknown-word", "too-long"],
)
def test_a_negative_prompt_that_cannot_apply_is_a_clear_422(
    gateway: TestClient, body: dict[str, Any], code: str
) -> None:
    answer = gateway.post("/generate", json=body)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == code and error["param"] == "negative_prompt", error
    assert "negative_prompt" in error["message"] or code == "not_text_conditional"
