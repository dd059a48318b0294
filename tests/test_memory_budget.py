"""The row limit from the device's free memory (`workers.memory_budget`), on a fake allocator:
peak(N) = fixed + N · per_row is recovered from two probe calls, and the limit is the largest
call that fits in the given share of free memory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ddserve.settings import Settings
from tests.test_engine import MODEL, zoo  # noqa: F401
from workers.memory_budget import (
    RowMemory,
    gauge_for,
    measure_row_limit,
    probe_row_memory,
    row_limit,
)
from workers.model_pool import DiffusionModel, ModelPool

MIB = 2**20


class FakeGauge:
    """A device with `free` bytes whose calls of N rows peak at fixed + N · per_row."""

    def __init__(self, free: int, fixed: int, per_row: int) -> None:
        self.free, self.fixed, self.per_row = free, fixed, per_row
        self.rows: list[int] = []

    def free_bytes(self) -> int:
        return self.free

    def peak_of(self, call: Callable[[], object]) -> int:
        before = len(self.rows)
        call()
        (rows,) = self.rows[before:]
        return self.fixed + rows * self.per_row

    def call(self, rows: int) -> None:
        self.rows.append(rows)


def test_the_probe_recovers_the_linear_memory_model() -> None:
    gauge = FakeGauge(free=10_000 * MIB, fixed=300 * MIB, per_row=25 * MIB)
    memory = probe_row_memory(gauge.call, gauge)
    assert memory == RowMemory(fixed_bytes=300 * MIB, per_row_bytes=25 * MIB)
    assert gauge.rows == [1, 4]
    assert memory.peak(10) == 550 * MIB


@pytest.mark.parametrize(
    ("free_mib", "fraction", "max_batch", "expected"),
    [
        (10_000, 0.85, 64, 64),  # room for 328 rows: max_batch binds
        (1_000, 0.85, 64, 22),  # (850 − 300) / 25 = 22
        (1_000, 0.5, 64, 8),  # (500 − 300) / 25 = 8
        (200, 0.85, 64, 1),  # not even one row's worth: one row per call, never zero
    ],
)
def test_the_limit_is_the_largest_call_that_fits(
    free_mib: int, fraction: float, max_batch: int, expected: int
) -> None:
    memory = RowMemory(fixed_bytes=300 * MIB, per_row_bytes=25 * MIB)
    assert row_limit(memory, free_mib * MIB, fraction, max_batch) == expected


def test_no_measured_growth_means_no_memory_limit() -> None:
    assert row_limit(RowMemory(100, 0), 1000, 0.85, 48) == 48


def test_measure_row_limit_is_off_on_the_cpu_and_at_fraction_zero() -> None:
    gauge = FakeGauge(free=1_000 * MIB, fixed=300 * MIB, per_row=25 * MIB)
    assert gauge_for(torch.device("cpu")) is None
    assert measure_row_limit("m", gauge.call, None, 0.85, 64) is None
    assert measure_row_limit("m", gauge.call, gauge, 0.0, 64) is None
    assert gauge.rows == []  # no probe call at all
    assert measure_row_limit("m", gauge.call, gauge, 0.85, 64) == 22


def test_probe_sizes_must_grow() -> None:
    gauge = FakeGauge(free=MIB, fixed=0, per_row=1)
    with pytest.raises(ValueError, match="0 < N1 < N2"):
        probe_row_memory(gauge.call, gauge, rows=(4, 4))


def test_the_pool_probes_each_diffusion_model_at_load(
    zoo: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Wiring: loading a diffusion model runs the probe with real calls of the model (1 and 4
    rows of its sample shape) and keeps the limit on the model, where its lane reads it."""
    import workers.model_pool as model_pool

    gauge = FakeGauge(free=1_000 * MIB, fixed=300 * MIB, per_row=25 * MIB)
    shapes: list[tuple[int, ...]] = []

    def peak_of(call: Callable[[], object]) -> int:
        out = call()
        assert isinstance(out, torch.Tensor)
        shapes.append(tuple(out.shape))
        return gauge.fixed + out.shape[0] * gauge.per_row

    gauge.peak_of = peak_of  # type: ignore[method-assign]
    monkeypatch.setattr(model_pool, "gauge_for", lambda device: gauge)
    pool = ModelPool(Settings(zoo_dir=zoo, device="cpu", onnx_providers="CPUExecutionProvider"))
    model = pool.get(MODEL)
    assert isinstance(model, DiffusionModel)
    assert [s[0] for s in shapes] == [1, 4]
    assert all(s[1:] == model.sample_shape for s in shapes)
    assert model.row_limit == 22
    off = ModelPool(
        Settings(
            zoo_dir=zoo, device="cpu", onnx_providers="CPUExecutionProvider", memory_fraction=0
        )
    )
    assert off.get(MODEL).row_limit is None  # type: ignore[union-attr]
