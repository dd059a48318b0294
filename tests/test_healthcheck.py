"""`python -m ddserve.healthcheck` (the gateway container's health check) against a local HTTP
server that answers 200, then 503, then nothing."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from ddserve.healthcheck import check, healthz_url
from ddserve.settings import Settings


class _Healthz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:  # keep the test output quiet
        pass


@pytest.fixture
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    handler = type("Handler", (_Healthz,), {"status": 200})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_url_follows_the_settings() -> None:
    assert healthz_url(Settings(host="0.0.0.0", port=8123)) == "http://127.0.0.1:8123/healthz"
    assert healthz_url(Settings(host="10.1.2.3", port=80)) == "http://10.1.2.3:80/healthz"
    assert healthz_url(Settings(host="::", port=80)) == "http://127.0.0.1:80/healthz"
    assert healthz_url(Settings(host="::1", port=80)) == "http://[::1]:80/healthz"


def test_healthy_only_on_200(server: http.server.ThreadingHTTPServer) -> None:
    port = server.server_address[1]
    url = f"http://127.0.0.1:{port}/healthz"
    assert check(url, 2.0) == (True, f"{url}: HTTP 200")
    server.RequestHandlerClass.status = 503  # type: ignore[attr-defined]
    assert check(url, 2.0) == (False, f"{url}: HTTP 503")


def test_command_exit_status(server: http.server.ThreadingHTTPServer) -> None:
    port = server.server_address[1]
    env = {"DDSERVE_HOST": "0.0.0.0", "DDSERVE_PORT": str(port), "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "ddserve.healthcheck"]
    assert subprocess.run(command, env=env, capture_output=True, timeout=30).returncode == 0
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        env["DDSERVE_PORT"] = str(probe.getsockname()[1])
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and "refused" in refused.stderr.lower()


def test_worker_probe_follows_the_workers_heartbeat() -> None:
    """`--worker NAME` (the worker pods' exec probes): healthy while the worker's RQ registration
    has a recent heartbeat; not when it is old or gone; a Redis that does not answer fails the
    readiness probe but not the liveness one."""
    import uuid
    from datetime import UTC, datetime, timedelta

    from rq import Queue, Worker
    from rq.utils import utcformat

    from ddserve.healthcheck import check_worker
    from tests.redis_sandbox import REDIS_URL, redis_or_skip

    connection = redis_or_skip()
    name = f"ddtest-probe-{uuid.uuid4().hex[:10]}"
    queue = Queue(f"ddtest-probe-{name}", connection=connection)
    worker = Worker([queue], connection=connection, name=name)
    worker.register_birth()
    try:
        worker.heartbeat()
        assert check_worker(REDIS_URL, name, 60, 3, liveness=False)[0]
        stale = utcformat(datetime.now(UTC) - timedelta(seconds=120))
        connection.hset(worker.key, "last_heartbeat", stale)
        healthy, seen = check_worker(REDIS_URL, name, 60, 3, liveness=True)
        assert not healthy and "last heartbeat 1" in seen
        assert not check_worker(REDIS_URL, "no-such-worker-" + name, 60, 3, liveness=True)[0]
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            down = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"
        assert check_worker(down, name, 60, 1, liveness=True)[0]
        assert not check_worker(down, name, 60, 1, liveness=False)[0]
    finally:
        worker.register_death()
        connection.delete(worker.key)
