"""Connection limits of the gateway's uvicorn server (`service.cli.uvicorn_options`), against a real
uvicorn on a loopback port with the gateway's options: a slowloris client (one header byte a
second) and a client that connects and sends nothing are dropped within the header timeout, an
endless header is answered 431, and normal clients — keep-alive included — are served.

uvicorn with httptools has no header deadline of its own: without `service.http_protocol` the
slowloris connection below stays open for as long as the client keeps dribbling."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from ddserve.settings import Settings
from service.cli import uvicorn_options
from service.http_protocol import GuardedHttpToolsProtocol
from tests.gateway_support import make_app, write_config_zoo

HEADER_TIMEOUT_S = 2.0
MAX_HEADER_BYTES = 8 * 1024


@contextlib.contextmanager
def serving(root: Path, settings: Settings) -> Iterator[int]:
    """The gateway app served by uvicorn with the entry point's options, on a free port."""
    app, _ = make_app(write_config_zoo(root / "zoo"), root)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, **uvicorn_options(settings))
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    settings = Settings(header_timeout_s=HEADER_TIMEOUT_S, max_header_bytes=MAX_HEADER_BYTES)
    with serving(tmp_path_factory.mktemp("limits"), settings) as number:
        yield number


def _closed_after(sock: socket.socket, send: bytes, limit_s: float) -> tuple[float, bytes]:
    """Send `send` one byte a second until the server closes: (seconds until closed, answer)."""
    sock.settimeout(1.0)
    start = time.monotonic()
    answer = b""
    for byte in send:
        try:
            sock.sendall(bytes([byte]))
        except OSError:  # reset by the server
            return time.monotonic() - start, answer
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            chunk = None
        except OSError:
            return time.monotonic() - start, answer
        if chunk == b"":
            return time.monotonic() - start, answer
        if chunk:
            answer += chunk
        if time.monotonic() - start > limit_s:
            break
    pytest.fail(f"connection still open after {time.monotonic() - start:.1f} s")


def test_a_slowloris_client_is_dropped_within_the_header_timeout(port: int) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 60
    with socket.create_connection(("127.0.0.1", port)) as sock:
        elapsed, answer = _closed_after(sock, request, limit_s=HEADER_TIMEOUT_S + 8)
    assert elapsed <= HEADER_TIMEOUT_S + 1.5, elapsed
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_silent_connection_is_dropped_within_the_header_timeout(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(HEADER_TIMEOUT_S + 5)
        start = time.monotonic()
        answer = sock.recv(4096)
        assert sock.recv(4096) == b""  # closed
    assert time.monotonic() - start <= HEADER_TIMEOUT_S + 1.5
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_headers_over_the_limit_are_431(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        # Closed while sending is fine: the answer is still in the socket's receive buffer.
        with contextlib.suppress(OSError):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1024 * 1024))
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431 "), answer


def test_normal_clients_are_served_and_keep_alive_outlives_the_header_timeout(port: int) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        big_but_allowed = {"X-Fill": "a" * (MAX_HEADER_BYTES // 2)}
        assert client.get("/healthz", headers=big_but_allowed).status_code == 200
        # Idle between requests longer than the header timeout: keep-alive governs, not 408.
        time.sleep(HEADER_TIMEOUT_S + 0.5)
        assert client.get("/models").status_code == 200
        assert client.post("/generate", json={"model": "tiny-ddpm"}).status_code == 202


def test_past_the_concurrency_limit_the_answer_is_the_contracts_503(tmp_path: Path) -> None:
    # uvicorn counts the asking connection too: with a limit of 2, one idle connection fills it.
    with serving(tmp_path, Settings(max_concurrency=2)) as number:
        url = f"http://127.0.0.1:{number}/healthz"
        with socket.create_connection(("127.0.0.1", number)):
            time.sleep(0.2)  # the server has registered the idle connection
            answer = httpx.get(url)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert answer.headers["connection"] == "close"
        assert answer.json()["error"]["code"] == "overloaded"
        assert httpx.get(url).status_code == 200  # the idle connection is gone


def test_the_entry_point_applies_the_settings() -> None:
    settings = Settings(keep_alive_s=30, max_concurrency=0, max_header_bytes=1000)
    options = uvicorn_options(settings)
    config = uvicorn.Config(lambda *_: None, **options)
    config.load()
    assert config.timeout_keep_alive == 30 and config.limit_concurrency is None
    assert config.h11_max_incomplete_event_size == 1000
    protocol = config.http_protocol_class
    assert protocol.func is GuardedHttpToolsProtocol
    assert protocol.keywords == {"header_timeout_s": 10.0, "max_header_bytes": 1000}
    assert uvicorn_options(Settings())["limit_concurrency"] == 1000


def test_settings_refuse_nonsense_limits() -> None:
    for bad in ({"header_timeout_s": 0}, {"max_header_bytes": 0}, {"max_concurrency": -1}):
        with pytest.raises(ValueError):
            Settings(**bad)
