"""What routes depend on: the app's state (settings, Redis, catalog, storage, …) and the caller.

`AppState` is built once per app by `service.app.create_app` and kept on `app.state.ddserve`; there
is no module-level state, so several apps (tests, embedded mode) live side by side in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import redis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ddserve.settings import Settings
from ddserve.storage import Storage
from models.catalog import ModelEntry
from service.auth import KeyRing
from service.errors import ApiError
from service.event_hub import EventHub
from service.idempotency import IdempotencyStore
from service.jobstore import JobStore
from service.normalize import RequestNormalizer
from service.ratelimit import RateLimiter
from service.telemetry import Telemetry
from service.waiter import JobWaiter
from service.webhooks.targets import WebhookTargets


@dataclass
class AppState:
    settings: Settings
    connection: redis.Redis
    catalog: dict[str, ModelEntry]  # every zoo entry (helpers such as classifiers included)
    served: list[str]  # the models that take jobs
    normalizer: RequestNormalizer
    store: JobStore
    storage: Storage
    keyring: KeyRing
    limiter: RateLimiter
    idempotency: IdempotencyStore
    telemetry: Telemetry
    waiter: JobWaiter
    events: EventHub
    webhooks: WebhookTargets


@dataclass(frozen=True)
class Caller:
    """Who is calling: the API key's id (None with auth off, when every job is everyone's)."""

    owner: str | None


# Dependencies are `async def` on purpose: FastAPI runs a plain `def` dependency in the threadpool,
# a thread hop per request for a dictionary lookup or a SHA-256.


async def get_state(request: Request) -> AppState:
    return request.app.state.ddserve


State = Annotated[AppState, Depends(get_state)]

_bearer = HTTPBearer(
    auto_error=False,
    description="an API key: `Authorization: Bearer <key>` (off in the embedded mode)",
)


async def get_caller(
    state: State,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """401 unless auth is off or the bearer token is a configured key."""
    if not state.settings.auth_enabled:
        return Caller(owner=None)
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(
            401, "missing_api_key", "send an API key: Authorization: Bearer <key>", None, challenge
        )
    owner = state.keyring.identify(credentials.credentials)
    if owner is None:
        raise ApiError(401, "invalid_api_key", "the API key is not valid", None, challenge)
    return Caller(owner=owner)


CallerDep = Annotated[Caller, Depends(get_caller)]


def base_url(request: Request, settings: Settings) -> str:
    """Where clients reach this gateway: `public_url`, else the request's own base URL."""
    return (settings.public_url or str(request.base_url)).rstrip("/")
