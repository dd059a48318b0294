"""`benchmarks/gpu_check.sh` must run unattended on the first CUDA machine it meets: its benchmark
runs here on the CPU in its smallest form (every part of the table present), and the script parses
and names files that exist."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_runs_every_part_on_the_cpu(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    from benchmarks import bench_gpu

    out = tmp_path / "gpu.json"
    quick = ["--device", "cpu", "--quick", "--modes", "fp32", "--batches", "2", "--calls", "1"]
    rows = bench_gpu.main([*quick, "--threads", "1", "--json", str(out)])
    denoised = {r["model"] for r in rows if r["part"] == "denoiser" and "p50_ms" in r}
    assert denoised == {"digits-ddpm", "shapes-ldm", "sd1.x-shaped"}
    assert all(r["images_per_s"] > 0 for r in rows if "images_per_s" in r)
    limits = [r for r in rows if r["part"] == "max batch"]
    assert len(limits) == 3 and all(r["rows"] is None for r in limits)  # the CPU is not probed
    runtimes = {r["mode"].split(" ")[0] for r in rows if r["part"] == "encoder"}
    assert runtimes == {"onnxruntime", "torch"}
    assert out.exists() and "| denoiser | sd1.x-shaped | fp32 | 2 |" in bench_gpu.table(rows)


def test_gpu_check_script_parses_and_names_what_exists() -> None:
    script = ROOT / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "benchmarks/bench_gpu.py" in text and (ROOT / "benchmarks" / "bench_gpu.py").exists()
    assert "torch==2.13.0" in text and "cu128" in text  # the pins of docs/gpu.md
