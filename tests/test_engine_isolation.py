"""A failing network call fails only its own jobs (no Redis): the engine splits the call and retries
it without the rows that fail on their own, in continuous and in request-level batching.

The model doubles wrap the tiny U-Net and misbehave only for one class (7): NaN or ±inf output, an
error or out-of-memory raised whenever a class-7 row is in the call, or out-of-memory for any call
over four rows. The poisoned job must end failed exactly once with a clear error; every other job
must end succeeded with the images it yields alone (≤ 1e-4), whatever it shared calls with."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from models.diffusion.sampler import SamplerSettings
from tests.test_engine import assert_equal_alone, generate, make_engine, pool, zoo  # noqa: F401
from tests.worker_doubles import MemoryFeed, MemoryTicket
from workers.engine import DenoiseLane
from workers.errors import (
    ModelCallFailed,
    ModelOutOfMemory,
    NonFiniteOutput,
    error_meta,
    is_retryable,
)
from workers.model_pool import ModelPool

MODEL = "tiny-ddpm"
POISON = 7  # the class the doubles fail on
Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def poisoned(network: Network, effect: str) -> Network:
    """The network, except for class-POISON rows: NaN / inf output rows, or the whole call raises
    (a kernel error or out-of-memory) whenever such a row is in it."""

    def call(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        assert cond is not None  # the tiny model is class-conditional
        bad = cond == POISON  # [N]
        if effect == "error" and bool(bad.any()):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if effect == "oom" and bool(bad.any()):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        y = network(x, t, cond)  # [N, C, H, W]
        if effect in ("nan", "inf"):
            y = y.clone()
            y[bad] = float("nan") if effect == "nan" else float("inf")
        return y

    return call


def memory_limited(network: Network, max_rows: int) -> Network:
    """The network on a device that holds at most `max_rows` rows per call."""

    def call(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] > max_rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory ({x.shape[0]} rows)")
        return network(x, t, cond)

    return call


def mixed_jobs(feed: MemoryFeed) -> tuple[MemoryTicket, list[MemoryTicket]]:
    """Seven innocent jobs (some guided, some with two images, different lengths) and one
    poisoned job in the middle of the queue."""
    innocent = [
        feed.submit(
            generate(
                seed,
                n=1 + seed % 2,
                num_inference_steps=4 + seed % 3,
                guidance_scale=2.5 if seed % 3 == 0 else 1.0,  # s (w = 1.5)
            )
        )
        for seed in (0, 1, 2)
    ]
    poison = feed.submit(generate(POISON, n=2, num_inference_steps=5, guidance_scale=3.0))
    innocent += [feed.submit(generate(seed, num_inference_steps=5)) for seed in (3, 4, 5, 6)]
    return poison, innocent


@pytest.mark.parametrize("mode", ["continuous", "request"])
@pytest.mark.parametrize(
    ("effect", "error_type", "code"),
    [
        ("nan", NonFiniteOutput, "non_finite_output"),
        ("inf", NonFiniteOutput, "non_finite_output"),
        ("error", ModelCallFailed, "model_error"),
        ("oom", ModelOutOfMemory, "out_of_memory"),
    ],
)
def test_a_poisoned_job_fails_alone_and_the_rest_of_its_batch_succeeds(
    pool: ModelPool,  # noqa: F811
    mode: str,
    effect: str,
    error_type: type,
    code: str,
) -> None:
    feed = MemoryFeed()
    poison, innocent = mixed_jobs(feed)
    engine, works = make_engine(pool, feed, mode=mode, max_batch=32)
    lane = engine.lanes[MODEL]
    assert isinstance(lane, DenoiseLane)
    real = lane.isolation.network
    lane.isolation.network = poisoned(real, effect)
    engine.run_once()
    # The poisoned job shared the first call with everyone, then left the running set.
    first_call = engine.stats.rows_per_call[0]
    assert first_call == sum(
        len(works[t.id].samples) * (2 if t.request["guidance_scale"] > 1 else 1)
        for t in [poison, *innocent]
    )
    assert poison.ends == 1 and isinstance(poison.error, error_type), poison.error
    assert lane.isolation.splits > 0
    engine.run_until_idle()

    assert poison.ends == 1 and poison.output is None
    meta = error_meta(poison.error)
    assert meta["type"] == "server_error" and meta["code"] == code
    assert "went on" in meta["message"]
    assert not is_retryable(poison.error)  # it would fail the same way again
    assert engine.stats.jobs_failed == 1 and engine.stats.jobs_succeeded == len(innocent)
    assert max(engine.stats.rows_per_call[1:]) < first_call
    lane.isolation.network = real  # the references below run on the real network
    for ticket in innocent:
        assert ticket.ends == 1
        assert_equal_alone(pool, ticket, works[ticket.id])


def test_a_call_too_large_for_memory_is_split_and_nobody_fails(
    pool: ModelPool,  # noqa: F811
) -> None:
    feed = MemoryFeed()
    poison, innocent = mixed_jobs(feed)
    engine, works = make_engine(pool, feed, max_batch=32)
    lane = engine.lanes[MODEL]
    assert isinstance(lane, DenoiseLane)
    real = lane.isolation.network
    lane.isolation.network = memory_limited(real, max_rows=4)
    engine.run_until_idle()
    assert lane.isolation.splits > 0
    assert engine.stats.jobs_failed == 0
    lane.isolation.network = real
    for ticket in [poison, *innocent]:
        assert ticket.ends == 1
        assert_equal_alone(pool, ticket, works[ticket.id])


def poisoned_classifier(
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], bad_t: set[int]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The guidance classifier, except that a call raises when one of its rows is at a bad t."""

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if any(int(step) in bad_t for step in t):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return classifier(x, t)

    return call


