"""`POST /encode`, `POST /decode`, `POST /reconstruct`: autoencoder jobs."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ddserve.jobs import JobKind
from service.dependencies import CallerDep, State
from service.routers.generate import JOB_RESPONSES, IdempotencyHeader, PreferHeader
from service.schemas import DecodeBody, EncodeBody, Job, ReconstructBody
from service.submission import submit

router = APIRouter(tags=["autoencoders"])


@router.post(
    "/encode",
    status_code=202,
    response_model=Job,
    responses=JOB_RESPONSES,
    summary="Images → latents (or VQ code indices)",
)
async def encode(
    body: EncodeBody,
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
        JobKind.ENCODE.value,
        body,
        state.normalizer.encode,
        prefer,
        idempotency_key,
    )


@router.post(
    "/decode",
    status_code=202,
    response_model=Job,
    responses=JOB_RESPONSES,
    summary="Latents (or VQ code indices) → images",
)
async def decode(
    body: DecodeBody,
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
        JobKind.DECODE.value,
        body,
        state.normalizer.decode,
        prefer,
        idempotency_key,
    )


@router.post(
    "/reconstruct",
    status_code=202,
    response_model=Job,
    responses=JOB_RESPONSES,
    summary="Images (optionally corrupted first) → reconstructions",
)
async def reconstruct(
    body: ReconstructBody,
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
        JobKind.RECONSTRUCT.value,
        body,
        state.normalizer.reconstruct,
        prefer,
        idempotency_key,
    )
