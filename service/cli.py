"""The gateway's server: uvicorn options, the startup banner, and the gateway mode of `ddserve serve`.

`ddserve serve` itself is `ddserve.serve` (above the gateway and the workers, since its embedded
mode runs both). With `DDSERVE_REDIS_URL` set it calls `run_gateway` here: the gateway only
(workers run apart: `ddserve worker`); `--workers N` starts N gateway processes (uvicorn), which
then share one signing secret. Either way the log prints the URL and a curl command to paste once
the server listens (`serve_and_announce`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import shlex
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import uvicorn

from ddserve.settings import Settings
from models.catalog import ModelEntry, load_catalog
from service.http_protocol import guarded_protocol


class StartingWorker(Protocol):
    """A worker loading its models beside the gateway (the embedded mode's threads): `ready` is
    set once it has loaded them or failed, `error` says why it failed."""

    ready: threading.Event
    error: BaseException | None


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

    catalog = load_catalog(settings.model_repository())
    return catalog, served_models(settings, catalog)


async def _serve(
    server: uvicorn.Server, settings: Settings, workers: Sequence[StartingWorker] = ()
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


def serve_and_announce(
    config: uvicorn.Config, settings: Settings, workers: Sequence[StartingWorker] = ()
) -> None:
    """Serve on uvicorn's event loop of choice (uvloop when installed), as `Server.run` would."""
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(_serve(uvicorn.Server(config), settings, workers))


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
    serve_and_announce(config, settings)
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