@pytest.mark.parametrize("mode", ["continuous", "request"])
def test_a_failing_guidance_classifier_fails_only_its_own_job(
    pool: ModelPool,  # noqa: F811
    mode: str,
) -> None:
    feed = MemoryFeed()
    innocent = [
        feed.submit(generate(1, n=2, classifier_scale=5.0, class_label=3)),
        feed.submit(generate(2, classifier_scale=2.0, guidance_scale=2.5, sampler="ddpm")),
        feed.submit(generate(3)),
    ]
    poison = feed.submit(generate(4, num_inference_steps=5, classifier_scale=3.0))
    # The classifier fails on the poisoned job's DDIM-5 timesteps that the 6-step jobs never visit.
    bad_t = set(SamplerSettings("ddim", 5).plan(1000)) - set(SamplerSettings("ddim", 6).plan(1000))
    assert bad_t
    engine, works = make_engine(pool, feed, mode=mode)
    lane = engine.lanes[MODEL]
    assert isinstance(lane, DenoiseLane) and lane.classifier_isolation is not None
    real = lane.classifier_isolation.classifier
    lane.classifier_isolation.classifier = poisoned_classifier(real, bad_t)
    engine.run_until_idle()

    assert poison.ends == 1 and isinstance(poison.error, ModelCallFailed), poison.error
    meta = error_meta(poison.error)
    assert meta["code"] == "model_error" and "guidance classifier" in meta["message"]
    assert lane.classifier_isolation.splits > 0
    assert engine.stats.jobs_failed == 1 and engine.stats.jobs_succeeded == len(innocent)
    lane.classifier_isolation.classifier = real  # the references below run on the real one
    for ticket in innocent:
        assert ticket.ends == 1
        assert_equal_alone(pool, ticket, works[ticket.id])


def test_a_call_too_large_for_memory_lowers_the_lane_s_row_limit_once(
    pool: ModelPool,  # noqa: F811
) -> None:
    """Issue #21 item 4: an out-of-memory call is split until the pieces fit, nobody fails, and
    the lane remembers what fitted: later calls are cut to it and admission builds no larger
    running set, so the device runs out of memory once, not at every step."""
    feed = MemoryFeed()
    poison, innocent = mixed_jobs(feed)
    engine, works = make_engine(pool, feed, max_batch=32)
    lane = engine.lanes[MODEL]
    assert isinstance(lane, DenoiseLane)
    real = lane.isolation.network
    errors: list[int] = []
    pieces: list[int] = []

    def device(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] > 4:
            errors.append(x.shape[0])
            raise torch.OutOfMemoryError(f"CUDA out of memory ({x.shape[0]} rows)")
        pieces.append(x.shape[0])
        return real(x, t, cond)

    lane.isolation.network = device
    engine.run_once()
    assert errors and lane.row_limit is not None and lane.row_limit <= 4
    assert lane.admission.max_batch == max(2, lane.row_limit)
    assert engine.stats.row_limit_lowered == 1
    first_errors = len(errors)
    engine.run_until_idle()
    assert len(errors) == first_errors  # never again
    assert max(pieces) <= 4 and engine.stats.jobs_failed == 0
    lane.isolation.network = real
    for ticket in [poison, *innocent]:
        assert ticket.ends == 1
        assert_equal_alone(pool, ticket, works[ticket.id])


def test_a_row_that_runs_out_of_memory_alone_does_not_lower_the_limit(
    pool: ModelPool,  # noqa: F811
) -> None:
    """A job whose own row runs out of memory (alone) fails; the lane's limit stays, or one bad
    request would shrink every later call to a row."""
    feed = MemoryFeed()
    poison, _ = mixed_jobs(feed)
    engine, _ = make_engine(pool, feed, max_batch=32)
    lane = engine.lanes[MODEL]
    assert isinstance(lane, DenoiseLane)
    lane.isolation.network = poisoned(lane.isolation.network, "oom")
    engine.run_until_idle()
    assert isinstance(poison.error, ModelOutOfMemory)
    assert lane.row_limit is None and lane.admission.max_batch == 32
    assert engine.stats.row_limit_lowered == 0


def test_the_measured_row_limit_bounds_every_call(pool: ModelPool) -> None:  # noqa: F811
    """A model whose probe at load found room for 6 rows: admission never builds a running set
    over 6 rows and no network call holds more, with the same images as alone."""
    model = pool.get(MODEL)
    feed = MemoryFeed()
    poison, innocent = mixed_jobs(feed)
    model.row_limit = 6
    try:
        engine, works = make_engine(pool, feed, max_batch=32)
    finally:
        model.row_limit = None
    lane = engine.lanes[MODEL]
    assert isinstance(lane, DenoiseLane)
    assert lane.admission.max_batch == 6 and lane.isolation.max_rows == 6
    real = lane.isolation.network
    pieces: list[int] = []

    def device(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        pieces.append(x.shape[0])
        return real(x, t, cond)

    lane.isolation.network = device
    engine.run_until_idle()
    assert max(pieces) <= 6 and max(engine.stats.rows_per_call) <= 6
    assert engine.stats.jobs_failed == 0
    lane.isolation.network = real
    for ticket in [poison, *innocent]:
        assert_equal_alone(pool, ticket, works[ticket.id])
