"""`ddserve serve`: the gateway, embedded (no Redis needed) or in front of a real Redis.

- `DDSERVE_REDIS_URL` unset — the embedded mode: an in-process fakeredis server shared by the
  gateway and `--workers` worker threads (`workers.embedded.start_worker_thread`), local image
  storage under `./var`, auth off (logged), every zoo model. The same code paths as production, in
  one process: `make serve`.
- `DDSERVE_REDIS_URL` set — the gateway only (workers run apart: `ddserve worker`); `--workers N`
  starts N gateway processes (uvicorn), which then share one signing secret.

Either way the log prints the URL and a curl command to paste once the server listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import uvicorn

from ddserve.settings import Settings
from ddserve.storage import ensure_signing_secret
from models.catalog import ModelEntry, load_catalog
from service.http_protocol import guarded_protocol
from service.logs import configure_logging

if TYPE_CHECKING:  # the gateway-only mode never imports the worker package
    from workers.embedded import WorkerHandle

log = logging.getLogger("ddserve.serve")


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for the gateway, with the connection limits of `settings`.

    Our access log (with request ids) replaces uvicorn's. Keep-alive outlives a client's or load
    balancer's idle pool (uvicorn's 5 s default races clients that expire theirs at 5 s too). The
    HTTP protocol is uvicorn's httptools one with a header deadline and size cap
    (`service.http_protocol`): uvicorn has neither, so a slowloris client held its connection for
    ever. `h11_max_incomplete_event_size` bounds the same when h11 is chosen instead.
    On SIGTERM uvicorn stops listening, closes idle connections and waits for the requests in
    flight: by default for ever (`timeout_graceful_shutdown=None`), so a stuck request would hold
    the process until the orchestrator kills it and every held `Prefer: wait` with it. Bounded by
    `graceful_shutdown_s` (above `max_wait_s`), the held waits are answered and the process exits
    before Docker's stop_grace_period or Kubernetes' terminationGracePeriodSeconds run out.
    """
    return {
        "log_config": None,
        "access_log": False,
        "http": guarded_protocol(settings),
        "timeout_keep_alive": settings.keep_alive_s,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "limit_concurrency": settings.max_concurrency or None,
        "timeout_graceful_shutdown": settings.graceful_shutdown_s,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="bind address (default: DDSERVE_HOST)")
    parser.add_argument(
        "--port", type=int, default=None, help="port, 0 = any free one (default: DDSERVE_PORT)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="embedded mode: worker threads; with DDSERVE_REDIS_URL: gateway processes",
    )


def example_request(
    catalog: dict[str, ModelEntry], served: list[str]
) -> tuple[str, dict[str, Any]]:
    """A request that works on the served models: (route, body). A diffusion model's if one is
    served (the zoo's first generating model is an adversarial autoencoder, a less telling demo)."""
    generating = [name for name in served if "generate" in catalog[name].tasks]
    generating.sort(key=lambda name: catalog[name].schedule is None)  # stable: diffusion first
    for name in generating:
        entry = catalog[name]
        body: dict[str, Any] = {"model": name, "n": 4, "seed": 1234}
        cond = entry.conditioning
        if cond is not None and cond.type == "class" and cond.classes:
            body["class_label"] = min(7, len(cond.classes) - 1)
        elif (
            cond is not None
            and cond.type == "text"
            and cond.vocabulary
            and len(cond.vocabulary) > 2
        ):
            body["prompt"] = f"{cond.vocabulary[1]} {cond.vocabulary[-1]}"
        return "/generate", body
    return "/models", {}


