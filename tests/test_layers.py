"""The layers of docs/architecture.md are contracts (`[tool.importlinter]` in pyproject.toml) that
`lint-imports` checks in `make test`; this test shows the check bites: a gateway module that imports
torch breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ddserve", "service", "workers", "models")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(tree / "pyproject.toml")],
        cwd=tree,
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project's Python packages and its contracts."""
    if not LINT_IMPORTS.exists():
        pytest.skip("lint-imports is not installed (make test installs it)")
    root = tmp_path_factory.mktemp("layers")
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, root / package, ignore=shutil.ignore_patterns("zoo", "*.pyc", "static")
        )
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_a_gateway_module_importing_torch_breaks_the_contracts(tree: Path) -> None:
    probe = tree / "service" / "layer_probe.py"
    probe.write_text('"""A gateway module that must not exist."""\n\nimport torch  # noqa: F401\n')
    try:
        result = lint_imports(tree)
    finally:
        probe.unlink()
    assert result.returncode != 0, result.stdout
    assert "service.layer_probe -> torch" in result.stdout


def test_the_client_importing_the_gateway_breaks_the_contracts(tree: Path) -> None:
    probe = tree / "ddserve" / "client" / "layer_probe.py"
    probe.write_text(
        '"""A client module that must not exist."""\n\nimport service.app  # noqa: F401\n'
    )
    try:
        result = lint_imports(tree)
    finally:
        probe.unlink()
    assert result.returncode != 0
    assert "ddserve.client.layer_probe -> service.app" in result.stdout
