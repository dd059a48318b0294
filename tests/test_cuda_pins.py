"""The GPU stack's pins share one CUDA major (docs/gpu.md): the worker image's CUDA base, its torch
wheel index and the `gpu` extra's onnxruntime-gpu range."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


# onnxruntime-gpu on PyPI: 1.19-1.26 are CUDA 12 builds, 1.27 onwards CUDA 13 (their nvidia-*-cu12 /
# -cu13 requirements). Versions before 1.19 defaulted to CUDA 11.
def ort_cuda_major(version: Version) -> int:
    if version < Version("1.19"):
        return 11
    return 12 if version < Version("1.27") else 13


def dockerfile_args() -> dict[str, str]:
    text = (ROOT / "deploy" / "worker.Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))


def test_image_torch_and_onnxruntime_share_one_cuda_major() -> None:
    args = dockerfile_args()
    base = re.search(r"nvidia/cuda:(\d+)\.(\d+)", args["BASE_IMAGE"])
    assert base, f"the worker image's base is not a CUDA image: {args['BASE_IMAGE']}"
    image_major = int(base.group(1))
    wheel = re.search(r"/cu(\d+?)(\d)$", args["TORCH_INDEX_URL"].rstrip("/"))
    assert wheel, f"the torch index is not a CUDA one: {args['TORCH_INDEX_URL']}"
    assert int(wheel.group(1)) == image_major, (args["TORCH_INDEX_URL"], args["BASE_IMAGE"])
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (ort,) = [Requirement(r) for r in extras["gpu"] if r.startswith("onnxruntime-gpu")]
    bounds = {s.operator: Version(s.version) for s in ort.specifier}
    assert ">=" in bounds and "<" in bounds, f"{ort} must be bounded on both sides"
    lowest, highest = bounds[">="], Version(f"{bounds['<'].major}.{bounds['<'].minor - 1}")
    majors = {ort_cuda_major(lowest), ort_cuda_major(highest)}
    assert majors == {image_major}, f"{ort} spans CUDA {sorted(majors)}; the image is {image_major}"


def test_the_unbounded_pin_of_the_first_version_would_fail() -> None:
    """The check bites: `onnxruntime-gpu>=1.18` reaches CUDA 13 builds on a CUDA 12 image."""
    assert ort_cuda_major(Version("1.31.1")) == 13 != 12
