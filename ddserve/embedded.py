"""The whole ddserve stack inside this process: the gateway and worker threads on one in-process
fakeredis server. With the `ddserve` command's modules this is the one place above both the gateway
(`service`) and the workers (`workers`), which never import each other.

- `serve_embedded(settings, threads)`: `ddserve serve` without `DDSERVE_REDIS_URL` (`make serve`).
- Both also run the webhook worker (`service.webhooks.worker.WebhookService`: dispatcher and
  delivery threads) on the same in-process Redis.
- `LocalServer`: for `ddserve generate` without `--url`, notebooks and tests: the gateway app
  (`service.app.create_app`) and batching worker thread(s) (`workers.embedded.start_worker_thread`)
  plus a uvicorn server on a free loopback port in a thread, so a `Client(server.url)` talks to it
  over real HTTP and the signed image links resolve.

    with LocalServer(Settings(models="digits-ddpm")) as server, Client(server.url) as client:
        job = client.generate("digits-ddpm", n=4)

This needs the worker's packages (torch, onnxruntime); they are imported only when a server starts.
Images go to `settings.storage_dir` (local storage); auth follows `settings.auth_enabled`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ddserve.settings import Settings

log = logging.getLogger("ddserve.serve")

STARTUP_TIMEOUT_S = 300.0


class LocalServer:
    """Gateway + worker thread(s) + uvicorn on `host` (a loopback address), port `port` (0 = any
    free one). `start()` returns once the models are loaded and the socket listens."""

    def __init__(
        self,
        settings: Settings,
        *,
        workers: int = 1,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self.settings = settings
        self.workers = max(1, workers)
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.url = ""
        self._handles: list[Any] = []
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._webhooks: Any = None  # service.webhooks.worker.WebhookService

    def start(self) -> LocalServer:
        import fakeredis
        import uvicorn

        from ddserve.storage import ensure_signing_secret
        from service.app import create_app
        from service.webhooks.worker import WebhookService
        from workers.embedded import start_worker_thread

        ensure_signing_secret(self.settings)  # one object shared by the gateway and the workers
        redis_server = fakeredis.FakeServer()
        deadline = time.monotonic() + self.startup_timeout
        try:
            for _ in range(self.workers):
                handle = start_worker_thread(
                    self.settings, fakeredis.FakeRedis(server=redis_server)
                )
                self._handles.append(handle)
            for handle in self._handles:
                if not handle.ready.wait(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError("the worker did not load its models in time")
                if handle.error is not None:
                    raise RuntimeError(f"the worker could not start: {handle.error}") from (
                        handle.error
                    )
            app = create_app(self.settings, fakeredis.FakeRedis(server=redis_server))
            config = uvicorn.Config(
                app, host=self.host, port=self.port, log_config=None, access_log=False
            )
            self._server = uvicorn.Server(config)
            self._thread = threading.Thread(
                target=self._server.run, name="ddserve-local-gateway", daemon=True
            )
            self._thread.start()
            while not self._server.started:
                if not self._thread.is_alive():
                    raise RuntimeError(f"the gateway could not listen on {self.host}:{self.port}")
                if time.monotonic() > deadline:
                    raise RuntimeError("the gateway did not start in time")
                time.sleep(0.02)
            host, port = self._server.servers[0].sockets[0].getsockname()[:2]
            self.url = f"http://{host}:{port}"
            self._webhooks = WebhookService(
                self.settings, fakeredis.FakeRedis(server=redis_server), base_url=self.url
            ).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the gateway, then the workers (warm: held jobs finish)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        for handle in self._handles:
            handle.stop(timeout)
        self._handles.clear()
        if self._webhooks is not None:
            self._webhooks.stop(timeout)
        self._server = self._thread = self._webhooks = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_embedded(settings: Settings, threads: int) -> int:
    """`ddserve serve` in one process: the gateway on uvicorn, `threads` worker threads."""
    import fakeredis
    import uvicorn

    from ddserve.storage import ensure_signing_secret
    from service.app import create_app
    from service.cli import serve_and_announce, uvicorn_options
    from service.webhooks.worker import WebhookService

    try:
        from workers.allocator import retain_freed_memory
        from workers.embedded import start_worker_thread
        from workers.threads import apply_threads
    except ImportError as e:
        log.error("the embedded mode needs the worker package (workers.embedded): %s", e)
        return 1
    if settings.retain_freed_memory:
        retain_freed_memory()  # this process runs the networks too
    apply_threads(settings, embedded=True)
    settings.auth_enabled = False
    ensure_signing_secret(settings)  # shared by the gateway and the worker threads (one object)
    log.warning(
        "embedded mode (no DDSERVE_REDIS_URL): in-process Redis, %d worker thread(s), images under "
        "%s, auth is OFF — do not expose this port",
        threads,
        settings.storage_dir,
    )
    server_state = fakeredis.FakeServer()
    handles = [
        start_worker_thread(settings, fakeredis.FakeRedis(server=server_state))
        for _ in range(max(1, threads))
    ]
    webhooks = WebhookService(settings, fakeredis.FakeRedis(server=server_state)).start()
    try:
        app = create_app(settings, fakeredis.FakeRedis(server=server_state))
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port, **uvicorn_options(settings)
        )
        serve_and_announce(config, settings, handles)
    finally:
        for handle in handles:
            handle.stop()
        webhooks.stop()
    return 0
