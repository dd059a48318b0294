"""docker-compose.yml's own commands, run locally (these machines have no Docker engine), serve a
request end to end: the compose file's commands are the ones that work.

The services are started from the compose file as docker compose would start them, with
.env.example as the `.env`, except for what only containers have:
- every compose address becomes a loopback one (`@redis:6379`, `minio:9000`, the published
  `localhost:9000`, the gateway's bind address and port);
- MinIO and its bucket-creating one-shot are replaced by moto's S3 server and the same bucket;
- the zoo is a temporary one with a tiny model, mounted as the README says (DDSERVE_ZOO_DIR);
- the GPU worker's service runs as its `cpu` profile twin (same command, DDSERVE_DEVICE=cpu).

Redis runs from the compose command (AOF on) on its own port and directory, so the test shares
nothing with the machine's Redis. One POST /generate with `Prefer: wait` must come back finished,
with image links that open, under the request id the client sent; the worker's JSON log lines of
that job must carry the same request id; /metrics must name the issue's metrics.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.compose import ENV_EXAMPLE, load_compose, read_env_file, service_environment

VENV_BIN = Path(sys.executable).parent
# What the test chooses in place of .env's values: a lighter gateway, still several processes.
TEST_OVERRIDES = {"GATEWAY_PROCESSES": "2"}
API_KEY = "change-me"  # the demo key of .env.example
MODEL = "tiny-ddpm"

pytestmark = [
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
    pytest.mark.timeout(180),
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Stack:
    """The running services: processes by compose service name, their log files, the gateway."""

    root: Path
    gateway_url: str = ""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    environments: dict[str, dict[str, str]] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], env: Mapping[str, str]) -> None:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        self.environments[name] = dict(env)
        with log.open("wb") as out:
            self.processes[name] = subprocess.Popen(
                argv,
                env=dict(env),
                cwd=self.root,  # like the images' WORKDIR: no stray .env is read
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: uvicorn's children stop with it
            )

    def log_text(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def assert_running(self) -> None:
        for name, process in self.processes.items():
            assert process.poll() is None, f"{name} exited:\n{self.log_text(name)[-4000:]}"

    def stop(self) -> None:
        """In reverse start order (Redis last: a stopping worker still finishes through it), SIGTERM
        each process group (a warm shutdown), and SIGKILL one that outlives its grace period."""
        for process in reversed(self.processes.values()):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def _loopback(value: str, addresses: Mapping[str, str]) -> str:
    for address, local in addresses.items():
        value = value.replace(address, local)
    return value


def _container_env(
    service: Mapping[str, Any], dotenv: Mapping[str, str], addresses: Mapping[str, str]
) -> dict[str, str]:
    """The service's container environment with loopback addresses, on this machine's PATH."""
    env = {
        key: _loopback(value, addresses)
        for key, value in service_environment(service, {".env": dotenv}).items()
    }
    return {"PATH": f"{VENV_BIN}{os.pathsep}/usr/bin:/bin", "HOME": "/tmp", **env}


def _wait_until(ready: Any, what: str, stack: Stack, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stack.assert_running()
        if ready():
            return
        time.sleep(0.25)
    raise AssertionError(f"{what}: not ready after {timeout_s} s")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from moto.server import ThreadedMotoServer
    from redis import Redis

    from tests.tiny_zoo import write_diffusion_model

    root = tmp_path_factory.mktemp("compose")
    zoo = root / "zoo"
    write_diffusion_model(zoo, MODEL)

    dotenv = read_env_file(ENV_EXAMPLE) | TEST_OVERRIDES
    services = load_compose(dotenv)["services"]

    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    s3_address = f"127.0.0.1:{s3.get_host_and_port()[1]}"
    redis_port, gateway_port = _free_port(), _free_port()
    addresses = {
        "@redis:6379": f"@127.0.0.1:{redis_port}",  # redis://:<REDIS_PASSWORD>@redis:6379/0
        "//minio:9000": f"//{s3_address}",
        "//localhost:9000": f"//{s3_address}",  # MinIO's published port: the image links
        "0.0.0.0": "127.0.0.1",
    }
    stack = Stack(root)
    try:
        # redis: the compose command, on a loopback port and a directory of its own.
        argv = [*services["redis"]["command"], "--port", str(redis_port), "--bind", "127.0.0.1"]
        stack.start("redis", [*argv, "--dir", str(root)], {"PATH": "/usr/bin:/bin"})
        connection = Redis(port=redis_port, password=dotenv["REDIS_PASSWORD"])

        def redis_answers() -> bool:
            try:
                return bool(connection.ping())
            except OSError:
                return False

        _wait_until(redis_answers, "redis", stack)
        assert connection.config_get("appendonly") == {"appendonly": "yes"}
        assert connection.config_get("requirepass")["requirepass"]  # no client gets in without

        # minio-init: the bucket the compose one-shot creates, with its credentials.
        init = service_environment(services["minio-init"], {})
        _make_bucket(f"http://{s3_address}", init)

        # gateway and worker: the compose commands and environments.
        gateway = services["gateway"]
        env = _container_env(gateway, dotenv, addresses)
        (published,) = gateway["ports"]
        assert str(published).rsplit(":", 1)[1] == env["DDSERVE_PORT"]
        env |= {"DDSERVE_PORT": str(gateway_port), "DDSERVE_ZOO_DIR": str(zoo)}
        stack.start("gateway", gateway["command"], env)
        stack.gateway_url = f"http://127.0.0.1:{gateway_port}"

        worker = services["worker-cpu"]
        assert worker["command"] == services["worker"]["command"]
        env = _container_env(worker, dotenv, addresses) | {"DDSERVE_ZOO_DIR": str(zoo)}
        stack.start("worker", worker["command"], env)

        # The gateway is up when its compose health check says so.
        check = gateway["healthcheck"]["test"]
        assert check[0] == "CMD"
        gateway_env = stack.environments["gateway"]

        def healthy() -> bool:
            return subprocess.run(check[1:], env=gateway_env, cwd=root, timeout=30).returncode == 0

        _wait_until(healthy, "gateway health check", stack)
        yield stack
    finally:
        stack.stop()
        s3.stop()
    for name, process in stack.processes.items():  # a clean shutdown, not a crash or a kill
        assert process.returncode == 0, (
            f"{name} exited {process.returncode}:\n{stack.log_text(name)[-3000:]}"
        )


def _make_bucket(endpoint: str, init_env: Mapping[str, str]) -> None:
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=init_env["MINIO_ROOT_USER"],
        aws_secret_access_key=init_env["MINIO_ROOT_PASSWORD"],
    ).create_bucket(Bucket=init_env["BUCKET"])


def _json_lines(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def test_one_request_through_the_compose_stack(stack: Stack) -> None:
    request_id = f"compose-stack-{os.getpid()}"
    answer = httpx.post(
        f"{stack.gateway_url}/generate",
        json={"model": MODEL, "n": 2, "num_inference_steps": 3, "class_label": 3, "seed": 11},
        headers={
            "Authorization": f"Bearer {API_KEY}",
            "Prefer": "wait=30",
            "X-Request-ID": request_id,
        },
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-request-id"] == request_id
    job = answer.json()
    assert job["status"] == "succeeded", job
    images = job["output"]["images"]
    assert len(images) == 2
    s3_public = stack.environments["gateway"]["DDSERVE_S3_PUBLIC_URL"]
    for image in images:
        assert image["url"].startswith(s3_public + "/")  # presigned on the published address
        png = httpx.get(image["url"], timeout=10)
        assert png.status_code == 200
        assert Image.open(io.BytesIO(png.content)).size == (8, 8)

    # The request id travelled from the gateway into the job and the worker's log lines.
    worker_records = _json_lines(stack.log_text("worker"))
    assert worker_records, "the worker logs JSON lines (DDSERVE_LOG_JSON=true)"
    mentions = [r for r in worker_records if r.get("request_id") == request_id]
    assert mentions, "no worker log line carries the request id"
    assert any(job["id"] in json.dumps(r) for r in mentions)
    gateway_records = _json_lines(stack.log_text("gateway"))
    assert any(r.get("request_id") == request_id for r in gateway_records)


def test_metrics_name_what_the_issue_asks_for(stack: Stack) -> None:
    """The first scrape after the job claims it (the gateway's completion sweep), whichever of the
    gateway processes answers: its observations are in this one answer."""
    key = read_env_file(ENV_EXAMPLE)["PROMETHEUS_API_KEY"]  # what Prometheus sends
    answer = httpx.get(
        f"{stack.gateway_url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert answer.status_code == 200
    families = {line.split()[2] for line in answer.text.splitlines() if line.startswith("# TYPE")}
    expected = {
        "ddserve_requests_total",  # requests by route and status
        "ddserve_jobs",  # jobs by status
        "ddserve_queue_depth",  # queue depth per model
        "ddserve_workers_alive",  # worker liveness
        "ddserve_queue_duration_seconds",  # queue time
        "ddserve_compute_duration_seconds",  # run time
        "ddserve_images_generated_total",  # images generated
        "ddserve_batch_size",  # images per network call
        "ddserve_steps_per_second",  # denoising speed
    }
    assert expected <= families, f"missing: {sorted(expected - families)}"
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in answer.text.splitlines()
        if line and not line.startswith("#")
    }
    model = f'{{model="{MODEL}"}}'
    assert samples[f"ddserve_workers_alive{model}"] == 1
    assert samples[f"ddserve_images_generated_total{model}"] == 2
    assert samples[f"ddserve_batch_size_count{model}"] == 1
    assert samples[f"ddserve_steps_per_second_count{model}"] == 1
    assert samples[f"ddserve_compute_duration_seconds_count{model}"] == 1
    assert samples['ddserve_jobs{status="succeeded"}'] == 1
