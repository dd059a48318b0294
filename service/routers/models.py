"""`GET /models`: the served models, their tasks, shapes, classes or vocabulary, samplers, defaults,
and whether a live worker serves each one now (`workers`, `available`; null when Redis does not
answer: the catalog itself needs no Redis)."""

from __future__ import annotations

import logging

from anyio import to_thread
from fastapi import APIRouter

from service.dependencies import AppState, CallerDep, State
from service.errors import ERROR_RESPONSES
from service.schemas import ModelInfo, ModelList

router = APIRouter(tags=["models"])
log = logging.getLogger("ddserve.service")


def _workers(state: AppState) -> dict[str, int] | None:
    """Live workers per served model, or None when Redis does not answer."""
    try:
        return state.store.workers_alive()
    except Exception as e:  # Redis down: the catalog is still worth answering
        log.debug("worker count unavailable: %s", type(e).__name__)
        return None


@router.get(
    "/models",
    response_model=ModelList,
    responses={401: ERROR_RESPONSES[401]},
    summary="The served models",
)
async def list_models(state: State, caller: CallerDep) -> ModelList:
    alive = await to_thread.run_sync(_workers, state)
    models = []
    for name in state.served:
        info = ModelInfo.model_validate(state.catalog[name].public())
        if alive is not None:
            info.workers = alive.get(name, 0)
            info.available = info.workers > 0
        models.append(info)
    return ModelList(models=models)
