"""The GPU path's checks that run without a GPU: CUDA asked for but unable to load fails loudly
(simulated with ONNX Runtime's provider list), never a silent fall back to the CPU; `ddserve doctor`
reports the machine and the problems."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from ddserve.settings import Settings
from models.onnx.runtime import (
    CPU,
    CUDA,
    ProviderUnavailable,
    check_session_providers,
    resolve_providers,
)
from workers.doctor import report
from workers.model_pool import resolve_device

CPU_ONLY = ["AzureExecutionProvider", CPU]


@pytest.fixture
def cpu_only_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(CPU_ONLY))


@pytest.fixture
def cuda_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])


def test_a_named_cuda_provider_that_is_missing_is_an_error(cpu_only_runtime: None) -> None:
    with pytest.raises(ProviderUnavailable, match="DDSERVE_ONNX_PROVIDERS=CPUExecutionProvider"):
        resolve_providers([CUDA, CPU])


def test_a_cuda_device_requires_the_cuda_provider(cpu_only_runtime: None) -> None:
    with pytest.raises(ProviderUnavailable, match="the worker's device is CUDA"):
        resolve_providers(None, require_cuda=True)


def test_cpu_stays_possible_when_said_or_by_default(cpu_only_runtime: None) -> None:
    assert resolve_providers([CPU]) == [CPU]
    assert resolve_providers(None) == [CPU]  # no GPU and none asked for: the CPU, no error


def test_cuda_first_when_present(cuda_runtime: None) -> None:
    assert resolve_providers(None, require_cuda=True) == [CUDA, CPU]


class Session:
    def __init__(self, providers: list[str]) -> None:
        self.providers = providers

    def get_providers(self) -> list[str]:
        return self.providers


def test_a_session_that_fell_back_to_the_cpu_is_an_error() -> None:
    """ONNX Runtime drops a CUDA provider that fails to load (wrong CUDA major) without raising."""
    with pytest.raises(ProviderUnavailable, match="failed to load"):
        check_session_providers(Session([CPU]), [CUDA, CPU], "tiny-ae")
    check_session_providers(Session([CUDA, CPU]), [CUDA, CPU], "tiny-ae")
    check_session_providers(Session([CPU]), [CPU], "tiny-ae")


def test_a_cuda_device_without_cuda_fails_at_start() -> None:
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("cuda")


def test_doctor_reports_the_machine_and_each_models_backend(
    tmp_path: Path, cpu_only_runtime: None
) -> None:
    from tests.client_support import write_zoo

    zoo = write_zoo(tmp_path)
    lines, problems = report(Settings(zoo_dir=zoo, torch_threads=1), embedded=True)
    text = "\n".join(lines)
    assert "torch " in text and "onnxruntime " in text and "threads: torch 1" in text
    assert "tiny-ddpm" in text and "torch on cpu" in text
    assert "tiny-kl" in text and "ONNX Runtime (CPUExecutionProvider)" in text
    assert problems == []
    _, problems = report(Settings(zoo_dir=zoo, onnx_providers=CUDA, device="cpu"))
    assert len(problems) == 1 and CUDA in problems[0]


def test_doctor_exit_code(
    monkeypatch: pytest.MonkeyPatch, cpu_only_runtime: None, capsys: Any
) -> None:
    from ddserve.cli import main

    monkeypatch.setenv("DDSERVE_ONNX_PROVIDERS", CUDA)
    assert main(["doctor"]) == 1
    assert "PROBLEM:" in capsys.readouterr().out


def test_the_device_setting_takes_cuda_indices_and_refuses_others() -> None:
    assert Settings(device="cuda:3").device == "cuda:3"
    for bad in ("gpu", "cuda:", "cuda:x", "mps"):
        with pytest.raises(ValueError):
            Settings(device=bad)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("cuda:1")


class Child:
    def __init__(self, command: list[str], code: int) -> None:
        self.command, self.code, self.signals = command, code, []

    def wait(self) -> int:
        return self.code

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)


def test_devices_all_starts_one_named_worker_per_gpu() -> None:
    import argparse

    from workers.cli import add_arguments
    from workers.per_device import run_per_device

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--devices", "all", "--name", "node7", "--models", "digits-ddpm"])
    started: list[Child] = []

    def launch(command: list[str]) -> Child:
        started.append(Child(command, 0 if len(started) == 0 else 3))
        return started[-1]

    code = run_per_device(args, count=2, launch=launch, install_signals=False)
    assert code == 3  # the first failure is the parent's status
    first, second = (child.command for child in started)
    assert first[first.index("--device") + 1] == "cuda:0"
    assert second[second.index("--device") + 1] == "cuda:1"
    assert second[second.index("--name") + 1] == "node7-gpu1"
    assert "--devices" not in first and first[first.index("--models") + 1] == "digits-ddpm"
    with pytest.raises(SystemExit, match="no CUDA device"):
        run_per_device(args, count=0, launch=launch, install_signals=False)
