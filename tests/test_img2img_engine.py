"""Image-to-image jobs in the worker: continuously batched with generate jobs (a sample joins at
a later timestep of its own plan), latent models through their first stage, strength = 1 equal to
generate, and the errors only the worker can see failing only their own job."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ddserve.settings import Settings
from ddserve.spec import parse_job_spec
from tests import specs
from tests.test_engine import (
    LATENT,
    MODEL,
    Clock,
    alone,
    assert_equal_alone,
    generate,
    make_engine,
    x0,
)
from tests.test_engine import zoo as engine_zoo
from tests.worker_doubles import MemoryFeed, MemoryStorage
from workers import engine as engine_module
from workers.engine import BatchingPolicy, DenoiseLane, Engine
from workers.errors import InvalidJobRequest
from workers.execute import DenoiseWork, prepare_denoise
from workers.model_pool import DiffusionModel, ModelPool

zoo = engine_zoo  # the engine tests' tiny zoo (a pixel and a latent model), built once here too


@pytest.fixture(scope="module")
def pool(zoo: Path) -> ModelPool:
    torch.set_num_threads(1)
    return ModelPool(Settings(zoo_dir=zoo, device="cpu", onnx_providers="CPUExecutionProvider"))


def b64png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def digit(size: int = 8) -> np.ndarray:
    """A bright bar on black, [size, size] uint8."""
    image = np.zeros((size, size), dtype=np.uint8)
    image[1:-1, size // 2 - 1 : size // 2 + 1] = 255
    return image


def img2img(seed: int, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "num_inference_steps": 10,
        "class_label": seed % 10,
        "seed": seed,
        "output": {"trajectory": True},
    }
    fields = {**base, **fields}
    return specs.img2img(fields.pop("model", MODEL), b64png(fields.pop("image", digit())), **fields)


def test_img2img_jobs_join_a_running_generate_job_and_equal_alone(pool: ModelPool) -> None:
    """A 12-step generate job runs; after three rounds img2img jobs of several strengths,
    samplers and guidance arrive and join the same network calls at their own timesteps; every
    job's x_t and x_0 equal its run alone, and an img2img job takes ⌊steps·strength⌋ calls."""
    feed = MemoryFeed()
    first = feed.submit(generate(1, num_inference_steps=12))
    engine, works = make_engine(pool, feed, max_batch=16)
    for _ in range(3):
        engine.run_once()
    late = [
        feed.submit(img2img(2, strength=0.5)),
        feed.submit(img2img(3, strength=0.3, sampler="ddpm", n=2)),
        feed.submit(img2img(4, strength=0.8, guidance_scale=2.5)),
    ]
    engine.run_until_idle()
    assert [works[t.id].steps_per_image for t in late] == [5, 3, 8]
    assert engine.stats.rows_per_call[3] == 1 + 1 + 2 + 2  # the guided sample takes two rows
    assert engine.stats.network_calls == 3 + 9  # the first job's 12 steps: everyone joined them
    for ticket in (first, *late):
        assert ticket.ends == 1
        assert_equal_alone(pool, ticket, works[ticket.id])
    assert [image["seed"] for image in late[1].output["images"]] == [3, 4]


def test_strength_one_is_generate_with_the_same_seed(pool: ModelPool) -> None:
    same = {"class_label": 2, "num_inference_steps": 6}
    for sampler in ("ddim", "ddpm"):
        generated = alone(pool, generate(9, sampler=sampler, **same))
        edited = alone(pool, img2img(9, sampler=sampler, strength=1.0, **same))
        assert torch.equal(generated, edited)


def test_small_strength_keeps_the_pixel_image(pool: ModelPool) -> None:
    """One step from t = 0 (10 steps, strength 0.1): the input comes back but for the noise of
    ᾱ_0 = 1 − β_0 (σ = 0.01) and one step of an untrained network."""
    kept = alone(pool, img2img(5, strength=0.1))[0, 0]
    image = torch.from_numpy(digit()).float() / 127.5 - 1.0
    assert (kept - image).abs().mean().item() < 0.05
    changed = alone(pool, img2img(5, strength=0.9))[0, 0]
    assert (changed - image).abs().mean().item() > 0.2


