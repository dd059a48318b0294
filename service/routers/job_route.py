"""The scaffolding every job-creating route shares (`POST /generate`, `/inpaint`, `/encode`,
`/decode`, `/reconstruct`): its JSON body, the `Prefer: wait` and `Idempotency-Key` headers, the
202/200 job answer and the contract's error answers, all handed to `service.submission.submit`."""

# No `from __future__ import annotations` here: the route's body annotation is the body model passed
# in at run time, which FastAPI must see as a class, not as a string to resolve in this module.

import functools
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ddserve.jobs import JobKind
from ddserve.spec import JobSpec
from service.dependencies import CallerDep, State
from service.errors import ERROR_RESPONSES
from service.json_body import BoundedJsonRoute, known_fields_only
from service.normalize import RequestNormalizer
from service.schemas import Job
from service.submission import submit

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

Normalize = Callable[[RequestNormalizer, Any], JobSpec]


def add_job_route(
    router: APIRouter,
    kind: JobKind,
    body_model: type[BaseModel],
    normalize: Normalize,
    *,
    summary: str,
    description: str | None = None,
) -> None:
    """Add `POST /{kind}` to `router`: a `body_model` body, normalized by `normalize` (an unbound
    `RequestNormalizer` method), queued as a `kind` job; the route (and its operation id) is named
    after the kind."""

    KnownFields = Annotated[None, Depends(known_fields_only(body_model))]

    # No docstring: FastAPI would show it as the description of routes that have none.
    async def create_job(
        body: body_model,  # type: ignore[valid-type]
        request: Request,
        state: State,
        caller: CallerDep,
        # after the key check, before the body's validation: unknown keys in one pass
        _known_fields: KnownFields,
        prefer: PreferHeader = None,
        idempotency_key: IdempotencyHeader = None,
    ) -> JSONResponse:
        return await submit(
            request,
            state,
            caller,
            kind.value,
            body,
            functools.partial(normalize, state.normalizer),
            prefer,
            idempotency_key,
        )

    router.add_api_route(
        f"/{kind.value}",
        create_job,
        methods=["POST"],
        name=kind.value,
        status_code=202,
        response_model=Job,
        responses=JOB_RESPONSES,
        summary=summary,
        description=description,
        route_class_override=BoundedJsonRoute,  # the body parsed at a bounded cost
    )
