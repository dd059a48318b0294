"""`POST /img2img` at the gateway: the spec it queues (defaults applied, image canonical, strength
kept) and every 4xx a user can cause. fakeredis, no worker, no torch."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from rq.job import Job

from ddserve.params import DEFAULT_STRENGTH
from ddserve.spec import Img2ImgSpec, parse_job_spec
from tests.gateway_support import assert_error, make_app, png_b64, write_config_zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def client(zoo: Path, tmp_path: Path) -> Iterator[TestClient]:
    app, _ = make_app(zoo, tmp_path, max_image_bytes=4096, max_image_pixels=64 * 64)
    with TestClient(app) as c:
        yield c


def queued_request(client: TestClient, job_id: str) -> dict[str, Any]:
    conn = client.app.state.ddserve.connection
    return Job.fetch(job_id, connection=conn).kwargs["request"]


BODY = {"model": "tiny-ddpm", "image": png_b64(), "class_label": 1, "seed": 4}


def test_img2img_queues_a_resolved_spec(client: TestClient) -> None:
    r = client.post("/img2img", json=BODY)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "img2img" and job["model"] == "tiny-ddpm"
    request = queued_request(client, job["id"])
    spec = parse_job_spec(request)  # what the worker will parse
    assert isinstance(spec, Img2ImgSpec)
    assert spec.strength == DEFAULT_STRENGTH == 0.8
    assert spec.sampler == "ddim" and spec.num_inference_steps == 10  # the model's defaults
    assert spec.guidance_scale == 3.0 and spec.class_label == 1 and spec.seed == 4
    assert Image.open(io.BytesIO(base64.b64decode(spec.image))).mode == "L"
    assert job["input"]["strength"] == 0.8
    text = client.post(
        "/img2img",
        json={
            "model": "tiny-text",
            "image": png_b64(mode="L"),
            "prompt": "red",
            "negative_prompt": "blue",
            "strength": 0.3,
        },
    )
    assert text.status_code == 202, text.text
    request = queued_request(client, text.json()["id"])
    assert request["strength"] == 0.3 and request["prompt_tokens"]
    assert request["negative_prompt"] == "blue" and request["negative_prompt_tokens"]
    assert Image.open(io.BytesIO(base64.b64decode(request["image"]))).mode == "RGB"


@pytest.mark.parametrize(
    ("change", "status", "code", "param"),
    [
        ({"strength": 0.0}, 422, "invalid_value", "strength"),
        ({"strength": 1.5}, 422, "invalid_value", "strength"),
        ({"strength": -0.2}, 422, "invalid_value", "strength"),
        ({"strength": "0.5"}, 422, "invalid_value", "strength"),
        ({"strength": 0.05}, 422, "strength_too_low", "strength"),  # ⌊10 · 0.05⌋ = 0 steps
        ({"strength": 0.2, "num_inference_steps": 4}, 422, "strength_too_low", "strength"),
        ({"image": png_b64(4, 4)}, 422, "wrong_image_size", "image"),
        ({"image": "not base64!"}, 400, "invalid_base64", "image"),
        ({"mask": png_b64()}, 422, "unknown_field", None),
        ({"model": "tiny-ae"}, 400, "unsupported_task", "model"),
        ({"model": "tiny-vae", "class_label": None}, 422, "not_a_diffusion_model", "model"),
        ({"model": "nope"}, 404, "model_not_found", "model"),
        ({"class_label": 7}, 422, "class_out_of_range", "class_label"),
    ],
)
def test_img2img_errors_are_clear_4xx(
    client: TestClient, change: dict[str, Any], status: int, code: str, param: str | None
) -> None:
    body = {k: v for k, v in {**BODY, **change}.items() if v is not None}
    error = assert_error(client.post("/img2img", json=body), status, code, param)
    if code == "strength_too_low":
        assert "at least" in error["message"] or "strength ≥" in error["message"]


def test_a_small_strength_with_enough_steps_is_accepted(client: TestClient) -> None:
    r = client.post("/img2img", json={**BODY, "strength": 0.05, "num_inference_steps": 20})
    assert r.status_code == 202, r.text  # ⌊20 · 0.05⌋ = 1 step


def test_img2img_takes_the_negative_prompt_and_solver_options_as_generate_does(
    client: TestClient,
) -> None:
    """Regression (found merging #20 item 2 with #20 item 3 and #22): `/img2img` lacked
    `negative_prompt`, `use_karras_sigmas` and `solver_order`, which every other sampling route
    takes from the same declarations."""
    body = {"model": "tiny-text", "image": png_b64(mode="L"), "prompt": "red", "strength": 0.5}
    r = client.post("/img2img", json={**body, "negative_prompt": "blue", "guidance_scale": 3.0})
    assert r.status_code == 202, r.text
    request = queued_request(client, r.json()["id"])
    assert request["negative_prompt"] == "blue" and request["negative_prompt_tokens"]
    assert_error(
        client.post("/img2img", json={**BODY, "sampler": "ddim", "solver_order": 1}),
        422,
        "solver_option_not_applicable",
        "solver_order",
    )


def test_inpaint_strength_is_refused_on_a_repaint_model(client: TestClient) -> None:
    """`strength` on `/inpaint` is an inpainting UNet's (`StableDiffusionInpaintPipeline`);
    RePaint replaces the known region from pure noise and takes none."""
    body = {**BODY, "mask": png_b64(), "strength": 0.6}
    error = assert_error(
        client.post("/inpaint", json=body), 422, "strength_unsupported", "strength"
    )
    assert "inpainting UNets" in error["message"]
    omitted = {k: v for k, v in body.items() if k != "strength"}
    assert client.post("/inpaint", json=omitted).status_code == 202
