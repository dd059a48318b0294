"""Autoencoder jobs of one round share ONNX Runtime calls: one per kind of input, whatever the
number of jobs; each job gets what it gets alone, and one job's bad input fails only that job."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ddserve.spec import parse_job_spec
from tests import specs
from tests.test_engine import Clock, png_pixels, pool, zoo  # noqa: F401
from tests.worker_doubles import MemoryFeed, MemoryStorage
from workers.engine import BatchingPolicy, CodecLane, Engine
from workers.execute import run_codec
from workers.model_pool import CodecModel, ModelPool

CODEC = "tiny-kl"  # 1×8×8 images ↔ 2×4×4 latents


def png(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def codec_engine(model_pool: ModelPool, feed: MemoryFeed) -> Engine:
    return Engine(
        model_pool,
        [CODEC],
        feed,
        MemoryStorage(),
        BatchingPolicy(),
        clock=Clock(),
        sleep=lambda _s: None,
    )


def latents(seed: int, n: int) -> list:
    return np.random.default_rng(seed).normal(0, 1, (n, 2, 4, 4)).round(4).tolist()


@contextmanager
def counted_calls(model: CodecModel) -> Iterator[list[tuple[str, int]]]:
    """While the block runs, record each ONNX Runtime call of the codec as (method, rows)."""
    calls: list[tuple[str, int]] = []
    originals = {name: getattr(model.codec, name) for name in ("encode", "decode")}

    def wrap(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            rows = next(iter([*args, *kwargs.values()]))
            calls.append((name, len(rows)))
            return originals[name](*args, **kwargs)

        return call

    for name in originals:
        setattr(model.codec, name, wrap(name))
    try:
        yield calls
    finally:
        for name, method in originals.items():
            setattr(model.codec, name, method)


def test_a_rounds_codec_jobs_share_one_call_per_kind_of_input(
    pool: ModelPool,  # noqa: F811
) -> None:
    model = pool.get(CODEC)
    assert isinstance(model, CodecModel)
    requests = [
        specs.codec("encode", CODEC, images=[png(1), png(2)]),
        specs.codec("encode", CODEC, images=[png(3)]),
        specs.codec("decode", CODEC, latents=latents(4, 2)),
        specs.codec("decode", CODEC, latents=latents(5, 1)),
        specs.codec("decode", CODEC, latents=[[[0.0] * 3] * 3]),  # wrong shape
        specs.codec("encode", CODEC, images=[png(6)]),
    ]
    feed = MemoryFeed()
    tickets = [feed.submit(r) for r in requests]
    engine = codec_engine(pool, feed)
    lane = engine.lanes[CODEC]
    assert isinstance(lane, CodecLane)
    with counted_calls(model) as calls:
        engine.run_until_idle()

    # encode: one call over the 4 images of three jobs; decode: calls are grouped by row shape,
    # so the two good jobs share one (3 rows) and the bad job's latents go alone (refused, 1 row).
    assert [rows for name, rows in calls if name == "encode"] == [4]
    assert [rows for name, rows in calls if name == "decode"] == [3, 1]
    bad = tickets[4]
    assert bad.ends == 1 and bad.output is None and bad.error is not None
    storage = MemoryStorage()
    for i, ticket in enumerate(tickets):
        if i == 4:
            continue
        assert ticket.ends == 1 and ticket.output is not None, ticket.error
        reference = run_codec(parse_job_spec(ticket.request), model, f"alone-{i}", storage)
        if ticket.request["kind"] == "encode":
            assert np.allclose(ticket.output["latents"], reference["latents"], atol=1e-6)
        else:
            got = [png_pixels(lane.storage, im["key"]) for im in ticket.output["images"]]
            want = [png_pixels(storage, im["key"]) for im in reference["images"]]
            assert len(got) == len(want)
            for a, b in zip(got, want, strict=True):
                assert np.array_equal(a, b)
    assert tickets[0].batch_rows == 4  # the rows of the call it ran in


def test_decode_jobs_share_a_call(pool: ModelPool) -> None:  # noqa: F811
    model = pool.get(CODEC)
    assert isinstance(model, CodecModel)
    feed = MemoryFeed()
    tickets = [
        feed.submit(specs.codec("decode", CODEC, latents=latents(seed, 1 + seed)))
        for seed in range(3)
    ]
    engine = codec_engine(pool, feed)
    with counted_calls(model) as calls:
        engine.run_until_idle()
    assert calls == [("decode", 6)]
    assert [len(t.output["images"]) for t in tickets] == [1, 2, 3]


@pytest.mark.parametrize("kind", ["encode", "reconstruct"])
def test_a_job_with_a_bad_image_fails_alone(pool: ModelPool, kind: str) -> None:  # noqa: F811
    feed = MemoryFeed()
    good = feed.submit(specs.codec(kind, CODEC, images=[png(1)]))
    bad = feed.submit(specs.codec(kind, CODEC, images=["not a png"]))
    engine = codec_engine(pool, feed)
    engine.run_until_idle()
    assert good.ends == 1 and good.output is not None
    assert bad.ends == 1 and bad.output is None and "images[0]" in str(bad.error)


def test_run_until_idle_runs_every_queued_codec_round(pool: ModelPool) -> None:  # noqa: F811
    """Regression: more codec jobs than one round takes (CODEC_JOBS_PER_ROUND) all run. The codec
    lane ends its round's jobs in the round's step, so the engine is idle after it while jobs are
    still queued; `run_until_idle` stopped there and left them in the feed."""
    from workers.engine import CODEC_JOBS_PER_ROUND

    feed = MemoryFeed()
    tickets = [
        feed.submit(specs.codec("encode", CODEC, images=[png(i)]))
        for i in range(2 * CODEC_JOBS_PER_ROUND + 1)
    ]
    codec_engine(pool, feed).run_until_idle()
    assert [t.ends for t in tickets] == [1] * len(tickets)
    assert all(t.output is not None for t in tickets)
