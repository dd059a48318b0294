"""`make serve` installs the runtime packages only; `make test` (and lint, format) add the dev
extras: two stamps in .venv. Checked with `make -n` (what make would run) in a scratch copy of the
Makefile and pyproject.toml, without and with the stamps."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = "pip install -q -e .\n"
DEV = 'pip install -q -e ".[dev]"\n'

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def planned(folder: Path, target: str) -> str:
    # Run as a top-level make (this test runs under `make test` in CI, whose MAKEFLAGS and
    # MAKELEVEL would make it a sub-make that prints "Entering/Leaving directory" lines).
    environment = {
        k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MAKELEVEL", "MFLAGS"}
    }
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", target],
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def touch_later(path: Path, than: Path, seconds: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    later = than.stat().st_mtime + seconds
    os.utime(path, (later, later))


def test_make_serve_installs_the_runtime_set_only(checkout: Path) -> None:
    plan = planned(checkout, "serve")
    assert "pip install -q torch==" in plan and RUNTIME in plan
    assert ".[dev]" not in plan
    assert plan.index("torch==") < plan.index(RUNTIME)  # torch first: the CPU wheel
    assert plan.rstrip().endswith(".venv/bin/ddserve serve")


def test_make_test_adds_the_dev_extras(checkout: Path) -> None:
    plan = planned(checkout, "test")
    assert RUNTIME in plan and DEV in plan and plan.index(RUNTIME) < plan.index(DEV)
    for target in ("lint", "format", "venv"):
        assert DEV in planned(checkout, target), target


def test_the_stamps_install_each_set_once(checkout: Path) -> None:
    touch_later(checkout / ".venv" / ".installed", checkout / "pyproject.toml", 10)
    assert "pip install" not in planned(checkout, "serve")  # a served venv is not upgraded
    plan = planned(checkout, "test")
    assert DEV in plan and RUNTIME not in plan and "torch==" not in plan
    touch_later(checkout / ".venv" / ".installed-dev", checkout / "pyproject.toml", 20)
    assert "pip install" not in planned(checkout, "test")
    touch_later(checkout / "pyproject.toml", checkout / ".venv" / ".installed-dev", 10)
    assert RUNTIME in planned(checkout, "serve") and DEV in planned(checkout, "test")