def banner(url: str, settings: Settings, route: str, body: dict[str, Any]) -> str:
    """The startup message: where the gateway listens and a command to paste."""
    auth = "" if not settings.auth_enabled else " -H 'Authorization: Bearer $DDSERVE_KEY'"
    if body:
        command = (
            f"curl -s -X POST {url}{route} -H 'Content-Type: application/json' "
            f"-H 'Prefer: wait=60'{auth} -d {shlex.quote(json.dumps(body))}"
        )
    else:
        command = f"curl -s {url}{route}{auth}"
    return (
        f"ddserve is listening on {url} (API docs: {url}/docs)\n"
        f"  try:  {command}\n"
        f"  then open the image URLs of the answer, or poll GET {url}/jobs/<id>"
    )


def _served(settings: Settings) -> tuple[dict[str, ModelEntry], list[str]]:
    from service.app import served_models

    catalog = load_catalog(settings.zoo_dir)
    return catalog, served_models(settings, catalog)


async def _serve(
    server: uvicorn.Server, settings: Settings, workers: Sequence[WorkerHandle] = ()
) -> None:
    """Run uvicorn and log the banner once its socket is bound (the real port when --port 0) and
    the embedded `workers` have loaded their models: a request pasted from the banner then starts
    at once, instead of waiting in the queue for the models (seconds; more on a cold disk)."""
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started and workers:
        log.info("loading the models in %d worker thread(s) …", len(workers))
        for handle in workers:
            await asyncio.to_thread(handle.ready.wait)
        failed = [handle.error for handle in workers if handle.error is not None]
        if failed:
            log.error(
                "a worker thread could not start (%s): jobs will wait in their queues", failed[0]
            )
    if server.started and not task.done():
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        catalog, served = _served(settings)
        route, body = example_request(catalog, served)
        log.info(banner(f"http://{shown}:{port}", settings, route, body))
    await task


def _run(config: uvicorn.Config, settings: Settings, workers: Sequence[WorkerHandle] = ()) -> None:
    """Serve on uvicorn's event loop of choice (uvloop when installed), as `Server.run` would."""
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(_serve(uvicorn.Server(config), settings, workers))


def run_embedded(settings: Settings, threads: int) -> int:
    import fakeredis

    from service.app import create_app

    try:
        from workers.allocator import retain_freed_memory
        from workers.embedded import start_worker_thread
    except ImportError as e:
        log.error("the embedded mode needs the worker package (workers.embedded): %s", e)
        return 1
    if settings.retain_freed_memory:
        retain_freed_memory()  # this process runs the networks too
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
    try:
        app = create_app(settings, fakeredis.FakeRedis(server=server_state))
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port, **uvicorn_options(settings)
        )
        _run(config, settings, handles)
    finally:
        for handle in handles:
            handle.stop()
    return 0


def run_gateway(settings: Settings, processes: int) -> int:
    from service.app import create_app

    if settings.storage == "local" and not settings.signing_secret:
        # One secret for every gateway process of this run (they inherit the environment).
        settings.signing_secret = secrets.token_urlsafe(32)
        os.environ["DDSERVE_SIGNING_SECRET"] = settings.signing_secret
        log.warning("DDSERVE_SIGNING_SECRET is unset: image links will not survive a restart")
    log.info("gateway mode: Redis at %s; workers run apart (ddserve worker)", _redact(settings))
    if processes > 1:
        os.environ["DDSERVE_HOST"], os.environ["DDSERVE_PORT"] = settings.host, str(settings.port)
        log.info("%d gateway processes on http://%s:%d", processes, settings.host, settings.port)
        uvicorn.run(
            "service.app:app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=processes,
            **uvicorn_options(settings),
        )
        return 0
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, **uvicorn_options(settings)
    )
    _run(config, settings)
    return 0


def _redact(settings: Settings) -> str:
    """The Redis URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(settings.redis_url or "")
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (
            f":{parts.port}" if parts.port else ""
        )
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def run(args: argparse.Namespace) -> int:
    settings = Settings()
    if args.host is not None:
        settings.host = args.host
    if args.port is not None:
        settings.port = args.port
    configure_logging(settings.log_level, settings.log_json)
    if settings.embedded:
        return run_embedded(settings, args.workers)
    return run_gateway(settings, args.workers)
