"""Per-request image sizes (#19 item 5): `height` / `width` on `/generate` (and the OpenAI `size`)
for models whose network takes other sizes (imported diffusers pipelines, `size_multiple`).

- the gateway: the multiple comes from the pipeline's JSON files (first-stage factor × 2^(down
  blocks − 1)); a side that is no multiple, over `DDSERVE_MAX_IMAGE_SIDE` or over the pixel limit,
  or another size for a zoo model, is a clear 422;
- the engine: a model's jobs at another size run in a running set of their own (one per size in
  flight, fed from the model's one queue, dropped when idle), each giving the images it gives alone;
  previews, cancel, deadlines and out-of-memory splitting work in those sets too;
- parity: an image at size S is what diffusers' pipeline makes at S from the same x_T (≤ 1e-4);
- the first stage decodes any size, also in ONNX Runtime (graphs with dynamic H and W;
  `tests/test_diffusers_onnx.py`, beside the export it needs).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ddserve.requests import (
    DecodeBody,
    EncodeBody,
    GenerateBody,
    Img2ImgBody,
    InpaintBody,
    ReconstructBody,
)
from ddserve.settings import Settings
from models.catalog import load_catalog
from models.diffusers_format.entries import down_factor, unet_down_factor
from models.diffusion.noise import sample_generator
from models.diffusion.sampler import Sample
from service.errors import ApiError
from service.normalize import RequestNormalizer
from service.openai_schemas import ImageGenerationBody, check_size, generate_body
from service.uploads import UploadLimits
from tests import specs
from tests.test_engine import png_pixels
from tests.worker_doubles import MemoryFeed, MemoryStorage, MemoryTicket
from workers import engine as engine_module
from workers.engine import BatchingPolicy, DenoiseLane, Engine
from workers.errors import InvalidJobRequest, JobDeadlineExceeded
from workers.execute import DenoiseWork, prepare_denoise, run_alone, run_codec
from workers.memory_budget import row_limit_at
from workers.model_pool import CodecModel, DiffusionModel, ModelPool

diffusers = pytest.importorskip("diffusers")

TOLERANCE = 1e-4
LIMITS = UploadLimits(1 << 20, 1 << 20)


# --- the gateway (torch-free) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def catalog(pipelines_dir: Path) -> dict[str, Any]:
    return {**load_catalog(), **load_catalog(pipelines_dir)}  # the zoo and the tiny pipelines


def normalizer(catalog: dict[str, Any], **kw: Any) -> RequestNormalizer:
    served = {name for name, entry in catalog.items() if entry.tasks}
    return RequestNormalizer(catalog, served, kw.pop("limits", LIMITS), **kw)


def zoo_model_of(catalog: dict[str, Any]) -> str:
    """A zoo diffusion model (a ddserve card: one size)."""
    return next(
        n
        for n, e in catalog.items()
        if e.format == "ddserve" and "generate" in e.tasks and e.schedule
    )


def rejected(normalizer: RequestNormalizer, **body: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        normalizer.generate(GenerateBody.model_validate(body))
    assert caught.value.status == 422
    return caught.value


def test_the_size_multiple_is_the_first_stage_factor_times_the_unet_s(
    catalog: dict[str, Any],
) -> None:
    # Stable Diffusion 1.x's configs: 4 down blocks, a VAE of 4 levels (f = 8): 8 · 2³ = 64.
    sd_unet = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}
    sd_vae = {"block_out_channels": [128, 256, 512, 512]}
    assert down_factor(sd_vae) * unet_down_factor(sd_unet) == 64
    # The tiny pipelines: 2 down blocks (2), and f = 2 for the latent one (4).
    assert catalog["ddim"].size_multiple == 2 and catalog["ldm"].size_multiple == 4
    assert catalog["ldm-vqvae"].size_multiple == 2  # its routes: the first stage's factor alone
    zoo = [e for e in load_catalog().values()]
    assert zoo and all(e.size_multiple is None for e in zoo)
    assert catalog["ldm"].public()["size_multiple"] == 4  # GET /models shows it


def test_generate_takes_a_size_and_defaults_to_the_model_s(catalog: dict[str, Any]) -> None:
    gate = normalizer(catalog)
    spec = gate.generate(GenerateBody(model="ldm", height=24, width=32, seed=1))
    assert (spec.height, spec.width) == (24, 32)
    spec = gate.generate(GenerateBody(model="ldm", seed=1))
    assert (spec.height, spec.width) == (16, 16)
    spec = gate.generate(GenerateBody(model="ddim", height=6, seed=1))  # one side: the other own
    assert (spec.height, spec.width) == (6, 16)
    spec = gate.generate(GenerateBody(model="ddim", height=2, width=2, seed=1))  # one multiple
    assert (spec.height, spec.width) == (2, 2)


def test_sizes_that_cannot_run_are_clear_422s(catalog: dict[str, Any]) -> None:
    gate = normalizer(catalog, max_image_side=32)
    error = rejected(gate, model="ldm", height=18, width=16)
    assert error.code == "image_size_not_multiple" and error.param == "height"
    assert "multiple of 4" in error.message and "16 or 20" in error.message
    error = rejected(gate, model="ddim", width=15)
    assert error.code == "image_size_not_multiple" and error.param == "width"
    error = rejected(gate, model="ldm", height=16, width=36)
    assert error.code == "image_size_too_large" and error.param == "width"
    assert "32" in error.message and "DDSERVE_MAX_IMAGE_SIDE" in error.message
    tiny_limits = UploadLimits(1 << 20, 16 * 24 - 1)
    error = rejected(normalizer(catalog, limits=tiny_limits), model="ddim", height=24, width=16)
    assert error.code == "image_size_too_large" and "DDSERVE_MAX_IMAGE_PIXELS" in error.message
    # The model's own size is allowed even over the side limit.
    assert normalizer(catalog, max_image_side=8).generate(GenerateBody(model="ddim")).height == 16
    zoo_model = zoo_model_of(catalog)
    own = catalog[zoo_model].image
    error = rejected(gate, model=zoo_model, height=own.height * 2)
    assert error.code == "fixed_image_size" and f"{own.width}×{own.height}" in error.message
    with pytest.raises(ValueError):  # the parameter's own bound, before any model is read
        GenerateBody(model="ddim", height=0)


def test_the_openai_size_maps_onto_height_and_width(catalog: dict[str, Any]) -> None:
    body = generate_body(ImageGenerationBody(prompt="", size="24x8"), catalog["ldm"], False)
    assert (body["height"], body["width"]) == (8, 24)
    gate = normalizer(catalog)
    spec = gate.generate(GenerateBody.model_validate(body))
    assert (spec.height, spec.width) == (8, 24)
    auto = generate_body(ImageGenerationBody(prompt="", size="auto"), catalog["ldm"], False)
    assert "height" not in auto and "width" not in auto
    bad = generate_body(ImageGenerationBody(prompt="", size="18x16"), catalog["ldm"], False)
    error = rejected(gate, **bad)
    assert error.code == "image_size_not_multiple" and error.param == "width"
    check_size("8x24", catalog["ldm"], (8, 24))  # an edit: its image's size (width, height)
    with pytest.raises(ApiError) as edit:
        check_size("16x16", catalog["ldm"], (8, 24))
    assert edit.value.code == "unsupported_size" and "8x24" in edit.value.message
    zoo_model = zoo_model_of(catalog)
    with pytest.raises(ApiError) as fixed:
        generate_body(ImageGenerationBody(prompt="", size="1024x1024"), catalog[zoo_model], False)
    assert fixed.value.code == "unsupported_size" and fixed.value.status == 400


def png(height: int, width: int, mode: str = "RGB", seed: int = 0) -> str:
    """A random base64 PNG of height × width."""
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
    picture = Image.fromarray(pixels[..., 0] if bands == 1 else pixels, mode)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def size_of(data: str) -> tuple[int, int]:
    """(height, width) of a base64 PNG."""
    picture = Image.open(io.BytesIO(base64.b64decode(data)))
    return picture.height, picture.width


def keep_top(height: int, width: int) -> str:
    """A mask keeping the top half (white) and generating the bottom (black)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[: height // 2] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask, "L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_inpaint_and_img2img_take_their_image_s_size(catalog: dict[str, Any]) -> None:
    gate = normalizer(catalog, max_image_side=32)
    spec = gate.img2img(Img2ImgBody(model="ldm", image=png(24, 8), seed=1))
    assert size_of(spec.image) == (24, 8)
    body = InpaintBody(model="ddim", image=png(24, 16), mask=keep_top(24, 16), seed=1)
    spec = gate.inpaint(body)
    assert size_of(spec.image) == size_of(spec.mask) == (24, 16)
    with pytest.raises(ApiError) as caught:
        gate.img2img(Img2ImgBody(model="ldm", image=png(18, 16), seed=1))
    error = caught.value
    assert (error.status, error.code, error.param) == (422, "image_size_not_multiple", "image")
    assert error.message.startswith("image is 16×18: height 18 is not a multiple of 4")
    with pytest.raises(ApiError) as caught:
        gate.img2img(Img2ImgBody(model="ldm", image=png(16, 40), seed=1))
    assert (caught.value.code, caught.value.param) == ("image_size_too_large", "image")
    with pytest.raises(ApiError) as caught:
        gate.inpaint(InpaintBody(model="ddim", image=png(24, 16), mask=keep_top(16, 16)))
    assert (caught.value.code, caught.value.param) == ("wrong_image_size", "mask")
    zoo = catalog[zoo_model_of(catalog)]
    with pytest.raises(ApiError) as caught:  # a zoo model: its own size only, as before
        gate.img2img(Img2ImgBody(model=zoo.name, image=png(zoo.image.height * 2, 8, "L")))
    assert (caught.value.code, caught.value.param) == ("wrong_image_size", "image")


def test_first_stage_routes_take_per_request_sizes(catalog: dict[str, Any]) -> None:
    """/encode and /reconstruct take their images' size, /decode its latents' grid, for an
    imported first stage (size_multiple = its factor f = 2, not the UNet's 4); zoo autoencoders
    keep their one size."""
    gate = normalizer(catalog, max_image_side=32)
    spec = gate.encode(EncodeBody(model="ldm-vqvae", images=[png(6, 10), png(6, 10, seed=1)]))
    assert [size_of(image) for image in spec.images] == [(6, 10)] * 2  # 2 divides, 4 does not
    spec = gate.reconstruct(ReconstructBody(model="ldm-vqvae", images=[png(24, 12)]))
    assert size_of(spec.images[0]) == (24, 12)
    latents = np.zeros((1, 4, 3, 5)).tolist()
    assert gate.decode(DecodeBody(model="ldm-vqvae", latents=latents)).latents == latents
    codes = np.zeros((2, 3, 5), int).tolist()
    assert gate.decode(DecodeBody(model="ldm-vqvae", codes=codes)).codes == codes
    assert gate.decode(DecodeBody(model="ldm-vqvae", latents=codes)).codes == codes  # by rank

    def refused(route: str, **body: Any) -> ApiError:
        bodies = {"encode": EncodeBody, "reconstruct": ReconstructBody, "decode": DecodeBody}
        with pytest.raises(ApiError) as caught:
            getattr(gate, route)(bodies[route](**body))
        assert caught.value.status == 422
        return caught.value

    error = refused("encode", model="ldm-vqvae", images=[png(7, 10)])
    assert (error.code, error.param) == ("image_size_not_multiple", "images[0]")
    assert error.message.startswith("images[0] is 10×7: height 7 is not a multiple of 2")
    assert "the autoencoder divides the sides by it" in error.message
    error = refused("reconstruct", model="ldm-vqvae", images=[png(16, 16), png(8, 16)])
    assert (error.code, error.param) == ("wrong_image_size", "images[1]")
    assert "share one size" in error.message
    error = refused("encode", model="ldm-vqvae", images=[png(16, 34)])
    assert (error.code, error.param) == ("image_size_too_large", "images[0]")
    error = refused("decode", model="ldm-vqvae", latents=np.zeros((1, 4, 4, 17)).tolist())
    assert (error.code, error.param) == ("image_size_too_large", "latents")
    assert error.message.startswith("latents of 4×17 positions decode to 34×8 images: width 34")
    error = refused("decode", model="ldm-vqvae", latents=np.zeros((1, 3, 4, 4)).tolist())
    assert (error.code, error.param) == ("wrong_latent_shape", "latents")
    assert "[n, 4, h, w]" in error.message
    error = refused("decode", model="ldm-vqvae", codes=np.zeros((1, 4, 0), int).tolist())
    assert (error.code, error.param) == ("wrong_code_shape", "codes")
    zoo = next(e for e in catalog.values() if e.format == "ddserve" and "encode" in e.tasks)
    assert zoo.size_multiple is None
    error = refused("encode", model=zoo.name, images=[png(zoo.image.height * 2, 8, "L")])
    assert (error.code, error.param) == ("wrong_image_size", "images[0]")  # one size, as before
    shape = [1, *(zoo.latent_shape or [])]
    shape[-1] += 1
    error = refused("decode", model=zoo.name, latents=np.zeros(shape).tolist())
    assert (error.code, error.param) == ("wrong_latent_shape", "latents")


# --- the engine ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool(pipelines_dir: Path) -> ModelPool:
    torch.set_num_threads(1)
    return ModelPool(Settings(model_dirs=str(pipelines_dir), device="cpu"))


@pytest.fixture
def works(monkeypatch: pytest.MonkeyPatch) -> dict[str, DenoiseWork]:
    """Each job's samples as the engine prepared them, by job id (whatever lane took it)."""
    seen: dict[str, DenoiseWork] = {}

    def spy(spec: Any, model: DiffusionModel, job_id: str, *rest: Any) -> DenoiseWork:
        seen[job_id] = prepare_denoise(spec, model, job_id, *rest)
        return seen[job_id]

    monkeypatch.setattr(engine_module, "prepare_denoise", spy)
    return seen


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_engine(pool: ModelPool, feed: MemoryFeed, clock: Clock | None = None, **kw: Any) -> Engine:
    return Engine(
        pool,
        ["ddim", "ldm"],
        feed,
        MemoryStorage(),
        BatchingPolicy(max_batch=64),
        clock=clock or Clock(),
        sleep=lambda _s: None,
        **kw,
    )


def alone(pool: ModelPool, request: dict[str, Any]) -> torch.Tensor:
    """x_0 of a request's images, run by themselves (`run_alone`'s running set)."""
    spec = MemoryTicket("alone", request).spec
    model = pool.get(spec.model)
    assert isinstance(model, DiffusionModel)
    work = prepare_denoise(spec, model, "alone")
    batch = model.new_batch(work.sample_shape)
    batch.add(work.samples)
    while len(batch):
        batch.step()
    return torch.stack([s.x for s in work.samples])


def job(model: str, seed: int, size: tuple[int, int] | None = None, **fields: Any) -> dict:
    sized = {} if size is None else {"height": size[0], "width": size[1]}
    return specs.generate(model, seed=seed, num_inference_steps=4, **sized, **fields)


def test_two_sizes_of_a_model_run_side_by_side_each_as_alone(
    pool: ModelPool, works: dict[str, DenoiseWork]
) -> None:
    feed = MemoryFeed()
    requests = [
        job("ddim", 1, n=2),  # the model's own 16×16
        job("ddim", 2, (24, 16), n=2),
        job("ddim", 3, (16, 24)),
        job("ddim", 4, (24, 16), sampler="ddpm"),  # shares the 24×16 running set
        job("ldm", 5, (24, 8)),  # latents 4×12×4
        job("ldm", 6),
    ]
    tickets = [feed.submit(r) for r in requests]
    engine = make_engine(pool, feed, store_threads=2)
    engine.run_once()
    assert set(engine.sized_lanes) == {("ddim", (24, 16)), ("ddim", (16, 24)), ("ldm", (24, 8))}
    lane = engine.sized_lanes[("ddim", (24, 16))]
    assert lane.batch.sample_shape == (3, 24, 16) and len(lane.batch) == 3
    assert engine.sized_lanes[("ldm", (24, 8))].batch.sample_shape == (4, 12, 4)
    engine.run_until_idle()
    engine.close()
    assert not engine.sized_lanes  # dropped once idle
    # Five running sets of 4 steps each: the two 24×16 jobs shared their calls.
    assert engine.stats.network_calls == 5 * 4
    for ticket, request in zip(tickets, requests, strict=True):
        assert ticket.ends == 1 and ticket.output is not None, ticket.error
        height, width = request.get("height") or 16, request.get("width") or 16
        for record in ticket.output["images"]:
            assert (record["height"], record["width"]) == (height, width)
            png = Image.open(io.BytesIO(engine.storage.get(record["key"])))
            assert png.size == (width, height)
        got = torch.stack([s.x for s in works[ticket.id].samples])
        diff = (got - alone(pool, request)).abs().max().item()
        assert diff <= TOLERANCE, f"{ticket.id}: batched differs from alone by {diff}"


def test_previews_cancel_and_deadlines_in_a_lane_of_another_size(
    pool: ModelPool, works: dict[str, DenoiseWork]
) -> None:
    feed, clock = MemoryFeed(), Clock()
    size = (24, 16)
    preview = feed.submit(job("ddim", 1, size, output={"preview_every": 2}))
    canceled = feed.submit(job("ddim", 2, size))
    late = feed.submit(job("ddim", 3, size), deadline=0.5)
    own = feed.submit(job("ddim", 4))
    engine = make_engine(pool, feed, clock)
    engine.run_once()
    feed.cancel_set.add(canceled.id)
    clock.now = 1.0
    engine.run_until_idle()
    assert canceled.canceled and canceled.ends == 1
    assert isinstance(late.error, JobDeadlineExceeded) and late.ends == 1
    assert preview.output is not None and own.output is not None
    assert preview.previews_log, "no preview came"
    for _step, images in preview.previews_log:
        picture = Image.open(io.BytesIO(base64.b64decode(images[0]["png"])))
        assert picture.size == (size[1], size[0])  # W × H of the job's own size
    assert engine.stats.jobs_canceled == 1 and engine.stats.jobs_failed == 1
    assert not engine.sized_lanes


def test_out_of_memory_in_one_size_splits_that_size_only(
    pool: ModelPool, works: dict[str, DenoiseWork]
) -> None:
    """A 24×16 call of more than one row runs out of memory: it is split, its lane's row limit
    goes down, nobody fails, and the model's own size keeps its calls whole."""
    model = pool.get("ddim")
    assert isinstance(model, DiffusionModel)
    real = model.denoiser

    def tight(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (24, 16) and x.shape[0] > 1:
            raise MemoryError("out of memory (test)")
        return real(x, t, cond)

    feed = MemoryFeed()
    requests = [job("ddim", 1, (24, 16), n=3), job("ddim", 2, n=3)]
    tickets = [feed.submit(r) for r in requests]
    model.denoiser = tight  # type: ignore[assignment]
    try:
        engine = make_engine(pool, feed)
        engine.run_once()
        own = engine.lanes["ddim"]
        assert isinstance(own, DenoiseLane)
        engine.run_until_idle()
    finally:
        model.denoiser = real
    assert all(t.output is not None for t in tickets), [t.error for t in tickets]
    assert engine.stats.row_limit_lowered == 1 and own.row_limit is None
    assert 3 in engine.stats.rows_per_call  # the own size's calls stayed whole
    for ticket, request in zip(tickets, requests, strict=True):
        got = torch.stack([s.x for s in works[ticket.id].samples])
        assert (got - alone(pool, request)).abs().max().item() <= TOLERANCE


def test_a_full_lane_of_another_size_stops_the_queue_reading(pool: ModelPool) -> None:
    """As a lane reads its queue only while its running set has room its waiting jobs cannot use,
    the model's queue is not read past a job waiting in another size's lane: a worker does not
    hoard jobs it cannot run yet (others may take them)."""
    feed = MemoryFeed()
    full = feed.submit(job("ddim", 1, (24, 16), n=4))  # the 4 rows of a call
    blocked = feed.submit(job("ddim", 2, (24, 16)))
    later = [feed.submit(job("ddim", 3, (24, 16))), feed.submit(job("ddim", 4))]
    engine = Engine(
        pool,
        ["ddim"],
        feed,
        MemoryStorage(),
        BatchingPolicy(max_batch=4),
        clock=Clock(),
        sleep=lambda _s: None,
    )
    for _ in range(3):  # rounds while the 24×16 call is full: nothing more is taken
        engine.admit()
        assert feed.taken == [full.id, blocked.id] and len(feed.queues["ddim"]) == 2
        assert engine.sized_lanes[("ddim", (24, 16))].waiting
        engine.step()
    engine.run_until_idle()
    assert all(t.output is not None for t in (full, blocked, *later))
    assert feed.taken == [full.id, blocked.id, *(t.id for t in later)]


def test_a_size_the_model_cannot_make_fails_that_job_alone(pool: ModelPool) -> None:
    feed = MemoryFeed()
    bad = feed.submit(job("ddim", 1, (17, 16)))  # a spec from elsewhere: no multiple of 2
    good = feed.submit(job("ddim", 2))
    engine = make_engine(pool, feed)
    engine.run_until_idle()
    assert isinstance(bad.error, InvalidJobRequest) and "multiples of 2" in str(bad.error)
    assert good.output is not None and not engine.sized_lanes


def test_inpaint_and_img2img_run_at_their_image_s_size(
    pool: ModelPool, works: dict[str, DenoiseWork]
) -> None:
    """An img2img of a latent model and an inpaint of a pixel model at other sizes than the
    models' own: each in the lane of its size, as alone; the inpaint keeps its known pixels."""
    feed = MemoryFeed()
    common = {"num_inference_steps": 4, "seed": 3}
    requests = [
        specs.img2img("ldm", png(24, 8), **common),
        specs.img2img("ldm", png(16, 16), **common),  # the model's own size
        specs.inpaint("ddim", png(24, 16, seed=1), keep_top(24, 16), **common),
        specs.generate("ddim", height=24, width=16, **common),  # shares the inpaint's set
    ]
    tickets = [feed.submit(r) for r in requests]
    engine = make_engine(pool, feed)
    engine.run_once()
    assert set(engine.sized_lanes) == {("ldm", (24, 8)), ("ddim", (24, 16))}
    assert len(engine.sized_lanes[("ddim", (24, 16))].batch) == 2
    engine.run_until_idle()
    sizes = [(24, 8), (16, 16), (24, 16), (24, 16)]
    for ticket, request, size in zip(tickets, requests, sizes, strict=True):
        assert ticket.output is not None, ticket.error
        (record,) = ticket.output["images"]
        assert (record["height"], record["width"]) == size
        got = torch.stack([s.x for s in works[ticket.id].samples])
        assert (got - alone(pool, request)).abs().max().item() <= TOLERANCE
    (painted,) = works[tickets[2].id].samples
    assert painted.known is not None and painted.known.shape == (3, 24, 16)
    torch.testing.assert_close(painted.x[:, :12], painted.known[:, :12], atol=1e-6, rtol=0)


def test_the_row_limit_scales_with_the_area() -> None:
    assert row_limit_at(None, (16, 16), (32, 32), 64) is None  # the CPU: not measured
    assert row_limit_at(40, (16, 16), (32, 32), 64) == 10
    assert row_limit_at(40, (16, 16), (8, 8), 64) == 64  # never over max_batch
    assert row_limit_at(3, (16, 16), (64, 64), 64) == 1  # at least one row


def test_codec_jobs_of_several_sizes_share_calls_by_size_each_as_alone(pool: ModelPool) -> None:
    """A first stage's round of encode / decode / reconstruct jobs at three sizes: one network call
    per method and row shape (same-shaped rows share one), each job's output what it is alone."""
    model = pool.get("ldm-vqvae")
    assert isinstance(model, CodecModel) and model.codec.resizable
    sizes = [(24, 12), (16, 16), (24, 12), (32, 24)]  # 8 jobs in all: one round
    requests = [
        specs.codec("encode", "ldm-vqvae", images=[png(h, w, seed=i)] * (1 + i % 2))
        for i, (h, w) in enumerate(sizes)
    ]
    grids = [(12, 6), (8, 8), (12, 6)]
    latents = [
        np.random.default_rng(i).normal(0, 1, (1, 4, *g)).tolist() for i, g in enumerate(grids)
    ]
    requests += [specs.codec("decode", "ldm-vqvae", latents=z) for z in latents]
    requests += [specs.codec("reconstruct", "ldm-vqvae", images=[png(8, 20, seed=9)])]
    calls: list[tuple[str, tuple[int, ...]]] = []
    originals = {name: getattr(model.codec, name) for name in ("encode", "decode")}

    def counted(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            rows = next(iter([*args, *kwargs.values()]))
            calls.append((name, tuple(np.shape(rows))))
            return originals[name](*args, **kwargs)

        return call

    feed = MemoryFeed()
    tickets = [feed.submit(r) for r in requests]
    engine = Engine(
        pool,
        ["ldm-vqvae"],
        feed,
        MemoryStorage(),
        BatchingPolicy(),
        clock=Clock(),
        sleep=lambda _s: None,
    )
    for name in originals:
        setattr(model.codec, name, counted(name))
    try:
        engine.run_until_idle()
    finally:
        for name, method in originals.items():
            setattr(model.codec, name, method)
    assert sorted(calls) == sorted(
        [
            ("encode", (2, 3, 24, 12)),  # jobs 0 and 2, one image each
            ("encode", (2, 3, 16, 16)),
            ("encode", (2, 3, 32, 24)),
            ("decode", (2, 4, 12, 6)),
            ("decode", (1, 4, 8, 8)),
            ("encode", (1, 3, 8, 20)),  # the reconstruct job: encode, then decode its codes
            ("decode", (1, 4, 10)),
        ]
    )
    storage = MemoryStorage()
    for i, ticket in enumerate(tickets):
        assert ticket.ends == 1 and ticket.output is not None, ticket.error
        reference = run_codec(ticket.spec, model, f"alone-{i}", storage)
        if ticket.request["kind"] == "encode":
            height, width = sizes[i]
            assert np.asarray(ticket.output["latents"]).shape[-2:] == (height // 2, width // 2)
            assert np.abs(np.subtract(ticket.output["latents"], reference["latents"])).max() <= 1e-5
            assert ticket.output["codes"] == reference["codes"]
        else:
            got = [png_pixels(engine.storage, im["key"]) for im in ticket.output["images"]]
            want = [png_pixels(storage, im["key"]) for im in reference["images"]]
            assert [a.shape for a in got] == [b.shape for b in want]
            assert all(np.abs(a - b).max() <= 1 for a, b in zip(got, want, strict=True))


def test_a_codec_job_of_a_size_the_first_stage_cannot_take_fails_alone(pool: ModelPool) -> None:
    """A spec the gateway did not check (an odd side; images of two sizes in one job) fails its
    own job with the reason; the round's other jobs succeed."""
    feed = MemoryFeed()
    good = feed.submit(specs.codec("encode", "ldm-vqvae", images=[png(24, 12)]))
    odd = feed.submit(specs.codec("encode", "ldm-vqvae", images=[png(15, 12)]))
    mixed = feed.submit(specs.codec("reconstruct", "ldm-vqvae", images=[png(8, 8), png(8, 12)]))
    engine = Engine(
        pool,
        ["ldm-vqvae"],
        feed,
        MemoryStorage(),
        BatchingPolicy(),
        clock=Clock(),
        sleep=lambda _s: None,
    )
    engine.run_until_idle()
    assert good.ends == 1 and good.output is not None
    assert isinstance(odd.error, InvalidJobRequest) and "multiples of 2" in str(odd.error)
    assert isinstance(mixed.error, InvalidJobRequest) and "images[1]" in str(mixed.error)


def test_run_alone_makes_the_spec_s_size(pool: ModelPool) -> None:
    storage = MemoryStorage()
    spec = MemoryTicket("j", job("ldm", 7, (8, 24))).spec
    output = run_alone(spec, pool, storage, "j")
    assert [(r["height"], r["width"]) for r in output["images"]] == [(8, 24)]


# --- parity with diffusers at another size --------------------------------------------------------
def sized_pipeline(cls: Any, folder: Path, size: int | tuple[int, int]) -> Any:
    """A saved pixel/LDM pipeline whose UNet config asks for `size` (those pipelines read the size
    of x_T from `unet.config.sample_size`; they have no height/width arguments)."""
    pipe = cls.from_pretrained(folder)
    pipe.unet.register_to_config(sample_size=size)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ddserve_image(model: DiffusionModel, settings: Any, size: tuple[int, int]) -> np.ndarray:
    """One image at `size` from the model's running set of that size, [1, H, W, C] in [0, 1]."""
    batch = model.new_batch(model.sample_shape_at(*size))
    sample = Sample(settings=settings, generator=sample_generator(3, 0))
    batch.add([sample])
    while len(batch):
        batch.step()
    pixels = model.to_pixels(sample.x[None])  # [1, C, H, W] in [−1, 1]
    return (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_a_pixel_pipeline_at_another_size_matches_diffusers(
    pool: ModelPool, pipelines_dir: Path, eta: float
) -> None:
    pipe = sized_pipeline(diffusers.DDIMPipeline, pipelines_dir / "ddim", (24, 12))
    expected = pipe(
        generator=sample_generator(3, 0), num_inference_steps=5, eta=eta, output_type="np"
    ).images
    assert expected.shape == (1, 24, 12, 3)
    model = pool.get("ddim")
    got = ddserve_image(model, model.scheduler.settings("ddim", 5, eta=eta), (24, 12))
    assert np.abs(got - expected).max() <= TOLERANCE


def test_a_latent_pipeline_at_another_size_matches_diffusers(
    pool: ModelPool, pipelines_dir: Path
) -> None:
    """LDMPipeline (square latents only: it reads one `sample_size`) at 24×24 pixels, 12×12
    latents, decoded by its VQModel at that size."""
    pipe = sized_pipeline(diffusers.LDMPipeline, pipelines_dir / "ldm", 12)
    expected = pipe(generator=sample_generator(3, 0), num_inference_steps=6, output_type="np")
    assert expected.images.shape == (1, 24, 24, 3)
    model = pool.get("ldm")
    got = ddserve_image(model, model.scheduler.settings("ddim", 6), (24, 24))
    assert np.abs(got - expected.images).max() <= TOLERANCE


def test_a_text_pipeline_at_another_size_matches_diffusers(tmp_path: Path) -> None:
    """StableDiffusionPipeline's own height/width (24×32 pixels, 12×16 latents) from the same x_T,
    through the worker's model (its UNet, prompt encoder and first stage)."""
    pytest.importorskip("transformers")
    from ddserve.params import guidance_weight
    from tests.tiny_sd import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path)
    pool = ModelPool(Settings(model_dirs=str(tmp_path), device="cpu"))
    model = pool.get("pipeline")
    assert isinstance(model, DiffusionModel) and model.prompt_encoder is not None
    assert model.entry.size_multiple == 4
    shape = model.sample_shape_at(24, 32)
    assert shape == (4, 12, 16)
    x_T = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    settings = model.scheduler.settings(None, 6, guidance_scale=guidance_weight(7.5))
    (cond,) = model.prompt_encoder.rows(["a red circle"])
    batch = model.new_batch(shape)
    sample = Sample(settings, sample_generator(0, 0), cond=cond, x=x_T[0].clone())
    batch.add([sample])
    while len(batch):
        batch.step()
    got = (model.to_pixels(sample.x[None]) / 2 + 0.5).clamp(0, 1)  # [1, 3, 24, 32]
    expected = pipe(
        prompt=["a red circle"],
        height=24,
        width=32,
        num_inference_steps=6,
        guidance_scale=7.5,
        latents=x_T.clone(),
        output_type="pt",
    ).images
    assert expected.shape == got.shape == (1, 3, 24, 32)
    assert (got - expected).abs().max().item() <= TOLERANCE
