"""The gateway drains on SIGTERM: it stops accepting connections, answers the requests it holds
(`Prefer: wait` long polls) and exits within DDSERVE_GRACEFUL_SHUTDOWN_S, which the compose
stop_grace_period and the pod's terminationGracePeriodSeconds cover (tests/test_deploy.py).

`ddserve serve` runs as a subprocess in gateway mode on the machine's Redis (a key prefix of its
own, deleted afterwards), with no worker, so a held wait lasts until its `Prefer: wait` expires.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ddserve.settings import Settings
from service.cli import uvicorn_options
from tests.gateway_support import write_config_zoo
from tests.redis_sandbox import REDIS_URL, redis_or_skip

ROOT = Path(__file__).resolve().parents[1]
KEY = "shutdown-test-key"
GEN = {"model": "tiny-ddpm", "class_label": 1, "seed": 1}

pytestmark = pytest.mark.timeout(120)


def test_uvicorn_gets_the_graceful_shutdown_bound_of_the_settings() -> None:
    options = uvicorn_options(Settings(graceful_shutdown_s=7.5))
    assert options["timeout_graceful_shutdown"] == 7.5
    assert Settings().graceful_shutdown_s > Settings().max_wait_s  # a full wait fits


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Any]:
    """A factory: start(graceful_shutdown_s) → (process, base URL); every process and Redis key
    is cleaned up at the end."""
    connection = redis_or_skip()
    prefix = f"ddtest-shutdown-{uuid.uuid4().hex[:8]}"
    zoo = write_config_zoo(tmp_path / "zoo")
    processes: list[subprocess.Popen[bytes]] = []

    def start(graceful_shutdown_s: float) -> tuple[subprocess.Popen[bytes], str]:
        port = _free_port()
        env = {
            **os.environ,
            "DDSERVE_ENV_FILE": "",
            "DDSERVE_REDIS_URL": REDIS_URL,
            "DDSERVE_KEY_PREFIX": prefix,
            "DDSERVE_ZOO_DIR": str(zoo),
            "DDSERVE_HOST": "127.0.0.1",
            "DDSERVE_PORT": str(port),
            "DDSERVE_API_KEYS": hashlib.sha256(KEY.encode()).hexdigest(),
            "DDSERVE_STORAGE_DIR": str(tmp_path / "images"),
            "DDSERVE_GRACEFUL_SHUTDOWN_S": str(graceful_shutdown_s),
            "PYTHONPATH": str(ROOT),
        }
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from ddserve.cli import main; raise SystemExit(main())",
                "serve",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, "the gateway exited at start"
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return process, url
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.1)

    try:
        yield start
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        keys = list(connection.scan_iter(f"*{prefix}*"))
        job_ids = [k.decode().rsplit(":", 1)[1] for k in keys if k.startswith(b"rq:queue:")]
        for key in keys:
            if connection.type(key) == b"list":
                job_ids += [j.decode() for j in connection.lrange(key, 0, -1)]
        for key in keys + [f"rq:job:{j}".encode() for j in job_ids]:
            connection.delete(key)


def _held_wait(url: str, wait_s: int, answer: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        started = time.monotonic()
        try:
            response = httpx.post(
                f"{url}/generate",
                json=GEN,
                headers={"Authorization": f"Bearer {KEY}", "Prefer": f"wait={wait_s}"},
                timeout=30,
            )
            answer["status"], answer["text"] = response.status_code, response.text
            answer["body"] = response.json()
        except (httpx.HTTPError, ValueError) as e:
            answer["error"] = repr(e)
        answer["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_for_job(url: str) -> None:
    """Until the held request's job is enqueued (the wait has begun)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        if 'ddserve_queue_depth{model="tiny-ddpm"} 1.0' in metrics:
            return
        time.sleep(0.05)
    raise AssertionError("the job of the held request was not enqueued")


def test_sigterm_answers_a_held_wait_and_refuses_new_connections(gateway: Any) -> None:
    process, url = gateway(30.0)
    answer: dict[str, Any] = {}
    thread = _held_wait(url, 3, answer)
    _wait_for_job(url)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.ConnectError):  # no longer listening
        httpx.get(f"{url}/healthz", timeout=2)
    thread.join(15)
    assert "error" not in answer, answer
    assert answer["status"] == 202 and answer["body"]["status"] == "queued", answer
    assert answer["seconds"] >= 2.5  # held for its whole wait, not cut at the signal
    # uvicorn re-raises the signal it caught once it has shut down: ended by SIGTERM, as asked.
    assert process.wait(10) in (0, -signal.SIGTERM)


def test_sigterm_ends_within_the_graceful_shutdown_bound(gateway: Any) -> None:
    """A request held longer than DDSERVE_GRACEFUL_SHUTDOWN_S does not keep the process alive
    (uvicorn's default waits for it for ever, until the orchestrator's SIGKILL)."""
    process, url = gateway(1.0)
    answer: dict[str, Any] = {}
    thread = _held_wait(url, 20, answer)
    _wait_for_job(url)
    signaled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(10)
    assert time.monotonic() - signaled < 6, "the gateway outlived its graceful shutdown bound"
    thread.join(15)
    assert answer["seconds"] < 15, answer  # the client is not left hanging either
