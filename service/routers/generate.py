"""`POST /generate` and `POST /inpaint`: diffusion sampling jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from ddserve.jobs import JobKind
from service.dependencies import CallerDep, State
from service.errors import ERROR_RESPONSES
from service.schemas import GenerateBody, InpaintBody, Job
from service.submission import submit

router = APIRouter(tags=["diffusion"])

PreferHeader = Annotated[
    str | None,
    Header(
        alias="Prefer",
        description="`wait=N` (N ≤ 60): hold the request up to N s; 200 with the finished job, or "
        "202 if it is not finished yet",
        examples=["wait=30"],
    ),
]
IdempotencyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="the same key and body return the same job (kept idempotency_ttl_s)",
    ),
]
JOB_RESPONSES = {
    **ERROR_RESPONSES,
    200: {"model": Job, "description": "the finished job (Prefer: wait, or a replay)"},
}


@router.post(
    "/generate",
    status_code=202,
    response_model=Job,
    responses=JOB_RESPONSES,
    summary="Sample images (DDPM / DDIM, guidance)",
    description="Queues a generation job and answers 202 with it (`Location: /jobs/{id}`).",
)
async def generate(
    body: GenerateBody,
    request: Request,
    state: State,
    caller: CallerDep,
    prefer: PreferHeader = None,
    idempotency_key: IdempotencyHeader = None,
) -> JSONResponse:
    return await submit(
        request,
        state,
        caller,
        JobKind.GENERATE.value,
        body,
        state.normalizer.generate,
        prefer,
        idempotency_key,
    )


@router.post(
    "/inpaint",
    status_code=202,
    response_model=Job,
    responses=JOB_RESPONSES,
    summary="Inpaint the masked region (RePaint)",
    description="Mask: white (255) = keep, black (0) = generate.",
)
async def inpaint(
    body: InpaintBody,
    request: Request,
    state: State,
    caller: CallerDep,
    prefer: PreferHeader = None,
    idempotency_key: IdempotencyHeader = None,
) -> JSONResponse:
    return await submit(
        request,
        state,
        caller,
        JobKind.INPAINT.value,
        body,
        state.normalizer.inpaint,
        prefer,
        idempotency_key,
    )
