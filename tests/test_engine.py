"""The continuous-batching engine, round by round, on tiny random models (no Redis).

A job's images must equal (≤ 1e-4) what the same request yields alone, whatever shared its network
calls; admission, fairness, share cap, cancellation and deadlines are checked on the calls' rows."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ddserve.settings import Settings
from ddserve.spec import parse_job_spec
from models.diffusion.sampler import DenoisingBatch
from tests import specs
from tests.tiny_zoo import write_diffusion_model, write_noisy_classifier, write_onnx_autoencoder
from tests.worker_doubles import MemoryFeed, MemoryStorage, MemoryTicket
from workers.engine import BatchingPolicy, DenoiseLane, Engine
from workers.errors import InvalidJobRequest, JobDeadlineExceeded
from workers.execute import DenoiseWork, prepare_denoise
from workers.model_pool import DiffusionModel, ModelPool

MODEL = "tiny-ddpm"
LATENT = "tiny-ldm"
TOL = 1e-4


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    write_noisy_classifier(root, "tiny-noisy-classifier")
    write_diffusion_model(root, MODEL, classifier="tiny-noisy-classifier")
    write_onnx_autoencoder(root, "tiny-kl")
    write_diffusion_model(
        root,
        LATENT,
        kind="latent-diffusion",
        seed=1,
        image_size=4,
        channels=2,
        first_stage="tiny-kl",
        latent_scale=0.5,
        pixel_image=(1, 8, 8),
    )
    return root


@pytest.fixture(scope="module")
def pool(zoo: Path) -> ModelPool:
    torch.set_num_threads(1)
    return ModelPool(Settings(zoo_dir=zoo, device="cpu", onnx_providers="CPUExecutionProvider"))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def generate(seed: int, **fields: Any) -> dict[str, Any]:
    """A full generate spec (the JSON form the gateway enqueues) on the tiny class model."""
    base: dict[str, Any] = {
        "num_inference_steps": 6,
        "class_label": seed % 10,
        "seed": seed,
        # Keep every x_t: final pixels of an untrained model saturate at ±1 under clipping, the
        # intermediate x_t do not, so comparing trajectories keeps the checks sensitive.
        "output": {"trajectory": True},
    }
    fields = {**base, **fields}
    return specs.generate(fields.pop("model", MODEL), **fields)


def make_engine(
    pool: ModelPool,
    feed: MemoryFeed,
    models: tuple[str, ...] = (MODEL,),
    clock: Clock | None = None,
    **policy: Any,
) -> tuple[Engine, dict[str, DenoiseWork]]:
    """An engine over `feed`; the second value collects each job's samples (tests read x_0)."""
    engine = Engine(
        pool,
        list(models),
        feed,
        MemoryStorage(),
        BatchingPolicy(**policy),
        clock=clock or Clock(),
        sleep=lambda _s: None,
    )
    works: dict[str, DenoiseWork] = {}
    for lane in engine.lanes.values():
        assert isinstance(lane, DenoiseLane)
        accept = lane.accept

        def spy(ticket: MemoryTicket, lane: DenoiseLane = lane, accept: Any = accept) -> None:
            accept(ticket)
            if ticket.key in lane.jobs:
                works[ticket.id] = lane.jobs[ticket.key].work

        lane.accept = spy  # type: ignore[method-assign]
    return engine, works


def run_alone(pool: ModelPool, request: dict[str, Any]) -> DenoiseWork:
    """The request's samples, run by themselves to the end."""
    model = pool.get(request["model"])
    assert isinstance(model, DiffusionModel)
    work = prepare_denoise(parse_job_spec(request), model, "alone")
    batch = model.new_batch()
    batch.add(work.samples)
    while len(batch):
        batch.step()
    return work


def alone(pool: ModelPool, request: dict[str, Any]) -> torch.Tensor:
    """x_0 [n, C, H, W] of the request run by itself."""
    return x0(run_alone(pool, request))


def x0(work: DenoiseWork) -> torch.Tensor:
    return torch.stack([s.x for s in work.samples])


