"""The requirement list of each container image, derived from pyproject.toml.

pyproject.toml stays the single source of the project's requirements; this script only selects
from it, so a dependency added there reaches the images without a second list to keep in step:

- `gateway`: the project's dependencies minus the worker-only ones (`WORKER_ONLY`: PyTorch, ONNX and
  friends). The gateway never imports them (docs/architecture.md) and PyTorch alone weighs GBs.
- `worker [--extra gpu ...]`: the dependencies plus the named extras. A dependency that an extra
  replaces (`REPLACED_BY`: `onnxruntime-gpu` ships the same `onnxruntime` module as `onnxruntime`)
  is left out, because pip would install both and whichever came last would win the import.

The images then install the project itself with `pip install --no-deps .`:

    python deploy/requirements.py gateway > /tmp/requirements.txt
    python deploy/requirements.py worker --extra gpu > /tmp/requirements.txt

Standard library only (tomllib): it runs in a bare Python image before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

# Distributions only the workers (and training) import. Normalized names (PEP 503).
WORKER_ONLY = frozenset(
    {"torch", "onnx", "onnxscript", "onnxruntime", "safetensors", "scikit-learn"}
)

# extra's distribution → the dependency it replaces when that extra is chosen.
REPLACED_BY = {"onnxruntime-gpu": "onnxruntime"}

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    """PEP 503 normalized distribution name: lower case, runs of `-_.` as one `-`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement string (`fakeredis[lua]>=2` → …)."""
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return normalize(match.group(1))


def load_project(pyproject: Path = PYPROJECT) -> dict:
    with pyproject.open("rb") as f:
        return tomllib.load(f)["project"]


def gateway_requirements(project: dict) -> list[str]:
    """The project's dependencies that the gateway needs: all but `WORKER_ONLY`."""
    return [r for r in project["dependencies"] if requirement_name(r) not in WORKER_ONLY]


def worker_requirements(project: dict, extras: list[str]) -> list[str]:
    """The dependencies plus the extras' requirements, minus what those extras replace."""
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise KeyError(f"pyproject.toml has no extra {', '.join(unknown)}")
    added = [r for extra in extras for r in optional[extra]]
    replaced = {REPLACED_BY[n] for n in map(requirement_name, added) if n in REPLACED_BY}
    kept = [r for r in project["dependencies"] if requirement_name(r) not in replaced]
    return kept + [r for r in added if r not in kept]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", choices=["gateway", "worker"])
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        help="extras of pyproject.toml (repeatable; one value may name several, space-separated)",
    )
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    args = parser.parse_args(argv)
    project = load_project(args.pyproject)
    if args.image == "gateway":
        if args.extra:
            parser.error("the gateway image takes no extras")
        lines = gateway_requirements(project)
    else:
        # --extra "gpu diffusers" (the Dockerfile's EXTRAS) or repeated; "" names none
        extras = [e for given in args.extra for e in given.replace(",", " ").split()]
        lines = worker_requirements(project, extras)
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
