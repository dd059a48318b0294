"""`GET /healthz` (the process answers) and `GET /readyz` (Redis answers and every served model has
a live worker). Neither needs an API key."""

from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.dependencies import AppState, State
from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    return Health()


def _readiness(state: AppState) -> Readiness:
    if not state.store.ping():
        return Readiness(ready=False, redis=False)
    try:
        alive = state.store.workers_alive()
    except Exception:  # Redis went away between the two calls
        return Readiness(ready=False, redis=False)
    missing = [model for model, count in alive.items() if count == 0]
    return Readiness(ready=not missing, redis=True, workers=alive, missing=missing)


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Redis down or a model without workers"}},
    summary="Readiness",
)
async def readyz(state: State) -> JSONResponse:
    ready = await to_thread.run_sync(_readiness, state)
    headers = {} if ready.ready else {"Retry-After": "5"}
    return JSONResponse(
        ready.model_dump(), status_code=200 if ready.ready else 503, headers=headers
    )
