"""`ddserve serve`'s startup banner (the URL and a curl command to paste) comes only once the
embedded worker threads have loaded their models: before, a request pasted from it waited in the
queue for the models, and the README's first curl looked slow. A real uvicorn server on a free
loopback port; the worker handle's readiness is set by the test."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import uvicorn

from ddserve.settings import Settings
from service.cli import _serve, uvicorn_options
from workers.embedded import WorkerHandle


async def _app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _wait(condition, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("fails", [False, True])
def test_the_banner_waits_for_the_embedded_workers(
    caplog: pytest.LogCaptureFixture, fails: bool
) -> None:
    settings = Settings(port=0, auth_enabled=False)
    server = uvicorn.Server(
        uvicorn.Config(_app, host="127.0.0.1", port=0, lifespan="off", **uvicorn_options(settings))
    )
    handle = WorkerHandle(thread=threading.Thread(target=lambda: None))
    runner = threading.Thread(
        target=lambda: asyncio.run(_serve(server, settings, [handle])), daemon=True
    )
    with caplog.at_level(logging.INFO, logger="ddserve.serve"):
        runner.start()
        try:
            _wait(lambda: server.started)
            _wait(lambda: "loading the models" in caplog.text)
            time.sleep(0.5)
            assert "listening on" not in caplog.text  # the port is open, the models are not in
            if fails:
                handle.error = RuntimeError("no weights")
            handle.ready.set()
            _wait(lambda: "listening on" in caplog.text)
            assert ("could not start (no weights)" in caplog.text) is fails
        finally:
            server.should_exit = True
            runner.join(10)
