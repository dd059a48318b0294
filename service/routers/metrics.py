"""`GET /metrics`: Prometheus text exposition of the app's own registry."""

from __future__ import annotations

import logging

from anyio import to_thread
from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.dependencies import CallerDep, State
from service.errors import ERROR_RESPONSES

router = APIRouter(tags=["health"])
log = logging.getLogger("ddserve.metrics")


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
    try:
        await to_thread.run_sync(state.telemetry.refresh, state.store)
    except Exception as e:  # Redis down: still expose what this process knows (redis_up 0)
        log.warning("metrics refresh failed: %s", type(e).__name__)
    return Response(state.telemetry.render(), media_type=CONTENT_TYPE_LATEST)
