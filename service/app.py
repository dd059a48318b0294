"""The gateway: `create_app(settings, connection)` builds one FastAPI app with its own state.

- `settings`: every knob (`ddserve.settings.Settings`);
- `connection`: a synchronous `redis.Redis` (bytes, as RQ needs). None = from `settings.redis_url`,
  or, in the embedded mode (no URL), a fresh in-process fakeredis server — `ddserve serve` passes the
  one it shares with its worker thread.

The app never imports torch or onnxruntime: it sees models only through `models.catalog`.
`app_from_env()` is the factory for `uvicorn --factory` (one app per server process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis
from anyio import to_thread
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline

from ddserve.logs import configure_logging
from ddserve.settings import Settings
from ddserve.storage import Storage, create_storage
from models.catalog import load_catalog
from service.auth import KeyRing, load_keys
from service.dependencies import AppState
from service.errors import install_error_handlers
from service.event_hub import EventHub
from service.idempotency import IdempotencyStore
from service.janitor import Janitor
from service.jobstore import JobStore
from service.middleware import RequestContextMiddleware
from service.normalize import RequestNormalizer
from service.ratelimit import RateLimiter
from service.routers import (
    autoencoder,
    generate,
    health,
    images,
    job_events,
    jobs,
    metrics,
    models,
    openai_images,
    playground,
)
from service.telemetry import Telemetry
from service.uploads import UploadLimits
from service.waiter import JobWaiter
from service.webhooks.targets import WebhookTargets

log = logging.getLogger("ddserve.service")
METRICS_FLUSH_S = 1.0  # how often each process adds its request counts to Redis
DOCS_ASSETS = "/docs-assets"  # Swagger UI's and ReDoc's JavaScript, CSS and icon

DESCRIPTION = """Generative image models behind a job queue.

Every model call is a job: `POST` a request, get `202` and the job (`Location: /jobs/{id}`), poll
`GET /jobs/{id}` or send `Prefer: wait=N`. Errors are `{"error": {"type", "code", "message",
"param"}}`. With auth on, send `Authorization: Bearer <api key>`.
"""


def connect(settings: Settings) -> redis.Redis:
    """The Redis connection the gateway uses: short timeouts, so an outage is a quick 503."""
    if settings.redis_url is None:
        import fakeredis

        return fakeredis.FakeRedis(server=fakeredis.FakeServer())
    return redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        health_check_interval=30,
    )


def served_models(settings: Settings, catalog: dict[str, Any]) -> list[str]:
    """`settings.models` (each must exist), else every zoo model that takes jobs."""
    names = settings.model_names()
    if names:
        unknown = [n for n in names if n not in catalog]
        if unknown:
            raise ValueError(
                f"DDSERVE_MODELS names models not in the model repository "
                f"({', '.join(map(str, settings.model_repository()))}): {', '.join(unknown)}"
            )
        return names
    return [name for name, entry in catalog.items() if entry.tasks]


def build_state(
    settings: Settings, connection: redis.Redis, storage: Storage | None = None
) -> AppState:
    catalog = load_catalog(settings.model_repository())
    served = served_models(settings, catalog)
    keyring = KeyRing(load_keys(settings.api_keys, settings.api_keys_file))
    if settings.auth_enabled and not len(keyring):
        log.warning("auth is on and no API keys are configured: every request will get a 401")
    store = JobStore(connection, settings, served)
    return AppState(
        settings=settings,
        connection=connection,
        catalog=catalog,
        served=served,
        normalizer=RequestNormalizer(
            catalog,
            set(served),
            UploadLimits(settings.max_image_bytes, settings.max_image_pixels),
            settings.max_image_side,
        ),
        store=store,
        storage=storage if storage is not None else create_storage(settings),
        keyring=keyring,
        limiter=RateLimiter(connection, settings.key_prefix, settings.rate_limit_per_minute),
        idempotency=IdempotencyStore(connection, settings.key_prefix, settings.idempotency_ttl_s),
        telemetry=Telemetry(store),
        waiter=JobWaiter(store, connection, settings.wait_poll_s),
        events=EventHub(
            connection,
            settings.key_prefix,
            settings.sse_heartbeat_s,
            position_s=settings.sse_queue_position_s,
        ),
        webhooks=WebhookTargets(settings),
    )


async def _metrics_flush_loop(telemetry: Telemetry) -> None:
    """Add this process's request tally to the deployment's totals in Redis every second."""
    while True:
        await asyncio.sleep(METRICS_FLUSH_S)
        try:
            await to_thread.run_sync(telemetry.flush)
        except Exception as e:  # Redis down: the tally is kept for the next round
            log.debug("metrics flush failed: %s", type(e).__name__)


async def _janitor_loop(janitor: Janitor) -> None:
    while True:
        await asyncio.sleep(janitor.interval_s)
        try:
            await to_thread.run_sync(janitor.run_once)
        except Exception as e:  # Redis or storage down: try again next round
            log.warning("cleanup round failed: %s: %s", type(e).__name__, e)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with its default 422 body replaced by the contract's error body."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            answer = operation.get("responses", {}).get("422")
            if answer:
                answer["description"] = "invalid field (named in `param`)"
                answer["content"] = {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                }
    components = schema.get("components", {}).get("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    app.openapi_schema = schema
    return schema


def create_app(
    settings: Settings | None = None,
    connection: redis.Redis | None = None,
    *,
    storage: Storage | None = None,
) -> FastAPI:
    settings = settings if settings is not None else Settings()
    state = build_state(
        settings, connection if connection is not None else connect(settings), storage
    )
    janitor = Janitor(
        state.store, state.storage, settings.image_ttl_s, max(1.0, settings.cleanup_interval_s)
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_janitor_loop(janitor), name="ddserve-janitor")
        flusher = asyncio.create_task(
            _metrics_flush_loop(state.telemetry), name="ddserve-metrics-flush"
        )
        state.waiter.start()
        if settings.job_events:
            state.events.start()
        log.info(
            "gateway ready: models %s; auth %s; storage %s",
            ", ".join(state.served) or "(none)",
            "on" if settings.auth_enabled else "OFF",
            settings.storage,
        )
        try:
            yield
        finally:
            for background in (task, flusher):
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await background
            with contextlib.suppress(Exception):  # the last requests of this process
                await to_thread.run_sync(state.telemetry.flush)
            await state.waiter.stop()
            await state.events.stop()

    # /docs and /redoc with Swagger UI's and ReDoc's files served from DOCS_ASSETS (FastAPI's own
    # pages load them from a CDN: blank offline). fastapi-offline bundles them and builds the pages
    # with FastAPI's get_swagger_ui_html / get_redoc_html (no Google fonts); the validator badge,
    # an online call of Swagger UI's, is off.
    app = FastAPIOffline(
        title="ddserve",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        static_url=DOCS_ASSETS,
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.ddserve = state
    app.state.janitor = janitor
    install_error_handlers(app)
    for module in (generate, autoencoder, jobs, images, models, health, metrics, openai_images):
        app.include_router(module.router)
    if settings.job_events:
        app.include_router(job_events.router)
    app.include_router(playground.router)  # GET / and its files, outside the OpenAPI document
    app.add_middleware(
        RequestContextMiddleware,
        telemetry=state.telemetry,
        max_body_bytes=settings.max_body_bytes,
    )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def app_from_env() -> FastAPI:
    """`uvicorn --factory service.app:app_from_env`: settings from the environment."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    return create_app(settings)
