"""Creating a job: what every job-creating route does after its body parsed.

One trip to a worker thread (`anyio.to_thread`) does the synchronous part — rate limit, model
checks and normalization (image decoding included), idempotency claim, then the queue-length check
and the enqueue together in one Redis round trip — so the event loop never waits on Redis or Pillow. Then the answer: `202` + `Location` at once, or,
with `Prefer: wait=N`, the app's `JobWaiter` wakes the request when the job finishes (on its
job-finished notification) or after N seconds: `200` with the finished job, else `202`.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from anyio import to_thread
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from ddserve.jobs import META_KIND, META_MODEL, META_OWNER, META_REQUEST_ID, META_WEBHOOK
from ddserve.spec import JobSpec
from service.dependencies import AppState, Caller, base_url
from service.errors import ApiError
from service.idempotency import check_key, fingerprint
from service.jobstore import JobSnapshot
from service.presenter import job_view

_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d+(?:\.\d+)?)\"?", re.IGNORECASE)
REPLAY_FETCH_TRIES = 20  # a replay may race the first request's enqueue: wait up to ~1 s


def prefer_wait(header: str | None, max_wait_s: float) -> float | None:
    """Seconds asked for by `Prefer: wait=N` (RFC 7240), capped at max_wait_s; None if absent."""
    if not header:
        return None
    match = _WAIT.search(header)
    if match is None:
        return None
    return min(float(match.group(1)), max_wait_s, 60.0)


def _create(
    state: AppState,
    caller: Caller,
    kind: str,
    body: BaseModel,
    normalize: Callable[[Any], JobSpec],
    idempotency_key: str | None,
    request_id: str,
) -> tuple[JobSnapshot, bool]:
    """The synchronous part of a submission (runs in a worker thread). Returns the job's snapshot
    and whether it is an idempotent replay."""
    retry_after = state.limiter.hit(caller.owner)
    if retry_after is not None:
        raise ApiError(
            429,
            "rate_limited",
            f"more than {state.settings.rate_limit_per_minute} requests per minute for this key",
            headers={"Retry-After": str(retry_after)},
        )
    spec = _spec(normalize, body)
    webhook = state.webhooks.target(body)  # resolves its host: here, off the event loop
    model = spec.model
    job_id = str(uuid.uuid4())
    if idempotency_key is not None:
        held = state.idempotency.claim(
            caller.owner,
            idempotency_key,
            fingerprint(kind, body.model_dump(mode="json", by_alias=True)),
            job_id,
        )
        if held is not None:
            return _replay(state, held), True
    # progress, batch_size and error are the worker's to write: absent until it does.
    meta = {
        META_OWNER: caller.owner,
        META_KIND: kind,
        META_MODEL: model,
        META_REQUEST_ID: request_id,
    }
    if webhook is not None:
        meta[META_WEBHOOK] = webhook
    limit = state.settings.max_queue_length
    try:
        done = state.store.enqueue(model, spec.to_json(), job_id, meta, max_load=limit)
    except BaseException:
        if idempotency_key is not None:
            state.idempotency.release(caller.owner, idempotency_key, job_id)
        raise
    if done.job is None:
        if idempotency_key is not None:
            state.idempotency.release(caller.owner, idempotency_key, job_id)
        raise ApiError(
            429,
            "queue_full",
            f"model {model!r} has {limit} jobs queued or running; retry later",
            headers={"Retry-After": "5"},
        )
    return state.store.fresh_snapshot(done.job, done.ahead), False


def _spec(normalize: Callable[[Any], JobSpec], body: BaseModel) -> JobSpec:
    """The body's job spec. The checks before it make a spec that does not validate a bug in
    them; it is still the request's fault-free 422 rather than a 500 (naming the field)."""
    try:
        return normalize(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        param = ".".join(str(p) for p in error["loc"]) or None
        raise ApiError(
            422, "invalid_value", f"{param or 'request'}: {error['msg']}", param
        ) from None


def _replay(state: AppState, job_id: str) -> JobSnapshot:
    """The job an Idempotency-Key already holds (its first request may still be enqueuing it)."""
    for _ in range(REPLAY_FETCH_TRIES):
        job = state.store.fetch(job_id)
        if job is not None:
            return state.store.snapshot(job)
        time.sleep(0.05)
    raise ApiError(
        404,
        "job_not_found",
        "the job created with this Idempotency-Key no longer exists",
        "Idempotency-Key",
    )


def _read(state: AppState, job_id: str) -> JobSnapshot | None:
    job = state.store.fetch(job_id)
    return None if job is None else state.store.snapshot(job)


async def wait_for(state: AppState, job_id: str, seconds: float) -> JobSnapshot | None:
    """Wait until the job is terminal or `seconds` pass; its snapshot then (None if it vanished).
    The snapshot comes from the waiter, read with the rest of its burst (woken together, or timed
    out together): when thousands of held requests end together, a thread hop each is what made
    them late."""
    _, snapshot = await state.waiter.wait_snapshot(job_id, seconds)
    if snapshot is not None:  # terminal, or as it is when the wait timed out
        return snapshot
    return await to_thread.run_sync(_read, state, job_id)


async def submit(
    request: Request,
    state: AppState,
    caller: Caller,
    kind: str,
    body: BaseModel,
    normalize: Callable[[Any], JobSpec],
    prefer: str | None,
    idempotency_key: str | None,
) -> JSONResponse:
    """Create the job (or replay it) and answer per the contract."""
    if idempotency_key is not None:
        check_key(idempotency_key)
    wait = prefer_wait(prefer, state.settings.max_wait_s)
    request_id = request.scope.get("state", {}).get("request_id") or ""
    snap, replayed = await to_thread.run_sync(
        _create, state, caller, kind, body, normalize, idempotency_key, request_id
    )
    headers = {"Location": f"/jobs/{snap.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if wait is not None:
        headers["Preference-Applied"] = f"wait={wait:g}"
        if not snap.terminal:
            snap = await wait_for(state, snap.id, wait) or snap
    status = 200 if snap.terminal and (wait is not None or replayed) else 202
    view = job_view(snap, state.storage, base_url(request, state.settings))
    return JSONResponse(view, status_code=status, headers=headers)


async def submit_and_wait(
    request: Request,
    state: AppState,
    caller: Caller,
    kind: str,
    body: BaseModel,
    normalize: Callable[[Any], JobSpec],
    seconds: float,
) -> JobSnapshot:
    """Create the job and wait for its end, for APIs whose clients do not poll (the OpenAI Images
    API): the finished job's snapshot, or a 503 with `Retry-After` naming the job when it is not
    done within `seconds` (it goes on; nothing is lost: `GET /jobs/{id}` has it)."""
    request_id = request.scope.get("state", {}).get("request_id") or ""
    snap, _ = await to_thread.run_sync(
        _create, state, caller, kind, body, normalize, None, request_id
    )
    if not snap.terminal:
        snap = await wait_for(state, snap.id, seconds) or snap
    if not snap.terminal:
        raise ApiError(
            503,
            "job_not_finished",
            f"job {snap.id} did not finish within {seconds:g} s; it is still {snap.status.value}: "
            f"GET /jobs/{snap.id} follows it",
            headers={"Retry-After": "10", "Location": f"/jobs/{snap.id}"},
        )
    return snap
