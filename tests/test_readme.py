"""The README's getting-started promises: it opens with `make serve` / `make test` and the
prerequisites, the banner it shows is the one `ddserve serve` prints for the shipped zoo, every
file its examples use is in the repository (and the example images are valid inputs of the models
they are sent to), and its commands call `.venv/bin/ddserve` (a bare `ddserve` is not on PATH
unless the venv is activated)."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ddserve.settings import Settings
from models.catalog import DEFAULT_ZOO, load_catalog
from service.app import served_models
from service.cli import banner, example_request
from tests.gateway_support import make_app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def test_the_readme_opens_with_the_two_commands_then_the_prerequisites() -> None:
    first = re.search(r"^```bash\n(.*?)^```\n\n(.*?)\n\n", README, flags=re.S | re.M)
    assert first is not None
    commands = [line.split("#")[0].strip() for line in first.group(1).splitlines()]
    assert commands == ["make serve", "make test"]
    assert README.index("```bash") < README.index("\n## ")  # before any section
    prerequisites = first.group(2)
    assert prerequisites.startswith("**Prerequisites**")
    for needed in ("Python ≥ 3.11", "GB", "Redis"):
        assert needed in prerequisites


def test_the_readme_banner_is_what_ddserve_serve_prints() -> None:
    settings = Settings(auth_enabled=False)  # the embedded mode of `make serve`
    catalog = load_catalog(DEFAULT_ZOO)
    route, body = example_request(catalog, served_models(settings, catalog))
    printed = banner("http://127.0.0.1:8000", settings, route, body)
    assert body["model"] == "digits-ddpm"  # a diffusion model, as the README's examples use
    assert printed + "\n" in code_blocks("text"), printed


def example_paths() -> list[str]:
    text = "\n".join(code_blocks("bash"))
    paths = re.findall(r"base64 -w0 ([^\s)]+)\)", text)
    paths += re.findall(r"(?:\.venv/bin/)?python (?:-m \S+ )?([\w/.-]+\.py)\b", text)
    paths += re.findall(r"\b(examples/[\w/.-]+)", README)
    return sorted(set(paths))


def test_every_file_the_examples_use_exists() -> None:
    paths = example_paths()
    assert {"examples/digit.png", "examples/mask.png"} <= set(paths)
    missing = [path for path in paths if not (ROOT / path).is_file()]
    assert missing == []


def test_commands_call_the_venvs_ddserve() -> None:
    bare = [
        line
        for block in code_blocks("bash")
        for line in block.splitlines()
        if re.search(r"(^|[\s;&|(])ddserve\s+(serve|worker|train|eval|export|generate)\b", line)
    ]
    assert bare == [], "use .venv/bin/ddserve"


@pytest.fixture(scope="module")
def zoo_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The gateway on the shipped zoo's catalog (fakeredis, no worker: requests are only queued)."""
    app, _ = make_app(DEFAULT_ZOO, tmp_path_factory.mktemp("readme"))
    with TestClient(app) as client:
        yield client


def _b64(path: str) -> str:
    return base64.b64encode((ROOT / path).read_bytes()).decode()


def test_the_example_images_are_accepted_by_the_models_the_readme_sends_them_to(
    zoo_gateway: TestClient,
) -> None:
    digit, mask = _b64("examples/digit.png"), _b64("examples/mask.png")
    requests = [
        ("/inpaint", {"model": "digits-ddpm", "image": digit, "mask": mask, "n": 2, "seed": 1}),
        ("/encode", {"model": "digits-vae", "images": [digit]}),
        (
            "/reconstruct",
            {
                "model": "digits-dae",
                "images": [digit],
                "noise": {"kind": "gaussian", "amount": 0.5},
                "seed": 3,
            },
        ),
    ]
    for route, body in requests:
        answer = zoo_gateway.post(route, json=body)
        assert answer.status_code == 202, (route, answer.text)
