"""The gateway's validation against the catalog: every 4xx of the contract with its error body, and
the normalized request it queues (defaults from the catalog). fakeredis, no worker, no torch."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from rq.job import Job

from tests.gateway_support import (
    assert_error,
    make_app,
    png_b64,
    png_header_only,
    write_config_zoo,
)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def client(zoo: Path, tmp_path: Path) -> Iterator[TestClient]:
    app, _ = make_app(zoo, tmp_path, max_image_bytes=4096, max_image_pixels=64 * 64)
    with TestClient(app) as c:
        yield c


def queued_request(client: TestClient, job_id: str) -> dict:
    conn = client.app.state.ddserve.connection
    return Job.fetch(job_id, connection=conn).kwargs["request"]


def test_generate_fills_defaults_and_queues(client: TestClient) -> None:
    r = client.post("/generate", json={"model": "tiny-ddpm", "class_label": 2})
    assert r.status_code == 202
    job = r.json()
    assert r.headers["location"] == f"/jobs/{job['id']}"
    assert job["status"] == "queued" and job["queue_position"] == 0
    assert job["kind"] == "generate" and job["model"] == "tiny-ddpm"
    expected = {
        "kind": "generate",
        "model": "tiny-ddpm",
        "n": 1,
        "sampler": "ddim",
        "num_inference_steps": 10,
        "eta": 0.0,
        "use_karras_sigmas": None,  # ddim takes neither solver option
        "solver_order": None,
        "class_label": 2,
        "prompt": None,
        "prompt_tokens": None,
        "negative_prompt": None,
        "negative_prompt_tokens": None,
        "guidance_scale": 3.0,  # the model's default (s), since a class is given
        "classifier_scale": 0.0,
        "clip_denoised": True,
        "height": 8,  # the model's own size, always written by the gateway
        "width": 8,
        "output": {
            "format": "png",
            "quality": None,
            "return": "url",
            "trajectory": False,
            "preview_every": None,
        },
    }
    normalized = queued_request(client, job["id"])
    assert isinstance(normalized.pop("seed"), int)  # drawn by the gateway
    assert normalized == expected
    assert job["input"]["seed"] is not None
    second = client.post("/generate", json={"model": "tiny-ddpm"}).json()
    assert second["queue_position"] == 1
    assert second["input"]["guidance_scale"] == 1.0  # no condition: no guidance (s = 1)


def test_prompt_is_tokenized_and_checked(client: TestClient) -> None:
    r = client.post("/generate", json={"model": "tiny-text", "prompt": "Red triangle", "seed": 3})
    assert r.status_code == 202
    assert r.json()["input"]["prompt_tokens"] == [1, 9, 0, 0]
    err = assert_error(
        client.post("/generate", json={"model": "tiny-text", "prompt": "purple hexagon"}),
        422,
        "invalid_prompt",
        "prompt",
    )
    assert "'purple'" in err["message"] and "'hexagon'" in err["message"]
    assert "red, green, blue" in err["message"]  # the vocabulary is listed
    assert_error(
        client.post("/generate", json={"model": "tiny-text", "class_label": 1}),
        422,
        "not_class_conditional",
        "class_label",
    )
    assert_error(
        client.post("/generate", json={"model": "tiny-ddpm", "prompt": "red"}),
        422,
        "not_text_conditional",
        "prompt",
    )


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"model": "nope"}, 404, "model_not_found", "model"),
        ({"model": "tiny-clf"}, 404, "model_not_found", "model"),  # a helper, not served
        ({"model": "tiny-ae"}, 400, "unsupported_task", "model"),
        ({"model": "tiny-ddpm", "class_label": 3}, 422, "class_out_of_range", "class_label"),
        ({"model": "tiny-ddpm", "class_label": -1}, 422, "invalid_value", "class_label"),
        ({"model": "tiny-ddpm", "n": 0}, 422, "invalid_value", "n"),
        ({"model": "tiny-ddpm", "n": 17}, 422, "invalid_value", "n"),
        ({"model": "tiny-ddpm", "num_inference_steps": 101}, 422, "too_many_steps", None),
        ({"model": "tiny-ddpm", "num_inference_steps": 0}, 422, "invalid_value", None),
        ({"model": "tiny-ddpm", "eta": 1.5}, 422, "invalid_value", "eta"),
        (
            {"model": "tiny-ddpm", "class_label": 1, "guidance_scale": 21.5},  # s ≤ 21
            422,
            "invalid_value",
            None,
        ),
        (
            {"model": "tiny-ddpm", "class_label": 1, "guidance_scale": 0.5},  # s ≥ 1
            422,
            "invalid_value",
            None,
        ),
        ({"model": "tiny-ddpm", "guidance_scale": 3}, 422, "guidance_needs_condition", None),
        (
            {"model": "tiny-ddpm", "classifier_scale": 1},
            422,
            "classifier_guidance_needs_class",
            None,
        ),
        ({"model": "tiny-text", "sampler": "ddpm"}, 422, "unsupported_sampler", "sampler"),
        ({"model": "tiny-ddpm", "sampler": "heun"}, 422, "invalid_value", "sampler"),
        ({"model": "tiny-ddpm", "steps": 5}, 422, "unknown_field", "steps"),
        ({"n": 2}, 422, "missing_field", "model"),
        ({"model": "tiny-ddpm", "seed": -1}, 422, "invalid_value", "seed"),
        ({"model": "tiny-ddpm", "output": {"return": "s3"}}, 422, "invalid_value", "output.return"),
        (
            {"model": "tiny-ddpm", "class_label": 1, "prompt": "x"},
            422,
            "conflicting_condition",
            None,
        ),
    ],
)
def test_generate_errors(
    client: TestClient, body: dict, status: int, code: str, param: str | None
) -> None:
    error = assert_error(client.post("/generate", json=body), status, code)
    if param is not None:
        assert error["param"] == param
    elif code not in {"invalid_value"}:
        assert error["param"] in {
            "num_inference_steps",
            "guidance_scale",
            "classifier_scale",
            "prompt",
        }
    assert client.app.state.ddserve.connection.llen("rq:queue:gwtest:tiny-ddpm") == 0


def test_classifier_guidance_is_accepted_with_a_class(client: TestClient) -> None:
    r = client.post(
        "/generate", json={"model": "tiny-ddpm", "class_label": 0, "classifier_scale": 2}
    )
    assert r.status_code == 202 and r.json()["input"]["classifier_scale"] == 2.0


def test_malformed_bodies(client: TestClient) -> None:
    headers = {"content-type": "application/json"}
    assert_error(client.post("/generate", content=b"{bad", headers=headers), 400, "invalid_json")
    assert_error(client.post("/generate", content=b"[1, 2]", headers=headers), 400, "invalid_body")
    assert_error(client.post("/generate", content=b"model=x"), 400, "invalid_body")


def test_images_are_checked_and_canonicalized(client: TestClient) -> None:
    rgba = io.BytesIO()
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(rgba, format="PNG")  # transparent
    r = client.post(
        "/encode",
        json={
            "model": "tiny-ae",
            "images": [png_b64(), base64.b64encode(rgba.getvalue()).decode()],
        },
    )
    assert r.status_code == 202, r.text
    images = queued_request(client, r.json()["id"])["images"]
    decoded = [Image.open(io.BytesIO(base64.b64decode(i))) for i in images]
    assert [im.mode for im in decoded] == ["L", "L"]
    assert decoded[1].getpixel((0, 0)) == 255  # transparency composited on white

    def encode(image: str) -> object:
        return client.post("/encode", json={"model": "tiny-ae", "images": [png_b64(), image]})

    assert_error(encode(png_b64(9, 8)), 422, "wrong_image_size", "images[1]")
    assert_error(encode("not base64!"), 400, "invalid_base64", "images[1]")
    jpeg = io.BytesIO()
    Image.new("L", (8, 8)).save(jpeg, format="JPEG")
    assert_error(
        encode(base64.b64encode(jpeg.getvalue()).decode()), 400, "invalid_image", "images[1]"
    )
    truncated = base64.b64decode(png_b64())[:40]
    assert_error(encode(base64.b64encode(truncated).decode()), 400, "invalid_image", "images[1]")
    bomb = base64.b64encode(png_header_only(100_000, 100_000)).decode()
    assert_error(encode(bomb), 413, "image_too_large", "images[1]")  # refused from the header
    big = base64.b64encode(b"\x89PNG" + b"\0" * 5000).decode()
    assert_error(encode(big), 413, "image_too_large", "images[1]")
    assert_error(
        client.post("/encode", json={"model": "tiny-ae", "images": []}),
        422,
        "invalid_value",
        "images",
    )
    assert_error(
        client.post("/encode", json={"model": "tiny-ae", "images": [png_b64()] * 17}),
        422,
        "invalid_value",
        "images",
    )


def test_rgb_model_gets_rgb(client: TestClient) -> None:
    r = client.post("/reconstruct", json={"model": "tiny-vq", "images": [png_b64(mode="L")]})
    assert r.status_code == 202
    request = queued_request(client, r.json()["id"])
    assert Image.open(io.BytesIO(base64.b64decode(request["images"][0]))).mode == "RGB"
    assert request["noise"] is None and isinstance(request["seed"], int)


def test_inpaint_checks_image_and_mask(client: TestClient) -> None:
    body = {"model": "tiny-ddpm", "image": png_b64(), "mask": png_b64(value=200), "seed": 1}
    r = client.post("/inpaint", json=body)
    assert r.status_code == 202
    request = queued_request(client, r.json()["id"])
    mask = Image.open(io.BytesIO(base64.b64decode(request["mask"])))
    assert mask.mode == "L" and set(mask.getdata()) == {255}  # ≥ 128 → keep
    assert request["jump_length"] == 5 and request["jump_n_sample"] == 1
    assert_error(
        client.post("/inpaint", json={**body, "mask": png_b64(4, 4)}),
        422,
        "wrong_image_size",
        "mask",
    )
    assert_error(
        client.post("/inpaint", json={**body, "num_inference_steps": 4, "jump_length": 5}),
        422,
        "jump_too_long",
        "jump_length",
    )
    short = client.post("/inpaint", json={**body, "num_inference_steps": 3}).json()
    assert short["input"]["jump_length"] == 3  # the default jump is cut to the step count
    assert_error(
        client.post("/inpaint", json={**body, "model": "tiny-text"}), 400, "unsupported_task"
    )


def test_decode_checks_latents_and_codes(client: TestClient) -> None:
    latents = [[[[0, 1, 2, 3]] * 4] * 2]  # [1, 2, 4, 4], ints become floats
    r = client.post("/decode", json={"model": "tiny-ae", "latents": latents})
    assert r.status_code == 202
    assert queued_request(client, r.json()["id"])["latents"][0][0][0] == [0.0, 1.0, 2.0, 3.0]
    assert_error(
        client.post("/decode", json={"model": "tiny-ae", "latents": [[[[0.0] * 4] * 4] * 3]}),
        422,
        "wrong_latent_shape",
        "latents",
    )
    ragged = [[[[0.0] * 4] * 4, [[0.0] * 3] * 4]]
    assert_error(
        client.post("/decode", json={"model": "tiny-ae", "latents": ragged}),
        422,
        "wrong_latent_shape",
    )
    assert_error(client.post("/decode", json={"model": "tiny-ae"}), 422, "missing_field", "latents")
    assert_error(
        client.post("/decode", json={"model": "tiny-ae", "codes": [[[0, 1], [2, 3]]]}),
        422,
        "not_vector_quantized",
        "codes",
    )
    ok = client.post("/decode", json={"model": "tiny-vq", "codes": [[[0, 1], [2, 3]]]})
    assert ok.status_code == 202
    assert queued_request(client, ok.json()["id"])["codes"] == [[[0, 1], [2, 3]]]
    via_latents = client.post("/decode", json={"model": "tiny-vq", "latents": [[[0, 1], [2, 3]]]})
    assert via_latents.status_code == 202
    assert_error(
        client.post("/decode", json={"model": "tiny-vq", "codes": [[[0, 1], [2, 4]]]}),
        422,
        "code_out_of_range",
        "codes",
    )


def test_decode_takes_any_latent_rank(client: TestClient) -> None:
    r = client.post("/decode", json={"model": "tiny-vae", "latents": [[0, 0.5, -1, 2]] * 3})
    assert r.status_code == 202
    assert queued_request(client, r.json()["id"])["latents"][0] == [0.0, 0.5, -1.0, 2.0]
    assert_error(
        client.post("/decode", json={"model": "tiny-vae", "latents": [[0, 0.5, "x", 2]]}),
        422,
        "invalid_latents",
        "latents",
    )
    assert_error(
        client.post("/decode", json={"model": "tiny-vae", "latents": [[0, 1, True, 2]]}),
        422,
        "invalid_latents",
    )
    assert_error(
        client.post("/decode", json={"model": "tiny-vae", "latents": [[0.0] * 5]}),
        422,
        "wrong_latent_shape",
    )
    # a VQ-VAE also takes its continuous latents [n, 2, 2, 2]: the worker quantizes them
    vq = client.post("/decode", json={"model": "tiny-vq", "latents": [[[[0.5] * 2] * 2] * 2]})
    assert vq.status_code == 202
    request = queued_request(client, vq.json()["id"])
    assert request["codes"] is None and request["latents"] == [[[[0.5] * 2] * 2] * 2]


def test_generate_from_a_prior(client: TestClient) -> None:
    r = client.post("/generate", json={"model": "tiny-vae", "n": 3, "seed": 8})
    assert r.status_code == 202
    assert queued_request(client, r.json()["id"]) == {
        "kind": "generate",
        "model": "tiny-vae",
        "n": 3,
        "class_label": None,
        "seed": 8,
        "output": {
            "format": "png",
            "quality": None,
            "return": "url",
            "trajectory": False,
            "preview_every": None,
        },
    }
    for field, value in [("sampler", "ddim"), ("num_inference_steps", 5), ("eta", 0.5)]:
        assert_error(
            client.post("/generate", json={"model": "tiny-vae", field: value}),
            422,
            "not_a_diffusion_model",
            field,
        )
    assert_error(
        client.post("/generate", json={"model": "tiny-vae", "output": {"trajectory": True}}),
        422,
        "not_a_diffusion_model",
        "output.trajectory",
    )
    assert_error(
        client.post("/generate", json={"model": "tiny-vae", "class_label": 1}),
        422,
        "not_class_conditional",
        "class_label",
    )


def test_reconstruct_noise_limits(client: TestClient) -> None:
    body = {"model": "tiny-ae", "images": [png_b64()], "seed": 4}
    ok = client.post("/reconstruct", json={**body, "noise": {"kind": "gaussian", "amount": 1.5}})
    assert ok.status_code == 202
    assert ok.json()["input"]["noise"] == {"kind": "gaussian", "amount": 1.5}
    assert_error(
        client.post("/reconstruct", json={**body, "noise": {"kind": "masking", "amount": 1.5}}),
        422,
        "invalid_noise_amount",
        "noise.amount",
    )
    assert_error(
        client.post("/reconstruct", json={**body, "noise": {"kind": "blur", "amount": 0.1}}),
        422,
        "invalid_value",
        "noise.kind",
    )


def test_body_size_limit(zoo: Path, tmp_path: Path) -> None:
    app, _ = make_app(zoo, tmp_path, max_body_bytes=2048)
    big = {"model": "tiny-ae", "images": ["A" * 4000]}
    with TestClient(app) as client:
        assert_error(client.post("/encode", json=big), 413, "body_too_large")

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
            yield b'{"model": "tiny-ae", "images": ["'
            for _ in range(10):
                yield b"A" * 400
            yield b'"]}'

        assert_error(client.post("/encode", content=chunks()), 413, "body_too_large")


def test_framework_errors_use_the_error_body(client: TestClient) -> None:
    assert_error(client.get("/no/such/route"), 404, "not_found")
    assert_error(client.delete("/models"), 405, "method_not_allowed")
    assert_error(client.get("/jobs/not-a-job"), 404, "job_not_found", "id")
    assert_error(client.get("/jobs/../../etc"), 404, "not_found")
    assert_error(client.post("/jobs/%20x/cancel"), 404, "job_not_found")
