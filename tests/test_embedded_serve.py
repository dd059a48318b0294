"""`make serve` from a clean clone: the embedded mode starts (no Redis URL, in-process fakeredis and
worker thread, local storage under ./var, auth off) and the curl command its log prints serves a
request.

The clone is of the committed tree (`git clone` of this repository: no untracked files, no var/,
no .env). Installing packages needs the network, so the clone's `.venv` is provisioned the way
`make` would leave it, without pip: a bare venv whose path points at the clone's sources and at
this checkout's installed packages, the `ddserve` console script, and the `.installed` stamp that
tells make the install step is done. Everything else — the Makefile target, the CLI, the embedded
wiring and the startup banner — runs as a user would run it. The zoo is a tiny random model
(DDSERVE_ZOO_DIR) so the test stays fast."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.tiny_zoo import write_diffusion_model

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 120


def provision_venv(clone: Path) -> None:
    """The clone's .venv as `make` leaves it, but linked to this checkout's packages."""
    venv = clone / ".venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(venv)], check=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    packages = venv / "lib" / version / "site-packages"
    # Plain path lines: the clone's sources first; the .pth files of our site-packages (our
    # editable install of /work/main) are not processed, so the clone's code is what runs.
    (packages / "clone.pth").write_text(f"{clone}\n{site.getsitepackages()[0]}\n")
    script = venv / "bin" / "ddserve"
    script.write_text(
        f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom ddserve.cli import main\nsys.exit(main())\n"
    )
    script.chmod(0o755)
    stamp = venv / ".installed"
    stamp.touch()
    later = (clone / "pyproject.toml").stat().st_mtime + 10
    os.utime(stamp, (later, later))


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("curl") is None, reason="no make")
def test_make_serve_from_a_clean_clone(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    assert not (clone / "var").exists() and not (clone / ".venv").exists()
    provision_venv(clone)
    zoo = tmp_path / "zoo"
    write_diffusion_model(zoo, "tiny-ddpm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDSERVE_")}
    env.update(
        DDSERVE_ZOO_DIR=str(zoo), DDSERVE_PORT="0", DDSERVE_DEVICE="cpu", OMP_NUM_THREADS="1"
    )
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            ["make", "serve"],
            cwd=clone,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, ended below by its id
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        command = url = None
        while time.monotonic() < deadline and process.poll() is None:
            text = log_path.read_text()
            found = re.search(r"listening on (http://\S+) .*\n\s+try:\s+(curl .+)\n", text)
            if found:
                url, command = found.group(1), found.group(2)
                break
            time.sleep(0.2)
        text = log_path.read_text()
        assert command is not None, f"no URL and curl command in the log:\n{text}"
        assert "auth is OFF" in text and "embedded mode" in text
        # The printed command, pasted into a shell, gets the finished job (Prefer: wait=60).
        answer = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=90, check=True
        )
        job = json.loads(answer.stdout)
        assert job["status"] == "succeeded", job
        image = job["output"]["images"][0]
        assert image["url"].startswith(f"{url}/images/")
        picture = httpx.get(image["url"], timeout=30)
        assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")
        assert list((clone / "var" / "images" / job["id"]).glob("*.png"))  # under ./var
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