def trajectories(work: DenoiseWork) -> torch.Tensor:
    """Every x_t of every image, [n, steps + 1, C, H, W] (empty without output.trajectory)."""
    return torch.stack([torch.stack(s.trajectory) for s in work.samples if s.trajectory] or [])


def assert_equal_alone(pool: ModelPool, ticket: MemoryTicket, work: DenoiseWork) -> None:
    assert ticket.output is not None, ticket.error
    reference = run_alone(pool, ticket.request)
    diff = (x0(work) - x0(reference)).abs().max().item()
    assert diff <= TOL, f"{ticket.id}: batched x_0 differs from alone by {diff}"
    if ticket.request.get("output", {}).get("trajectory"):
        diff = (trajectories(work) - trajectories(reference)).abs().max().item()
        assert diff <= TOL, f"{ticket.id}: batched x_t differs from alone by {diff}"


def png_pixels(storage: MemoryStorage, key: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(storage.get(key))))


def test_sixteen_mixed_jobs_share_calls_and_equal_alone(pool: ModelPool) -> None:
    feed = MemoryFeed()
    tickets = [
        feed.submit(
            generate(
                seed,
                sampler="ddpm" if seed % 3 == 0 else "ddim",
                num_inference_steps=4 + seed % 5,
                eta=0.5 if seed % 4 == 1 else 0.0,
                guidance_scale=3.5 if seed % 2 else 1.0,  # s (w = 2.5) on the odd seeds
                class_label=None if seed == 4 else seed % 10,  # guidance needs a condition
            )
        )
        for seed in range(16)
    ]
    engine, works = make_engine(pool, feed, max_batch=64)
    engine.run_until_idle()
    assert engine.stats.network_calls == 8  # the longest job's steps: everyone shared every call
    assert engine.stats.network_calls < 16
    assert engine.stats.rows_per_call[0] == 16 + 8  # guided samples take two rows
    for ticket in tickets:
        assert ticket.ends == 1
        assert_equal_alone(pool, ticket, works[ticket.id])
        assert ticket.batch_rows == 24
        (image,) = ticket.output["images"]
        assert image["seed"] == int(ticket.request["seed"])


def test_newcomer_joins_running_batch_between_steps(pool: ModelPool) -> None:
    feed = MemoryFeed()
    long_job = feed.submit(generate(1, num_inference_steps=20))
    engine, works = make_engine(pool, feed, max_batch=8)
    for _ in range(5):
        engine.run_once()
    short_job = feed.submit(generate(2, num_inference_steps=6, guidance_scale=2.5))
    for _ in range(6):
        engine.run_once()
    assert short_job.output is not None and long_job.output is None  # done while the long one runs
    engine.run_until_idle()
    assert engine.stats.rows_per_call == [1] * 5 + [3] * 6 + [1] * 9
    for ticket in (long_job, short_job):
        assert_equal_alone(pool, ticket, works[ticket.id])


def test_request_batching_makes_a_newcomer_wait_for_the_whole_batch(pool: ModelPool) -> None:
    feed = MemoryFeed()
    long_job = feed.submit(generate(1, num_inference_steps=20))
    engine, works = make_engine(pool, feed, mode="request", max_batch=8)
    for _ in range(5):
        engine.run_once()
    short_job = feed.submit(generate(2, num_inference_steps=6))
    engine.run_until_idle()
    assert engine.stats.rows_per_call == [1] * 26  # the newcomer ran only after the long job
    assert_equal_alone(pool, short_job, works[short_job.id])
    assert_equal_alone(pool, long_job, works[long_job.id])


def test_request_batching_gathers_waiting_jobs_into_one_batch(pool: ModelPool) -> None:
    feed = MemoryFeed()
    tickets = [feed.submit(generate(s, num_inference_steps=3 + s)) for s in range(4)]
    engine, _ = make_engine(pool, feed, mode="request", max_batch=8)
    engine.run_until_idle()
    assert engine.stats.rows_per_call == [4, 4, 4, 3, 2, 1]
    assert all(t.output is not None for t in tickets)


