"""The typed job contract (`ddserve.spec`) end to end: what the gateway builds from an HTTP body is
what the worker parses from Redis, for every kind of job; a spec that does not parse fails only its
own job; classifier-free guidance follows diffusers' s (s = 1: no unconditional rows); and the
public s = 4 reproduces the sampling library's w = 3 exactly on the shipped zoo model."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import BaseModel
from rq.job import Job

from ddserve.jobs import META_ERROR
from ddserve.requests import DecodeBody, EncodeBody, GenerateBody, InpaintBody, ReconstructBody
from ddserve.settings import Settings
from ddserve.spec import (
    DecodeSpec,
    EncodeSpec,
    GenerateSpec,
    InpaintSpec,
    InvalidJobSpec,
    PriorSampleSpec,
    ReconstructSpec,
    parse_job_spec,
)
from models.catalog import DEFAULT_ZOO
from models.diffusion.noise import sample_generator
from models.diffusion.sampler import SamplerSettings, sample
from tests import specs
from tests.gateway_support import make_app, png_b64, write_config_zoo
from tests.redis_sandbox import RedisSandbox, status, wait_terminal
from tests.test_engine import make_engine
from tests.test_worker_batching import MODEL, generate, pool, running, zoo  # noqa: F401
from tests.worker_doubles import MemoryFeed, MemoryStorage
from workers.engine import DenoiseLane
from workers.execute import encode_image, run_alone
from workers.model_pool import DiffusionModel, ModelPool


# --- (a) the gateway's spec is the worker's spec --------------------------------------------------
@pytest.fixture(scope="module")
def config_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_zoo(tmp_path_factory.mktemp("config-zoo"))


@pytest.fixture
def gateway(config_zoo: Path, tmp_path: Path) -> Iterator[TestClient]:
    app, _ = make_app(config_zoo, tmp_path)
    with TestClient(app) as client:
        yield client


LATENTS = [[[[0, 1, 2, 3]] * 4] * 2]  # [1, 2, 4, 4] for tiny-ae
ROUND_TRIPS: list[tuple[str, str, type[BaseModel], dict[str, Any], type[BaseModel]]] = [
    # (case, route, body class, body, spec class)
    (
        "generate-class",
        "generate",
        GenerateBody,
        {"model": "tiny-ddpm", "class_label": 2, "n": 2, "seed": 5},
        GenerateSpec,
    ),
    (
        "generate-class-classifier",
        "generate",
        GenerateBody,
        {
            "model": "tiny-ddpm",
            "class_label": 1,
            "guidance_scale": 7.5,
            "classifier_scale": 2,
            "sampler": "ddpm",
            "num_inference_steps": 20,
            "output": {"return": "b64", "trajectory": True},
            "seed": 9,
        },
        GenerateSpec,
    ),
    (
        "generate-prompt",
        "generate",
        GenerateBody,
        {"model": "tiny-text", "prompt": "Red triangle", "seed": 3},
        GenerateSpec,
    ),
    (
        "generate-unconditional",
        "generate",
        GenerateBody,
        {"model": "tiny-ddpm", "seed": 1},
        GenerateSpec,
    ),
    (
        "prior-sample",
        "generate",
        GenerateBody,
        {"model": "tiny-vae", "n": 3, "seed": 8},
        PriorSampleSpec,
    ),
    (
        "inpaint",
        "inpaint",
        InpaintBody,
        {
            "model": "tiny-ddpm",
            "image": png_b64(),
            "mask": png_b64(value=200),
            "class_label": 1,
            "seed": 1,
        },
        InpaintSpec,
    ),
    (
        "encode",
        "encode",
        EncodeBody,
        {"model": "tiny-ae", "images": [png_b64(), png_b64(value=7)]},
        EncodeSpec,
    ),
    ("decode-latents", "decode", DecodeBody, {"model": "tiny-ae", "latents": LATENTS}, DecodeSpec),
    (
        "decode-codes",
        "decode",
        DecodeBody,
        {"model": "tiny-vq", "codes": [[[0, 1], [2, 3]]]},
        DecodeSpec,
    ),
    (
        "reconstruct",
        "reconstruct",
        ReconstructBody,
        {"model": "tiny-ae", "images": [png_b64()], "seed": 4},
        ReconstructSpec,
    ),
    (
        "reconstruct-noise",
        "reconstruct",
        ReconstructBody,
        {
            "model": "tiny-vq",
            "images": [png_b64(mode="L")],
            "noise": {"kind": "gaussian", "amount": 0.5},
            "seed": 4,
        },
        ReconstructSpec,
    ),
]


def through_redis(value: dict[str, Any]) -> Any:
    """The JSON form as it crosses Redis: serialized and read back."""
    return json.loads(json.dumps(value))


@pytest.mark.parametrize(
    ("route", "body_type", "body", "spec_type"),
    [case[1:] for case in ROUND_TRIPS],
    ids=[case[0] for case in ROUND_TRIPS],
)
def test_the_worker_parses_the_spec_the_gateway_built(
    gateway: TestClient,
    route: str,
    body_type: type[BaseModel],
    body: dict[str, Any],
    spec_type: type[BaseModel],
) -> None:
    normalizer = gateway.app.state.ddserve.normalizer
    built = getattr(normalizer, route)(body_type.model_validate(body))  # the gateway's spec
    assert type(built) is spec_type
    worker_side = parse_job_spec(through_redis(built.to_json()))
    assert type(worker_side) is spec_type
    assert worker_side == built
    assert worker_side.to_json() == built.to_json()

    # The same body posted to the gateway: the RQ job's `request` is that spec's JSON form.
    response = gateway.post(f"/{route}", json=body)
    assert response.status_code == 202, response.text
    queued = queue_request(gateway, response.json()["id"])
    assert queued == built.to_json()
    assert parse_job_spec(through_redis(queued)) == built


def queue_request(client: TestClient, job_id: str) -> dict[str, Any]:
    """The `request` keyword argument of the RQ job the gateway queued."""
    return Job.fetch(job_id, connection=client.app.state.ddserve.connection).kwargs["request"]


def test_the_gateway_resolves_every_sampling_field(gateway: TestClient) -> None:
    normalizer = gateway.app.state.ddserve.normalizer
    guided = normalizer.generate(GenerateBody(model="tiny-ddpm", class_label=1))
    assert guided.guidance_scale == 3.0 and guided.guided  # the card's default s
    plain = normalizer.generate(GenerateBody(model="tiny-ddpm"))
    assert plain.guidance_scale == 1.0 and not plain.guided  # no condition: s = 1
    assert isinstance(plain.seed, int)  # drawn by the gateway, so the worker never draws one
    text = normalizer.generate(GenerateBody(model="tiny-text", prompt="Red triangle"))
    assert text.prompt_tokens == [1, 9, 0, 0]  # tokenized once, by the gateway


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"num_inference_steps": None}, "num_inference_steps: Field required"),  # None: left out
        ({"seed": None}, "seed: Field required"),
        ({"n": 0}, "n: Input should be greater than or equal to 1"),
        ({"n": "many"}, "n: Input should be a valid integer"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"guidance_scale": 0.0}, "guidance_scale: Input should be greater"),  # old "none": s ≥ 1
        ({"guidance_scale": 3.0}, "needs a condition"),  # guided, but unconditional
        ({"prompt_tokens": [1, 0]}, "prompt_tokens"),  # tokens of no prompt
        ({"kind": "paint"}, "kind must be one of"),
    ],
)
def test_a_malformed_spec_raises_a_clear_invalid_job_spec(
    change: dict[str, Any], named: str
) -> None:
    spec = specs.generate("tiny-ddpm") | change
    spec = {k: v for k, v in spec.items() if v is not None or k not in change}
    with pytest.raises(InvalidJobSpec) as caught:
        parse_job_spec(spec)
    assert str(caught.value).startswith("invalid job spec: ") and named in str(caught.value)
    assert isinstance(caught.value, ValueError)  # → the job's error type invalid_request_error


def test_a_spec_that_is_not_a_mapping_is_refused() -> None:
    for junk in (None, "generate", [1, 2], 3):
        with pytest.raises(InvalidJobSpec, match="invalid job spec"):
            parse_job_spec(junk)


def test_a_generate_spec_without_a_sampler_names_the_sampler() -> None:
    spec = {k: v for k, v in specs.generate("tiny-ddpm").items() if k != "sampler"}
    with pytest.raises(InvalidJobSpec) as caught:
        parse_job_spec(spec)
    assert "sampler" in str(caught.value)


def test_a_spec_with_a_string_count_is_refused() -> None:
    with pytest.raises(InvalidJobSpec) as caught:
        parse_job_spec({**specs.generate("tiny-ddpm"), "n": "2"})
    assert "n: Input should be a valid integer" in str(caught.value)


# --- (b) a malformed spec fails only its job, through Redis and the batching worker ------------
@pytest.mark.redis
@pytest.mark.parametrize(
    ("malformed", "named"),
    [
        ({"num_inference_steps": None}, "num_inference_steps: Field required"),
        ({"n": "many"}, "n: Input should be a valid integer"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ],
    ids=["missing-field", "wrong-type", "unknown-field"],
)
def test_a_malformed_spec_fails_only_its_job(
    box: RedisSandbox,
    running: Any,  # noqa: F811
    malformed: dict[str, Any],
    named: str,
) -> None:
    bad_spec = {k: v for k, v in (generate(2) | malformed).items() if v is not None}
    first = box.enqueue(MODEL, generate(1, num_inference_steps=4))
    bad = box.enqueue(MODEL, bad_spec)
    last = box.enqueue(MODEL, generate(3, num_inference_steps=4))
    worker = running()
    wait_terminal([first, bad, last])
    assert [status(j) for j in (first, bad, last)] == ["finished", "failed", "finished"]
    error = bad.get_meta(refresh=True)[META_ERROR]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
    assert error["message"].startswith("invalid job spec:") and named in error["message"]
    assert worker.handle.alive and worker.engine.stats.jobs_succeeded == 2
    after = box.enqueue(MODEL, generate(4, num_inference_steps=3))  # the worker goes on
    wait_terminal([after])
    assert status(after) == "finished"


# --- (c) s = 1 computes no unconditional rows ---------------------------------------------------
@pytest.mark.parametrize(("scale", "rows_per_image"), [(1.0, 1), (1.5, 2), (4.0, 2)])
def test_guidance_scale_one_adds_no_unconditional_rows(
    pool: ModelPool,  # noqa: F811
    scale: float,
    rows_per_image: int,
) -> None:
    n, steps = 3, 4
    spec = specs.generate(
        MODEL, n=n, class_label=5, guidance_scale=scale, num_inference_steps=steps, seed=2
    )
    assert parse_job_spec(spec).guided == (scale > 1.0)
    feed = MemoryFeed()
    ticket = feed.submit(spec)
    engine, _ = make_engine(pool, feed, models=(MODEL,), max_batch=16)
    lane = engine.lanes[MODEL]
    assert isinstance(lane, DenoiseLane)
    real, calls = lane.isolation.network, []

    def counted(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        calls.append(cond.clone() if cond is not None else None)
        return real(x, t, cond)

    lane.isolation.network = counted
    try:
        engine.run_until_idle()
    finally:
        lane.isolation.network = real
    assert ticket.output is not None, ticket.error
    assert engine.stats.rows_per_call == [n * rows_per_image] * steps
    assert ticket.batch_rows == n * rows_per_image
    model = pool.get(MODEL)
    assert isinstance(model, DiffusionModel) and model.null_condition is not None
    for cond in calls:  # the network saw the class rows, plus the ∅ rows only when guided
        assert cond is not None and len(cond) == n * rows_per_image
        assert int((cond == 5).sum()) == n
        assert int((cond == model.null_condition).sum()) == n * (rows_per_image - 1)


# --- (d) public s = 4 is the library's w = 3 on the shipped model -------------------------------
def test_scale_four_on_the_zoo_model_reproduces_weight_three_exactly() -> None:
    torch.set_num_threads(1)
    zoo_pool = ModelPool(Settings(zoo_dir=DEFAULT_ZOO, device="cpu", models="digits-ddpm"))
    model = zoo_pool.get("digits-ddpm")
    assert isinstance(model, DiffusionModel) and model.entry.defaults is not None
    assert model.entry.defaults.guidance_scale == 4.0  # the card's default: s = 4 (was w = 3)
    n, seed, label, steps = 2, 3, 7, 5
    spec = parse_job_spec(
        specs.generate(
            "digits-ddpm",
            n=n,
            seed=seed,
            class_label=label,
            sampler="ddim",
            num_inference_steps=steps,
            eta=0.0,
            guidance_scale=4.0,
            clip_denoised=True,
        )
    )
    storage = MemoryStorage()
    output = run_alone(spec, zoo_pool, storage, "s4")
    served = [storage.get(record["key"]) for record in output["images"]]

    def library(weight: float) -> torch.Tensor:
        """The sampling library driven directly: x_T and every noise draw of image i from the
        stream of its seed, seed + i; classifier-free guidance weight w."""
        generators = [sample_generator(seed + i, 0) for i in range(n)]
        x_T = torch.stack([torch.randn(model.sample_shape, generator=g) for g in generators])
        settings = SamplerSettings(
            sampler="ddim",
            num_inference_steps=steps,
            eta=0.0,
            guidance_scale=weight,
            clip_denoised=True,
        )
        with torch.no_grad():
            x0 = sample(
                model.denoiser,
                model.schedule,
                x_T,
                settings,
                cond=torch.full((n,), label, dtype=torch.long),
                null_condition=model.null_condition,
                prediction_type=model.entry.prediction_type,
                generators=generators,
            )
        return model.to_pixels(x0)

    old = [encode_image(image) for image in library(3.0)]
    assert served == old  # bit for bit, PNG bytes
    decoded = [np.asarray(Image.open(io.BytesIO(png))) for png in served]
    assert all(image.shape == (16, 16) for image in decoded)
    assert served != [encode_image(image) for image in library(4.0)]  # w = 4 is another image
