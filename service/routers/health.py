"""`GET /healthz` (the process answers) and `GET /readyz` (the gateway can accept jobs: Redis
answers). Neither needs an API key.

Readiness does not depend on workers: a model without a live worker still takes jobs (they wait in
its queue, as KEDA expects when it scales workers from zero), and a 503 there would take every
gateway pod out of the Kubernetes Service at once. Model availability is reported per model by
`GET /models` (`workers`, `available`) and `/metrics` (`ddserve_workers_alive{model}`); `/readyz`
repeats the worker counts for operators, without acting on them.
"""

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
    return Readiness(ready=True, redis=True, workers=alive, missing=missing)


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Redis does not answer"}},
    summary="Readiness: the gateway accepts jobs (Redis answers)",
)
async def readyz(state: State) -> JSONResponse:
    ready = await to_thread.run_sync(_readiness, state)
    headers = {} if ready.ready else {"Retry-After": "5"}
    return JSONResponse(
        ready.model_dump(), status_code=200 if ready.ready else 503, headers=headers
    )
