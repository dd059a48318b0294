"""`benchmarks/gpu_check.sh` must run unattended, in one call, on the lent H200 machine, which has no
network and only its own packages (benchmarks/gpu_device_packages.txt) plus the wheels we carry
(benchmarks/gpu_wheels.txt): here the whole script runs in its wheels mode on the CPU, with every
import the machine could not satisfy hidden (benchmarks/device_imports.py), and the wheel check of
benchmarks/gpu_wheels.sh is held to its word on made-up wheels."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_packages  # noqa: E402

REPOSITORY = ("ddserve", "models", "workers", "service", "benchmarks", "tests", "__main__")


def fake_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel: one module `name` and its dist-info."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    meta = [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"]
    meta += [f"Requires-Dist: {r}\n" for r in requires]
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": "".join(meta),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def test_gpu_check_runs_whole_with_only_what_the_device_has(tmp_path: Path) -> None:
    """The wheels mode end to end (pip --no-index --target, PYTHONPATH, versions, doctor, the
    benchmark's smallest form on the CPU), every process under the device's import guard: a
    dependency that neither the device nor gpu_wheels.txt has fails here, not in the lease."""
    pytest.importorskip("diffusers")
    wheels, out, guard = tmp_path / "whl", tmp_path / "out", tmp_path / "guard"
    for folder in (wheels, guard):
        folder.mkdir()
    fake_wheel(wheels, "gpu-check-probe", "0.1")
    (guard / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "import device_imports\ndevice_imports.install()\n"
    )
    quick = "--quick --modes fp32 bf16+graphs --batches 2 --calls 1 --threads 1"
    env = os.environ | {
        "GPU_CHECK_WHEELS": str(wheels),
        "GPU_CHECK_SITE": str(tmp_path / "site"),
        "GPU_CHECK_PYTHON": sys.executable,
        "GPU_CHECK_OUT": str(out),
        "GPU_CHECK_DEVICE": "cpu",
        "GPU_CHECK_BENCH_ARGS": quick,
        "PYTHONPATH": str(guard),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,  # inside pytest's 300 s
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "gpu_check_probe" / "__init__.py").exists()
    # what the device tool brings back: at most 8 plain-named files in one folder
    made = sorted(p.name for p in out.iterdir())
    assert len(made) <= 8 and all(re.fullmatch(r"[\w.-]+", n) for n in made), made
    hidden = re.findall(r"device_imports: hid (\S+) from (\S+)", done.stdout + done.stderr)
    assert not [h for h in hidden if h[1] in REPOSITORY], hidden  # the repository's imports
    report = json.loads((out / "gpu_check.json").read_text())
    rows = report["rows"]
    assert report["done"] and not [r for r in rows if "error" in r], rows
    denoised = {r["model"] for r in rows if r["part"] == "denoiser" and "p50_ms" in r}
    assert denoised == {"digits-ddpm", "shapes-ldm", "sd1.x-shaped"}
    assert all(r["images_per_s"] > 0 for r in rows if "images_per_s" in r)
    graphs = [r for r in rows if r.get("mode") == "bf16+graphs"]
    assert len(graphs) == 3 and all(r["skipped"] for r in graphs)  # CUDA only
    limits = [r for r in rows if r["part"] == "max batch"]
    assert len(limits) == 3 and all(r["rows"] is None for r in limits)  # the CPU is not probed
    runtimes = {r["mode"].split(" ")[0] for r in rows if r["part"] == "encoder"}
    assert runtimes == {"onnxruntime", "torch"}
    table = (out / "gpu_check.md").read_text()
    assert "| denoiser | sd1.x-shaped | fp32 | 2 |" in table and "- ort_cuda: " in table
    assert "unfinished" not in table and "benchmark: done" in (out / "timing.txt").read_text()


def test_the_import_guard_hides_what_the_device_lacks(tmp_path: Path) -> None:
    """The guard can fail: redis is installed here, not on the device nor among the wheels."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import importlib.metadata, importlib.util\n"
        "assert importlib.util.find_spec('redis') is None\n"
        "try:\n    importlib.metadata.version('redis')\nexcept importlib.metadata.PackageNotFoundError:\n"
        "    print('metadata hidden')\n"
        "import numpy, pydantic\n"  # on the device; carried
        "import redis\n"
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_imports.py"), str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "No module named 'redis'" in done.stderr, done.stderr
    assert "metadata hidden" in done.stdout and "hid redis from __main__" in done.stderr


def test_the_wheel_check_finds_missing_and_clashing_requirements(tmp_path: Path) -> None:
    wanted = {"alpha": "1.0", "beta": "2.0"}
    device = {"numpy": "2.5.2", "zipp": None}
    fake_wheel(tmp_path, "alpha", "1.0", ("beta>=2", "numpy>=2", "zipp", "gamma; extra == 'x'"))
    fake_wheel(tmp_path, "beta", "2.0", ("numpy>=3", "delta; python_version < '3.8'", "epsilon"))
    problems = gpu_packages.check(tmp_path, wanted, device)
    assert problems == [
        "beta needs numpy>=3; the machine would have numpy 2.5.2",
        "beta needs epsilon: neither carried nor on the device",
    ]
    fake_wheel(tmp_path, "beta", "2.1")
    problems = gpu_packages.check(tmp_path, wanted, device)
    assert any("two wheels of beta" in p for p in problems)


def test_the_wheel_and_device_lists_are_well_formed() -> None:
    wanted = gpu_packages.carried_wheels()
    device = gpu_packages.device_packages()
    assert wanted and all(wanted.values()), "every carried wheel is pinned (one version each)"
    assert {"torch", "onnxruntime", "transformers", "numpy"} <= device.keys()
    # carried although the device has it: only for a version the device may lack
    assert wanted.keys() & device.keys() == {"typing-extensions"}


def test_the_scripts_parse_and_name_what_exists() -> None:
    check, wheels = ROOT / "benchmarks" / "gpu_check.sh", ROOT / "benchmarks" / "gpu_wheels.sh"
    for script in (check, wheels):
        subprocess.run(["bash", "-n", str(script)], check=True)
    text = check.read_text()
    assert "benchmarks/bench_gpu.py" in text and (ROOT / "benchmarks" / "bench_gpu.py").exists()
    assert "torch==2.13.0" in text and "cu128" in text  # the venv mode keeps docs/gpu.md's pins
    assert "--no-index" in text and "pip install -q --no-deps -e" not in text
    assert "benchmarks/gpu_wheels.txt" in wheels.read_text()
    assert "/.whl/" in (ROOT / ".gitignore").read_text().splitlines()
