"""Live x̂_0 previews in the engine (`output.preview_every`, `DenoiseLane._previews`): every k of a
job's steps its running samples' x̂_0 — the very tensor the step went through — decoded like a final
image (the first-stage decoder of a latent model) and shrunk to a small PNG; a job that did not ask
keeps no x̂_0 and gets none."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ddserve.job_events import PREVIEW_MAX_SIDE
from ddserve.spec import parse_job_spec
from tests import specs, test_engine
from tests.worker_doubles import MemoryFeed, MemoryStorage
from workers.engine import BatchingPolicy, Engine
from workers.execute import prepare_denoise, preview_png
from workers.model_pool import DiffusionModel, ModelPool

MODEL, LATENT = test_engine.MODEL, test_engine.LATENT
zoo, pool = test_engine.zoo, test_engine.pool  # the engine tests' tiny zoo, as fixtures here


def run(pool: ModelPool, model: str, *requests: dict[str, Any]) -> list[Any]:
    feed = MemoryFeed()
    tickets = [feed.submit(r) for r in requests]
    engine = Engine(
        pool,
        [model],
        feed,
        MemoryStorage(),
        BatchingPolicy(progress_every=3),
        clock=lambda: 0.0,
        sleep=lambda _s: None,
    )
    engine.run_until_idle(max_rounds=100)
    assert all(t.output is not None for t in tickets)
    return tickets


def pixels(png_b64: str) -> np.ndarray:
    picture = Image.open(io.BytesIO(base64.b64decode(png_b64)))
    assert picture.format == "PNG"
    return np.asarray(picture).astype(int)


def x0_alone(pool: ModelPool, request: dict[str, Any], step: int) -> list[torch.Tensor]:
    """x̂_0 of each image at `step`, sampling the request by itself."""
    model = pool.get(request["model"])
    assert isinstance(model, DiffusionModel)
    work = prepare_denoise(parse_job_spec(request), model, "alone")
    batch = model.new_batch()
    batch.add(work.samples)
    for _ in range(step):
        batch.step()
    return [s.x0 for s in work.samples]


def test_previews_every_k_steps_are_the_steps_x0(
    pool: ModelPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = pool.get(MODEL)
    decoded: list[torch.Tensor] = []  # what reached to_pixels: previews' x̂_0 and final x_0
    to_pixels = model.to_pixels

    def spy(x: torch.Tensor) -> torch.Tensor:
        decoded.append(x.clone())
        return to_pixels(x)

    monkeypatch.setattr(model, "to_pixels", spy)
    # unclipped: an untrained network's clipped x̂_0 is ±1 nearly everywhere at every step
    asked = specs.generate(MODEL, n=2, seed=5, clip_denoised=False, output={"preview_every": 2})
    other = specs.generate(MODEL, n=1, seed=9)  # shares every call, asked for nothing
    ticket, plain = run(pool, MODEL, asked, other)
    assert [step for step, _ in ticket.previews_log] == [2, 4, 6, 8]  # 10 steps: 10 = the end
    assert plain.previews_log == []
    previews_in = [x for x in decoded if x.shape[0] == 2]  # the final images go one call of 3
    assert len(previews_in) == 4
    for (step, previews), x0 in zip(ticket.previews_log, previews_in, strict=True):
        assert [p["index"] for p in previews] == [0, 1]
        assert all(pixels(p["png"]).shape == (8, 8) for p in previews)
        alone = torch.stack(x0_alone(pool, asked, step))
        error = (x0 - alone).abs().max().item()  # this step's x̂_0 (batch-invariant)...
        gap = (x0 - torch.stack(x0_alone(pool, asked, step - 1))).abs().max().item()
        assert error <= 1e-4 < gap, (error, gap)  # ...and not the previous step's


def test_latent_previews_are_decoded_by_the_first_stage(pool: ModelPool) -> None:
    request = specs.generate(LATENT, n=1, seed=2, output={"preview_every": 5})
    (ticket,) = run(pool, LATENT, request)
    assert [step for step, _ in ticket.previews_log] == [5]
    (preview,) = ticket.previews_log[0][1]
    assert pixels(preview["png"]).shape == (8, 8)  # the 8×8 image, not the 2×4×4 latent


def test_a_job_without_previews_keeps_no_x0(pool: ModelPool) -> None:
    model = pool.get(MODEL)
    assert isinstance(model, DiffusionModel)
    work = prepare_denoise(parse_job_spec(specs.generate(MODEL, n=2)), model, "j")
    batch = model.new_batch()
    batch.add(work.samples)
    batch.step()
    assert all(s.x0 is None for s in work.samples)


def test_preview_png_is_small() -> None:
    big = torch.rand(3, 256, 128) * 2 - 1
    picture = Image.open(io.BytesIO(base64.b64decode(preview_png(big))))
    assert picture.size == (PREVIEW_MAX_SIDE // 2, PREVIEW_MAX_SIDE)
    small = Image.open(io.BytesIO(base64.b64decode(preview_png(torch.zeros(1, 8, 8)))))
    assert small.size == (8, 8) and small.mode == "L"