def test_no_batching_runs_one_job_at_a_time(pool: ModelPool) -> None:
    feed = MemoryFeed()
    tickets = [feed.submit(generate(s, n=2, num_inference_steps=3)) for s in range(3)]
    engine, works = make_engine(pool, feed, mode="none", max_batch=64)
    engine.run_until_idle()
    assert engine.stats.rows_per_call == [2] * 9
    for ticket in tickets:
        assert_equal_alone(pool, ticket, works[ticket.id])


def test_share_cap_leaves_room_for_the_next_job(pool: ModelPool) -> None:
    def run(share: float) -> tuple[list[int], int]:
        feed = MemoryFeed()
        big = feed.submit(generate(1, n=8, num_inference_steps=4))
        small = feed.submit(generate(2, n=2, num_inference_steps=4))
        engine, works = make_engine(pool, feed, max_batch=8, max_job_share=share)
        rounds = 0
        while small.output is None:
            engine.run_once()
            rounds += 1
        engine.run_until_idle()
        assert_equal_alone(pool, big, works[big.id])
        assert_equal_alone(pool, small, works[small.id])
        return engine.stats.rows_per_call, rounds

    capped_rows, capped_rounds = run(0.5)
    assert capped_rows[0] == 4 + 2  # the big job holds at most half of the call
    assert capped_rounds == 4  # the small job started at once
    uncapped_rows, uncapped_rounds = run(1.0)
    assert uncapped_rows[0] == 8
    assert uncapped_rounds == 8  # it had to wait for the big job


def test_guided_sample_is_not_overtaken_forever(pool: ModelPool) -> None:
    """Head-of-line: a two-row sample waits for room instead of letting one-row samples pass."""
    feed = MemoryFeed()
    first = feed.submit(generate(0, num_inference_steps=3))
    guided = feed.submit(generate(1, num_inference_steps=3, guidance_scale=3.0))
    engine, _ = make_engine(pool, feed, max_batch=2)
    engine.run_once()  # first (1 row) runs; guided (2 rows) waits for room
    for s in range(2, 8):
        feed.submit(generate(s, num_inference_steps=3))
    rounds = 1
    while guided.output is None:
        engine.run_once()
        rounds += 1
    assert first.output is not None
    assert rounds == 6  # right after the first job, before any later single-row job
    assert engine.stats.rows_per_call[:6] == [1, 1, 1, 2, 2, 2]


def test_classifier_guidance_batches_with_other_jobs(pool: ModelPool) -> None:
    model = pool.get(MODEL)
    assert isinstance(model, DiffusionModel) and model.classifier is not None
    feed = MemoryFeed()
    steered = feed.submit(generate(1, n=2, classifier_scale=5.0, class_label=3))
    both = feed.submit(generate(2, classifier_scale=2.0, guidance_scale=2.5, sampler="ddpm"))
    plain = feed.submit(generate(3))
    engine, works = make_engine(pool, feed)
    engine.run_until_idle()
    assert engine.stats.network_calls == 6
    for ticket in (steered, both, plain):
        assert_equal_alone(pool, ticket, works[ticket.id])
    unsteered = run_alone(pool, generate(1, n=2, class_label=3))
    change = (trajectories(works[steered.id]) - trajectories(unsteered)).abs().max()
    assert change > 1e-3  # the classifier's gradient did act


def test_cancel_running_and_waiting_jobs(pool: ModelPool) -> None:
    feed = MemoryFeed()
    keep = feed.submit(generate(1, num_inference_steps=8))
    doomed = feed.submit(generate(2, num_inference_steps=8))
    # Guided: its two-row samples find one free row, so it is taken but waits (head of line).
    waiting = feed.submit(generate(3, n=4, num_inference_steps=8, guidance_scale=2.0))
    engine, works = make_engine(pool, feed, max_batch=3)
    for _ in range(3):
        engine.run_once()
    assert engine.stats.rows_per_call == [2, 2, 2]
    assert waiting.id in engine.held_job_ids()  # taken, not admitted
    feed.cancel_set |= {doomed.id, waiting.id}
    engine.run_until_idle()
    assert doomed.canceled and waiting.canceled and doomed.ends == waiting.ends == 1
    assert engine.stats.rows_per_call == [2, 2, 2] + [1] * 5
    assert_equal_alone(pool, keep, works[keep.id])
    assert engine.stats.jobs_canceled == 2


