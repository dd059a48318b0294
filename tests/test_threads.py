"""Worker thread counts: a setting, and unset every core for a worker process but one fewer beside
the gateway; ONNX Runtime follows torch unless set; applied to torch and to the codecs' sessions."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import models.onnx.runtime
from ddserve.settings import Settings
from workers.model_pool import ModelPool
from workers.threads import apply_threads, limit_this_thread, plan_threads, spare_threads


def test_unset_threads_leave_a_core_to_the_gateway_only_in_the_embedded_mode() -> None:
    settings = Settings()
    assert plan_threads(settings, embedded=False, cores=8).torch == 8
    assert plan_threads(settings, embedded=True, cores=8).torch == 7
    assert plan_threads(settings, embedded=True, cores=1).torch == 1  # never zero
    assert plan_threads(settings, embedded=True, cores=8).onnxruntime == 7


def test_explicit_settings_win() -> None:
    settings = Settings(torch_threads=3, ort_threads=2)
    plan = plan_threads(settings, embedded=True, cores=8)
    assert (plan.torch, plan.onnxruntime) == (3, 2)
    assert plan_threads(Settings(torch_threads=3), embedded=False, cores=8).onnxruntime == 3


def test_the_environment_variable_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDSERVE_TORCH_THREADS", "2")
    assert plan_threads(Settings(), embedded=False, cores=16).torch == 2
    monkeypatch.setenv("DDSERVE_TORCH_THREADS", "0")
    with pytest.raises(ValueError):
        Settings()


def test_apply_sets_torch_and_hands_onnxruntime_its_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    before = torch.get_num_threads()
    settings = Settings(torch_threads=1, ort_threads=2, zoo_dir=tmp_path)
    try:
        caplog.set_level("INFO", logger="workers.threads")
        apply_threads(settings, embedded=True)
        assert torch.get_num_threads() == 1
        assert "torch 1, ONNX Runtime 2" in caplog.text
    finally:
        torch.set_num_threads(before)
    seen: dict[str, Any] = {}

    def fake_load_codec(entry: Any, providers: Any, device: str, threads: int | None) -> str:
        seen["threads"] = threads
        return "codec"

    monkeypatch.setattr(models.onnx.runtime, "load_codec", fake_load_codec)
    pool = ModelPool(settings, catalog={})
    monkeypatch.setattr(pool, "entry", lambda name: name)
    assert pool.codec("any") == "codec" and seen["threads"] == 2


def test_the_prepare_thread_gets_the_spare_cores_at_least_one() -> None:
    assert spare_threads(8, cores=8) == 1  # a worker on every core: one more thread, not zero
    assert spare_threads(6, cores=8) == 2
    assert spare_threads(1, cores=1) == 1


def test_limiting_one_thread_leaves_the_others_counts() -> None:
    """torch.set_num_threads from a thread also sets the count threads started later begin with;
    limit_this_thread must change the calling thread's alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: dict[str, int] = {}

    def limited() -> None:
        seen["limited"] = limit_this_thread(1)
        torch.ones(64, 64) @ torch.ones(64, 64)  # a parallel operator on its own count
        seen["limited_after"] = torch.get_num_threads()

    def later() -> None:
        seen["later"] = torch.get_num_threads()

    try:
        for target in (limited, later):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join()
        assert seen == {"limited": 1, "limited_after": 1, "later": 2}
        assert torch.get_num_threads() == 2  # this (the stepping) thread's
    finally:
        torch.set_num_threads(before)
