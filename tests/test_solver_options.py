"""The solver options `use_karras_sigmas` and `solver_order` as request parameters (#22): declared
once, taken only by the samplers they apply to (a 422 naming those otherwise), filled from the card
for those samplers and null for the others, carried by the spec to the worker's sampler settings;
and the step limits per sampler (the multistep solvers take at most T − 1 steps on their spaced
timesteps)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from ddserve import params
from ddserve.requests import GenerateBody, InpaintBody
from ddserve.settings import Settings
from ddserve.spec import InvalidJobSpec, parse_job_spec
from models.catalog import DEFAULT_ZOO, SamplingDefaults, load_catalog
from models.diffusion.steps import MULTISTEP_SAMPLERS, SIGMA_SAMPLERS
from models.registry import write_entry
from service.app import create_app
from service.errors import ApiError
from service.normalize import RequestNormalizer
from service.uploads import UploadLimits
from tests import specs
from tests.gateway_support import assert_error, png_b64
from tests.tiny_zoo import write_diffusion_model
from workers.execute import prepare_denoise
from workers.model_pool import DiffusionModel, ModelPool


def test_the_option_sampler_lists_are_the_librarys() -> None:
    assert params.KARRAS_SAMPLERS == SIGMA_SAMPLERS
    assert params.ORDER_SAMPLERS == MULTISTEP_SAMPLERS


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    import fakeredis

    settings = Settings(
        zoo_dir=DEFAULT_ZOO, storage_dir=tmp_path, auth_enabled=False, signing_secret="x"
    )
    return TestClient(create_app(settings, fakeredis.FakeRedis()))


def generate(client: TestClient, **fields: object) -> object:
    return client.post("/generate", json={"model": "digits-ddpm", "class_label": 3, **fields})


def test_generate_takes_the_options_for_the_samplers_they_apply_to(client: TestClient) -> None:
    with client:
        answer = generate(client, sampler="dpmpp_2m", use_karras_sigmas=True, solver_order=1)
        assert answer.status_code == 202, answer.text  # type: ignore[attr-defined]
        job = answer.json()["input"]  # type: ignore[attr-defined]
        assert (job["use_karras_sigmas"], job["solver_order"]) == (True, 1)
        job = generate(client, sampler="unipc").json()["input"]  # type: ignore[attr-defined]
        assert (job["use_karras_sigmas"], job["solver_order"]) == (False, 2)  # the card's
        job = generate(client, sampler="euler", use_karras_sigmas=True).json()["input"]  # type: ignore[attr-defined]
        assert (job["use_karras_sigmas"], job["solver_order"]) == (True, None)
        job = generate(client, sampler="ddim").json()["input"]  # type: ignore[attr-defined]
        assert (job["use_karras_sigmas"], job["solver_order"]) == (None, None)


@pytest.mark.parametrize(
    ("fields", "param", "listed"),
    [
        ({"sampler": "ddim", "use_karras_sigmas": True}, "use_karras_sigmas", "euler, "),
        ({"sampler": "ddpm", "use_karras_sigmas": False}, "use_karras_sigmas", "unipc"),
        ({"sampler": "euler", "solver_order": 2}, "solver_order", "dpmpp_2m, dpmpp_2m_sde, unipc"),
        ({"sampler": "ddim", "solver_order": 1}, "solver_order", "dpmpp_2m, dpmpp_2m_sde, unipc"),
    ],
)
def test_an_option_given_for_a_sampler_it_does_not_apply_to_is_a_422_naming_those_it_does(
    client: TestClient, fields: dict[str, object], param: str, listed: str
) -> None:
    with client:
        error = assert_error(generate(client, **fields), 422, "solver_option_not_applicable", param)
        assert listed in error["message"] and repr(fields["sampler"]) in error["message"]
        image, mask = png_b64(16, 16), png_b64(16, 16, value=255)
        inpaint = {"model": "digits-ddpm", "image": image, "mask": mask, **fields}
        assert_error(
            client.post("/inpaint", json=inpaint), 422, "solver_option_not_applicable", param
        )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"sampler": "unipc", "solver_order": 3}, "solver_order"),
        ({"sampler": "unipc", "solver_order": 0}, "solver_order"),
        ({"sampler": "unipc", "solver_order": "2"}, "solver_order"),
        ({"sampler": "euler", "use_karras_sigmas": "yes"}, "use_karras_sigmas"),
        ({"sampler": "euler", "use_karras_sigmas": 1}, "use_karras_sigmas"),
    ],
)
def test_option_values_outside_their_declaration_are_a_422(
    client: TestClient, fields: dict[str, object], param: str
) -> None:
    with client:
        assert_error(generate(client, **fields), 422, "invalid_value", param)


@pytest.mark.parametrize(
    ("fields", "valid"),
    [
        ({"sampler": "ddim", "num_inference_steps": 1001}, "1 to 1000"),
        ({"sampler": "euler", "num_inference_steps": 1001}, "1 to 1000"),
        ({"sampler": "dpmpp_2m", "num_inference_steps": 1000}, "1 to 999"),
        ({"sampler": "unipc", "num_inference_steps": 1000}, "1 to 999"),
    ],
)
def test_steps_beyond_the_schedule_are_a_422_giving_the_sampler_range(
    client: TestClient, fields: dict[str, object], valid: str
) -> None:
    with client:
        error = assert_error(generate(client, **fields), 422, "too_many_steps")
        assert valid in error["message"] and "T = 1000" in error["message"]


@pytest.mark.parametrize(
    "fields",
    [
        {"sampler": "ddim", "num_inference_steps": 1000},
        {"sampler": "dpmpp_2m", "num_inference_steps": 999},
        {"sampler": "dpmpp_2m", "num_inference_steps": 1000, "use_karras_sigmas": True},
    ],
)
def test_the_largest_step_count_of_each_sampler_is_accepted(
    client: TestClient, fields: dict[str, object]
) -> None:
    with client:
        answer = generate(client, **fields)
        assert answer.status_code == 202, answer.text  # type: ignore[attr-defined]


def test_the_cards_option_defaults_apply_only_to_the_samplers_taking_them() -> None:
    catalog = load_catalog(DEFAULT_ZOO)
    entry = catalog["digits-ddpm"].model_copy(deep=True)
    entry.defaults = SamplingDefaults(
        sampler="dpmpp_2m", num_inference_steps=8, use_karras_sigmas=True, solver_order=1
    )
    normalizer = RequestNormalizer(
        {**catalog, "digits-ddpm": entry}, {"digits-ddpm"}, UploadLimits(10**6, 10**6)
    )

    def spec_of(**fields: object) -> tuple[object, ...]:
        body = GenerateBody.model_validate({"model": "digits-ddpm", "class_label": 1, **fields})
        spec = normalizer.generate(body)
        return (spec.sampler, spec.num_inference_steps, spec.use_karras_sigmas, spec.solver_order)  # type: ignore[union-attr]

    assert spec_of() == ("dpmpp_2m", 8, True, 1)
    assert spec_of(sampler="euler") == ("euler", 8, True, None)
    assert spec_of(sampler="ddim") == ("ddim", 8, None, None)
    assert spec_of(use_karras_sigmas=False, solver_order=2) == ("dpmpp_2m", 8, False, 2)
    with pytest.raises(ApiError, match="solver_order applies to"):
        spec_of(sampler="ddpm", solver_order=2)


def test_the_spec_carries_the_options_exactly_for_the_samplers_taking_them() -> None:
    base = {"kind": "generate", "model": "m", "classifier_scale": 0.0, **specs.SAMPLING}
    parsed = parse_job_spec(
        {**base, "sampler": "unipc", "use_karras_sigmas": True, "solver_order": 1}
    )
    assert (parsed.use_karras_sigmas, parsed.solver_order) == (True, 1)  # type: ignore[union-attr]
    for wrong, message in [
        ({"sampler": "ddim", "use_karras_sigmas": False}, "use_karras_sigmas applies to"),
        (
            {"sampler": "euler", "use_karras_sigmas": True, "solver_order": 2},
            "solver_order applies",
        ),
        ({"sampler": "dpmpp_2m", "use_karras_sigmas": False}, "solver_order is missing"),
        ({"sampler": "euler"}, "use_karras_sigmas is missing"),
    ]:
        with pytest.raises(InvalidJobSpec, match=message):
            parse_job_spec({**base, **wrong})


def test_the_worker_samples_with_the_specs_options(tmp_path: Path) -> None:
    entry = write_diffusion_model(tmp_path, "tiny-ddpm")
    entry.samplers = list(params.SAMPLERS)
    write_entry(tmp_path / "tiny-ddpm", entry.model_dump(exclude={"path"}, exclude_none=True))
    model = ModelPool(Settings(zoo_dir=tmp_path, device="cpu")).get("tiny-ddpm")
    assert isinstance(model, DiffusionModel)
    images = {}
    for options in ({}, {"use_karras_sigmas": True}, {"solver_order": 1}):
        spec = parse_job_spec(
            specs.generate("tiny-ddpm", sampler="dpmpp_2m", num_inference_steps=6, **options)
        )
        work = prepare_denoise(spec, model, "job")
        (settings,) = {s.settings for s in work.samples}
        assert settings.use_karras_sigmas == options.get("use_karras_sigmas", False)
        assert settings.solver_order == options.get("solver_order", 2)
        batch = model.new_batch()
        batch.add(work.samples)
        while len(batch):
            batch.step()
        images[tuple(options)] = torch.stack([s.x for s in work.samples])
    assert not torch.allclose(images[()], images[("use_karras_sigmas",)])
    assert not torch.allclose(images[()], images[("solver_order",)])


@pytest.mark.parametrize("route", ["/generate", "/inpaint"])
def test_an_unknown_sampler_is_a_422_listing_every_sampler(client: TestClient, route: str) -> None:
    body: dict[str, object] = {"model": "digits-ddpm", "sampler": "heun"}
    if route == "/inpaint":
        body |= {"image": png_b64(16, 16), "mask": png_b64(16, 16, value=255)}
    with client:
        error = assert_error(client.post(route, json=body), 422, "invalid_value", "sampler")
    for name in params.SAMPLERS:
        assert repr(name) in error["message"], error["message"]


def test_a_multistep_card_default_gives_way_to_a_sampler_that_can_take_repaint_jumps() -> None:
    """Regression: `/inpaint` with jump_n_sample > 1 and no sampler on a model whose card default is
    dpmpp_2m was a 422; the request named no sampler, so RePaint's jumps run with DDIM (diffusers'
    RePaintScheduler update), or the first resampling sampler the model offers. A multistep solver
    the request names itself stays a 422, as does a model offering no sampler that can resample."""
    catalog = load_catalog(DEFAULT_ZOO)
    entry = catalog["digits-ddpm"].model_copy(deep=True)
    entry.defaults = SamplingDefaults(sampler="dpmpp_2m", num_inference_steps=5)
    image, mask = png_b64(16, 16), png_b64(16, 16, value=255)

    def inpaint(card: object = entry, **fields: object) -> object:
        normalizer = RequestNormalizer(
            {**catalog, "digits-ddpm": card}, {"digits-ddpm"}, UploadLimits(10**6, 10**6)
        )
        body = {"model": "digits-ddpm", "image": image, "mask": mask, **fields}
        return normalizer.inpaint(InpaintBody.model_validate(body))

    spec = inpaint(jump_n_sample=2)
    assert (spec.sampler, spec.num_inference_steps, spec.jump_length) == ("ddim", 5, 5)  # type: ignore[attr-defined]
    assert (spec.solver_order, spec.use_karras_sigmas) == (None, None)  # type: ignore[attr-defined]
    assert inpaint(jump_n_sample=1).sampler == "dpmpp_2m"  # type: ignore[attr-defined]
    with pytest.raises(ApiError) as refused:
        inpaint(jump_n_sample=2, sampler="dpmpp_2m")
    assert refused.value.code == "sampler_cannot_resample"
    assert "sampler 'dpmpp_2m' keeps a history" in refused.value.message
    assert "default" not in refused.value.message
    assert "give sampler, one of ddpm, ddim, euler, euler_ancestral" in refused.value.message
    no_ddim = entry.model_copy(update={"samplers": ["euler", "dpmpp_2m"]})
    assert inpaint(no_ddim, jump_n_sample=2).sampler == "euler"  # type: ignore[attr-defined]
    only_multistep = entry.model_copy(update={"samplers": ["dpmpp_2m", "unipc"]})
    with pytest.raises(ApiError) as refused:
        inpaint(only_multistep, jump_n_sample=2)
    assert refused.value.code == "sampler_cannot_resample"
    assert "'digits-ddpm''s default sampler 'dpmpp_2m'" in refused.value.message