def test_deadline_fails_only_that_job(pool: ModelPool) -> None:
    feed, clock = MemoryFeed(), Clock()
    late = feed.submit(generate(1, num_inference_steps=10), deadline=2.5)
    on_time = feed.submit(generate(2, num_inference_steps=10, guidance_scale=2.0))
    engine, works = make_engine(pool, feed, clock=clock, max_batch=8)
    while not engine.idle or feed.queues[MODEL]:
        engine.run_once()
        clock.now += 1.0
    assert isinstance(late.error, JobDeadlineExceeded) and late.ends == 1
    assert "3 of 10 steps" in str(late.error)
    assert_equal_alone(pool, on_time, works[on_time.id])


def test_bad_request_fails_only_itself(pool: ModelPool) -> None:
    feed = MemoryFeed()
    bad = feed.submit(generate(1, class_label=42))
    good = feed.submit(generate(2))
    engine, works = make_engine(pool, feed)
    engine.run_until_idle()
    assert isinstance(bad.error, InvalidJobRequest) and "class_label" in str(bad.error)
    assert_equal_alone(pool, good, works[good.id])


def test_inpaint_strength_on_a_repaint_model_fails_only_itself(pool: ModelPool) -> None:
    """A spec the gateway would refuse (`strength_unsupported`) from elsewhere: the worker fails
    the job, not the running set (RePaint has no image latents to start from)."""
    import base64

    def b64png(array: np.ndarray) -> str:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    picture = np.full((8, 8), 128, dtype=np.uint8)
    feed = MemoryFeed()
    bad = feed.submit(
        specs.inpaint(MODEL, b64png(picture), b64png(picture), class_label=1, strength=0.5)
    )
    good = feed.submit(generate(2))
    engine, works = make_engine(pool, feed)
    engine.run_until_idle()
    assert isinstance(bad.error, InvalidJobRequest) and "strength" in str(bad.error)
    assert_equal_alone(pool, good, works[good.id])


def test_progress_is_written_every_n_steps(pool: ModelPool) -> None:
    feed = MemoryFeed()
    ticket = feed.submit(generate(1, n=3, num_inference_steps=10))
    engine, _ = make_engine(pool, feed, progress_every=3)
    engine.run_until_idle()
    assert ticket.progress_log == [(3, 10, 3), (6, 10, 3), (9, 10, 3), (10, 10, 3)]


def test_a_job_shorter_than_progress_every_reports_its_last_step(pool: ModelPool) -> None:
    feed = MemoryFeed()
    short = feed.submit(generate(1, n=2, num_inference_steps=3))
    engine, _ = make_engine(pool, feed, progress_every=5)
    engine.run_until_idle()
    assert short.output is not None
    assert short.progress_log == [(3, 3, 2)]  # step = total


def test_inpainting_with_repaint_jumps_batches_with_generation(pool: ModelPool) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, :4] = 255  # keep the left half

    def b64png(array: np.ndarray) -> str:
        import base64

        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    inpaint = specs.inpaint(
        MODEL,
        b64png(image),
        b64png(mask),
        n=2,
        num_inference_steps=6,
        jump_length=2,
        jump_n_sample=2,
        class_label=4,  # conditional, guided inpainting
        guidance_scale=2.5,
        seed=7,
        output={"trajectory": True},
    )
    feed = MemoryFeed()
    painted = feed.submit(inpaint)
    others = [feed.submit(generate(s, num_inference_steps=5 + s)) for s in range(3)]
    engine, works = make_engine(pool, feed)
    storage = next(iter(engine.lanes.values())).storage
    engine.run_until_idle()
    work = works[painted.id]
    assert work.steps_per_image > 6  # RePaint walked back up and denoised again
    assert engine.stats.network_calls == work.steps_per_image
    assert engine.stats.rows_per_call[0] == 2 * 2 + 3  # the guided inpainting rows count twice
    for ticket in (painted, *others):
        assert_equal_alone(pool, ticket, works[ticket.id])
    for record in painted.output["images"]:
        assert np.array_equal(png_pixels(storage, record["key"])[:, :4], image[:, :4])


