"""`GET /jobs` (the caller's own jobs), `GET /jobs/{id}` and `POST /jobs/{id}/cancel`."""

from __future__ import annotations

import re
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from rq.job import Job as RQJob

from ddserve.jobs import META_OWNER, TERMINAL, JobStatus
from ddserve.params import ModelName
from service.dependencies import AppState, Caller, CallerDep, State, base_url
from service.errors import ERROR_RESPONSES, ApiError
from service.jobstore import JobSnapshot
from service.presenter import job_view
from service.schemas import Job, JobList

router = APIRouter(tags=["jobs"])

# Stricter than RQ's own id check (letters, digits, `_`, `-`; a `:` selects an execution), so any id
# RQ would refuse is a 404 here before RQ sees it. Always `fullmatch`: `$` also matches before a
# trailing newline, and `abc\n` then reached RQ, whose ValueError was a 500.
_JOB_ID = re.compile(r"[A-Za-z0-9\-]{1,64}")
CANCEL_WAIT_S = 3.0  # how long a cancel of a running job waits for the worker to stop it

JobId = Annotated[str, Path(description="the job's id")]
RESPONSES = {k: v for k, v in ERROR_RESPONSES.items() if k in (401, 404, 503)}


MAX_PAGE = 100
SCAN_PER_ITEM = 20  # index entries read per wanted job before a filtered page ends early


def _encode_cursor(cursor: tuple[int, str] | None) -> str | None:
    return None if cursor is None else f"{cursor[0]}_{cursor[1]}"


def _decode_cursor(text: str | None) -> tuple[int, str] | None:
    if text is None:
        return None
    score, _, job_id = text.partition("_")
    if not score.isdigit() or not _JOB_ID.match(job_id):
        raise ApiError(400, "invalid_cursor", "cursor must be a next_cursor of GET /jobs", "cursor")
    return int(score), job_id


def _list(
    state: AppState,
    caller: Caller,
    cursor: str | None,
    limit: int,
    status: JobStatus | None,
    model: str | None,
) -> tuple[list[JobSnapshot], str | None]:
    ids, after = state.store.list_ids(
        caller.owner,
        before=_decode_cursor(cursor),
        limit=limit,
        status=status,
        model=model,
        scan_budget=limit * SCAN_PER_ITEM,
    )
    snaps = [
        snap
        for snap in state.store.snapshots(ids)  # two round trips for the page
        if snap is not None and (caller.owner is None or snap.owner == caller.owner)
    ]
    return snaps, _encode_cursor(after)


@router.get(
    "/jobs",
    response_model=JobList,
    responses={k: v for k, v in ERROR_RESPONSES.items() if k in (400, 401, 422, 503)},
    summary="The caller's jobs, newest first",
    description="Only the calling API key's jobs (with auth off, every job). Pages of `limit`; "
    "pass `next_cursor` back as `cursor` for the next page (null: no more). A filtered page may "
    "hold fewer than `limit` jobs and still have a next_cursor.",
)
async def list_jobs(
    request: Request,
    state: State,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="jobs per page")] = 20,
    cursor: Annotated[str | None, Query(max_length=128, description="next_cursor")] = None,
    status: Annotated[JobStatus | None, Query(description="only jobs in this state")] = None,
    model: Annotated[ModelName | None, Query(description="only jobs of this model")] = None,
) -> JSONResponse:
    snaps, next_cursor = await to_thread.run_sync(
        _list, state, caller, cursor, limit, status, model
    )
    url = base_url(request, state.settings)
    return JSONResponse(
        {"data": [job_view(s, state.storage, url) for s in snaps], "next_cursor": next_cursor}
    )


def _owned_job(state: AppState, caller: Caller, job_id: str) -> RQJob:
    """The job, if it exists, is ours and the caller's (another key's job is a 404 too)."""
    job = state.store.fetch(job_id) if _JOB_ID.fullmatch(job_id) else None
    if job is None or (caller.owner is not None and job.meta.get(META_OWNER) != caller.owner):
        raise ApiError(404, "job_not_found", f"no job {job_id!r}", "id")
    return job


def _read(state: AppState, caller: Caller, job_id: str) -> JobSnapshot:
    return state.store.snapshot(_owned_job(state, caller, job_id))


@router.get("/jobs/{job_id}", response_model=Job, responses=RESPONSES, summary="A job's state")
async def get_job(job_id: JobId, request: Request, state: State, caller: CallerDep) -> JSONResponse:
    snap = await to_thread.run_sync(_read, state, caller, job_id)
    return JSONResponse(job_view(snap, state.storage, base_url(request, state.settings)))


def _cancel(state: AppState, caller: Caller, job_id: str) -> JobSnapshot:
    job = _owned_job(state, caller, job_id)
    state.store.cancel(job)
    job.refresh()  # status and timestamps as the cancel left them
    return state.store.snapshot(job)


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=Job,
    responses=RESPONSES,
    summary="Cancel a job",
    description="A queued job is canceled at once; a running one stops at its next denoising step "
    "(the answer waits up to 3 s for that). A finished job is returned as it is.",
)
async def cancel_job(
    job_id: JobId, request: Request, state: State, caller: CallerDep
) -> JSONResponse:
    snap = await to_thread.run_sync(_cancel, state, caller, job_id)
    if snap.status not in TERMINAL:  # running: the worker stops it at its next step
        await state.waiter.wait(job_id, CANCEL_WAIT_S)
        snap = await to_thread.run_sync(_read, state, caller, job_id)
    return JSONResponse(job_view(snap, state.storage, base_url(request, state.settings)))