def test_latent_img2img_starts_from_the_first_stage_latents(pool: ModelPool) -> None:
    """A latent model encodes the image (z = s·E(x)), noises z and denoises it; at a small
    strength the decoded result is near the first stage's own reconstruction; it batches with
    latent generate jobs and equals its run alone."""
    model = pool.get(LATENT)
    assert isinstance(model, DiffusionModel)
    image = digit()
    pixels = torch.from_numpy(image).float()[None, None] / 127.5 - 1.0  # [1, 1, 8, 8]
    z0 = model.from_pixels(pixels)  # [1, 2, 4, 4]
    assert z0.shape == (1, *model.sample_shape)
    encoded = model.first_stage.encode(pixels.numpy())["latents"]
    assert torch.allclose(z0, torch.from_numpy(encoded) * model.latent_scale)

    feed = MemoryFeed()
    kept = feed.submit(img2img(1, model=LATENT, strength=0.1, output={"trajectory": False}))
    other = feed.submit(generate(2, model=LATENT, num_inference_steps=4))
    engine, works = make_engine(pool, feed, models=(LATENT,))
    engine.run_until_idle()
    for ticket in (kept, other):
        assert_equal_alone(pool, ticket, works[ticket.id])
    reconstruction = model.to_pixels(z0)
    result = model.to_pixels(x0(works[kept.id]))
    assert (result - reconstruction).abs().mean().item() < 0.05


def test_an_image_the_model_cannot_take_fails_only_its_job(pool: ModelPool) -> None:
    """The gateway checks sizes; a spec enqueued by other means is refused by the worker."""
    model = pool.get(MODEL)
    assert isinstance(model, DiffusionModel)
    wrong = parse_job_spec(img2img(1, image=digit(6)))
    with pytest.raises(InvalidJobRequest, match=r"cannot make 6×6 images \(8×8 only\)"):
        prepare_denoise(wrong, model, "j")
    too_weak = parse_job_spec(img2img(1, strength=0.05))  # ⌊10 · 0.05⌋ = 0 steps
    with pytest.raises(InvalidJobRequest, match="takes no denoising step"):
        prepare_denoise(too_weak, model, "j")
    feed = MemoryFeed()
    bad = feed.submit(img2img(1, image=digit(6)))
    good = feed.submit(img2img(2))
    engine, works = make_engine(pool, feed)
    engine.run_until_idle()
    assert bad.error is not None and bad.output is None
    assert_equal_alone(pool, good, works[good.id])


def test_the_prepare_thread_encodes_a_latent_image_and_leaves_a_pixel_one_inline(
    pool: ModelPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Continuous batching with the prepare thread: a latent model's img2img image goes through
    its first stage (ONNX Runtime here) on the thread, while a pixel model's job, with no first
    stage, is prepared at once; both give the x_0 of the engine without the thread, bit for bit."""
    works: dict[str, DenoiseWork] = {}

    def spy(spec: Any, model: DiffusionModel, job_id: str, *rest: Any) -> DenoiseWork:
        works[job_id] = prepare_denoise(spec, model, job_id, *rest)
        return works[job_id]

    monkeypatch.setattr(engine_module, "prepare_denoise", spy)
    results: dict[bool, list[torch.Tensor]] = {}
    for prepare_thread in (False, True):
        feed = MemoryFeed()
        latent = feed.submit(img2img(1, model=LATENT, output={"trajectory": False}))
        pixel = feed.submit(img2img(2))
        engine = Engine(
            pool,
            [MODEL, LATENT],
            feed,
            MemoryStorage(),
            BatchingPolicy(max_batch=16),
            clock=Clock(),
            sleep=lambda _s: None,
            prepare_thread=prepare_thread,
        )
        lanes = engine.lanes[LATENT], engine.lanes[MODEL]
        assert isinstance(lanes[0], DenoiseLane) and isinstance(lanes[1], DenoiseLane)
        try:
            engine.run_once()
            assert (latent.key in lanes[0].preparing) is prepare_thread
            assert not lanes[1].preparing and pixel.key in lanes[1].jobs
            engine.run_until_idle()
        finally:
            engine.close()
        assert latent.output is not None and pixel.output is not None
        results[prepare_thread] = [x0(works[t.id]) for t in (latent, pixel)]
    for threaded, inline in zip(results[True], results[False], strict=True):
        assert torch.equal(threaded, inline)
