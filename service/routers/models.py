"""`GET /models`: the served models, their tasks, shapes, classes or vocabulary, samplers, defaults."""

from __future__ import annotations

from fastapi import APIRouter

from service.dependencies import CallerDep, State
from service.errors import ERROR_RESPONSES
from service.schemas import ModelInfo, ModelList

router = APIRouter(tags=["models"])


@router.get(
    "/models",
    response_model=ModelList,
    responses={401: ERROR_RESPONSES[401]},
    summary="The served models",
)
async def list_models(state: State, caller: CallerDep) -> ModelList:
    return ModelList(
        models=[ModelInfo.model_validate(state.catalog[name].public()) for name in state.served]
    )
