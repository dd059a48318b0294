"""`GET /jobs/{id}` and `POST /jobs/{id}/cancel`."""

from __future__ import annotations

import re
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from rq.job import Job as RQJob

from ddserve.jobs import META_OWNER, TERMINAL
from service.dependencies import AppState, Caller, CallerDep, State, base_url
from service.errors import ERROR_RESPONSES, ApiError
from service.jobstore import JobSnapshot
from service.presenter import job_view
from service.schemas import Job

router = APIRouter(tags=["jobs"])

# Stricter than RQ's own id check (letters, digits, `_`, `-`; a `:` selects an execution), so any id
# RQ would refuse is a 404 here before RQ sees it. Always `fullmatch`: `$` also matches before a
# trailing newline, and `abc\n` then reached RQ, whose ValueError was a 500.
_JOB_ID = re.compile(r"[A-Za-z0-9\-]{1,64}")
CANCEL_WAIT_S = 3.0  # how long a cancel of a running job waits for the worker to stop it

JobId = Annotated[str, Path(description="the job's id")]
RESPONSES = {k: v for k, v in ERROR_RESPONSES.items() if k in (401, 404, 503)}


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