def test_latent_diffusion_decodes_each_sample_as_it_finishes(pool: ModelPool) -> None:
    model = pool.get(LATENT)
    assert isinstance(model, DiffusionModel) and model.latent_scale == 0.5
    decoded_batches: list[int] = []
    decode = model.first_stage.decode_tensor

    def counting_decode(latents: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        decoded_batches.append(len(latents))
        return decode(latents, out)

    model.first_stage.decode_tensor = counting_decode  # type: ignore[method-assign]
    try:
        feed = MemoryFeed()
        no_trajectory = {"output": {"trajectory": False}}  # count only the images' decodes
        quick = feed.submit(generate(1, model=LATENT, n=2, num_inference_steps=3, **no_trajectory))
        slow = feed.submit(
            generate(2, model=LATENT, num_inference_steps=6, guidance_scale=3.0, **no_trajectory)
        )
        pixel = feed.submit(generate(3, num_inference_steps=4))
        engine, works = make_engine(pool, feed, models=(LATENT, MODEL))
        storage = engine.lanes[LATENT].storage
        engine.run_until_idle()
    finally:
        model.first_stage.decode_tensor = decode  # type: ignore[method-assign]
    assert decoded_batches == [2, 1]  # at the step each sample finished, not at the end
    for ticket in (quick, slow, pixel):
        assert_equal_alone(pool, ticket, works[ticket.id])
    expected = model.first_stage.decode(latents=(x0(works[slow.id]) / 0.5).numpy())
    stored = png_pixels(storage, slow.output["images"][0]["key"])
    want = np.round((np.clip(expected[0, 0], -1, 1) + 1) * 127.5)
    assert np.abs(stored.astype(float) - want).max() <= 1
    assert stored.shape == (8, 8)


def test_trajectory_gif_is_stored(pool: ModelPool) -> None:
    feed = MemoryFeed()
    ticket = feed.submit(generate(1, n=2, output={"trajectory": True, "return": "b64"}))
    engine, _ = make_engine(pool, feed)
    storage = next(iter(engine.lanes.values())).storage
    engine.run_until_idle()
    key = ticket.output["trajectory_key"]
    assert key == f"{ticket.id}/trajectory.gif"
    gif = Image.open(io.BytesIO(storage.get(key)))
    assert 2 <= gif.n_frames <= 7  # x_T and one frame per step (PIL merges equal frames)
    assert all("b64" in record for record in ticket.output["images"])


def test_denoising_batch_is_the_engine_running_set(pool: ModelPool) -> None:
    engine, _ = make_engine(pool, MemoryFeed())
    assert isinstance(engine.lanes[MODEL].batch, DenoisingBatch)
    assert engine.idle


def test_one_image_of_a_batch_is_regenerated_alone_by_its_own_seed(pool: ModelPool) -> None:
    """Image i of a job seeded s reports seed s + i, and a job of n = 1 with that seed gives the
    same image (#20: per-image seeds)."""
    feed = MemoryFeed()
    batch = feed.submit(generate(5, n=3))
    engine, works = make_engine(pool, feed)
    engine.run_until_idle()
    assert batch.output is not None
    assert [image["seed"] for image in batch.output["images"]] == [5, 6, 7]
    third = x0(works[batch.id])[2]
    alone_seeded = alone(pool, generate(7, n=1, class_label=5 % 10))
    assert torch.allclose(third, alone_seeded[0], atol=1e-5)
