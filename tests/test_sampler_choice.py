"""The public `sampler` parameter offers every sampler of the library (#22): the same names on both
sides, the zoo's diffusion models list them, a multistep solver asked for RePaint's jumps is a 422
naming those that can, and a spec with a few-step solver runs through the worker's path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from ddserve import params
from ddserve.settings import Settings
from ddserve.spec import parse_job_spec
from models.catalog import DEFAULT_ZOO, load_catalog
from models.diffusion.steps import MULTISTEP_SAMPLERS, SAMPLER_NAMES
from models.registry import write_entry
from service.app import create_app
from tests import specs
from tests.gateway_support import assert_error, png_b64
from tests.tiny_zoo import write_diffusion_model
from workers.execute import prepare_denoise
from workers.model_pool import DiffusionModel, ModelPool


def test_the_public_names_are_the_librarys() -> None:
    assert params.SAMPLERS == SAMPLER_NAMES
    assert set(params.REPAINT_SAMPLERS) == set(SAMPLER_NAMES) - set(MULTISTEP_SAMPLERS)


def test_the_zoo_diffusion_models_offer_every_sampler() -> None:
    catalog = load_catalog(DEFAULT_ZOO)
    for name in ("digits-ddpm", "shapes-ldm"):
        assert tuple(catalog[name].samplers) == SAMPLER_NAMES


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    import fakeredis

    settings = Settings(
        zoo_dir=DEFAULT_ZOO, storage_dir=tmp_path, auth_enabled=False, signing_secret="x"
    )
    return TestClient(create_app(settings, fakeredis.FakeRedis()))


def test_generate_takes_a_few_step_solver_and_inpaint_refuses_jumps_it_cannot_do(
    client: TestClient,
) -> None:
    with client:
        answer = client.post(
            "/generate", json={"model": "digits-ddpm", "sampler": "dpmpp_2m", "class_label": 1}
        )
        assert answer.status_code == 202, answer.text
        assert answer.json()["input"]["sampler"] == "dpmpp_2m"
        image, mask = png_b64(16, 16), png_b64(16, 16, value=255)
        inpaint = {"model": "digits-ddpm", "image": image, "mask": mask, "sampler": "unipc"}
        refused = client.post("/inpaint", json={**inpaint, "jump_n_sample": 2})
        error = assert_error(refused, 422, "sampler_cannot_resample", "sampler")
        assert "ddpm, ddim, euler, euler_ancestral" in error["message"]
        assert client.post("/inpaint", json={**inpaint, "jump_n_sample": 1}).status_code == 202
        euler = client.post("/inpaint", json={**inpaint, "sampler": "euler", "jump_n_sample": 2})
        assert euler.status_code == 202, euler.text
        unknown = client.post("/generate", json={"model": "digits-ddpm", "sampler": "heun"})
        assert unknown.status_code == 422 and "dpmpp_2m" in unknown.text


def test_a_few_step_spec_runs_through_the_workers_path(tmp_path: Path) -> None:
    entry = write_diffusion_model(tmp_path, "tiny-ddpm")
    entry.samplers = list(SAMPLER_NAMES)
    write_entry(tmp_path / "tiny-ddpm", entry.model_dump(exclude={"path"}, exclude_none=True))
    pool = ModelPool(Settings(zoo_dir=tmp_path, device="cpu"))
    model = pool.get("tiny-ddpm")
    assert isinstance(model, DiffusionModel)
    outputs = {}
    for sampler in ("ddim", "dpmpp_2m", "unipc", "euler"):
        spec = parse_job_spec(specs.generate("tiny-ddpm", sampler=sampler, n=2, seed=5))
        work = prepare_denoise(spec, model, f"job-{sampler}")
        batch = model.new_batch()
        batch.add(work.samples)
        while len(batch):
            batch.step()
        x0 = torch.stack([s.x for s in work.samples])
        assert torch.isfinite(x0).all()
        outputs[sampler] = x0.numpy()
    assert not np.allclose(outputs["ddim"], outputs["dpmpp_2m"])  # a different solver ran
