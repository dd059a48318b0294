"""`GET /metrics`: Prometheus text exposition of the deployment's metrics, read from Redis
(`service.telemetry`), so that every gateway process answers with the same totals."""

from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.dependencies import CallerDep, State
from service.errors import ERROR_RESPONSES

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
        401: ERROR_RESPONSES[401],
    },
    summary="Prometheus metrics",
)
async def metrics(state: State, caller: CallerDep) -> Response:
    # Redis down: the answer still comes, with ddserve_redis_up 0.
    body = await to_thread.run_sync(state.telemetry.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
