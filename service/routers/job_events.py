"""`GET /jobs/{id}/events`: a job's live progress as Server-Sent Events (sse-starlette framing).

Events, in order: `queued` (`{"position"}`: jobs ahead of it in its queue, when the job is still
queued at connect, and again each time it moves up, read every `sse_queue_position_s`), `started`, `progress` (`{"step", "of"}`, and with `?preview=1` the x̂_0 `previews` of a job
submitted with `output.preview_every`), then exactly one terminal event — `succeeded`, `failed` or
`canceled`, whose data is the job as `GET /jobs/{id}` shows it (outputs with signed links) — after
which the stream ends. `started` and `progress` carry an `id:` (`{job id}/{stream entry id}`,
`ddserve.job_events.event_id`): a client that reconnects with `Last-Event-ID` (header, as browsers
send it, or the `last_event_id` query parameter) gets every entry after it and nothing twice. A
comment line every `sse_heartbeat_s` keeps proxies from closing an idle stream.

Same auth as `GET /jobs/{id}`: another key's job is a 404. The reading is shared by every open
stream of the process (`service.event_hub`); an open stream costs an asyncio queue.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from ddserve.job_events import BadEventId, EventKind, StreamEvent, event_id, parse_event_id
from ddserve.jobs import JobStatus
from service.dependencies import AppState, CallerDep, State, base_url
from service.errors import ERROR_RESPONSES, ApiError
from service.event_hub import FINISHED, Listener, QueuePosition
from service.jobstore import JobSnapshot
from service.presenter import job_view
from service.routers.jobs import JobId, _read

router = APIRouter(tags=["jobs"])

_TERMINAL_EVENT = {
    JobStatus.SUCCEEDED: EventKind.SUCCEEDED,
    JobStatus.FAILED: EventKind.FAILED,
    JobStatus.CANCELED: EventKind.CANCELED,
}


def _data(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"))


def _queued(position: int | None) -> ServerSentEvent:
    return ServerSentEvent(_data({"position": position}), event=EventKind.QUEUED.value)


def _stream_event(job_id: str, event: StreamEvent, preview: bool) -> ServerSentEvent:
    data = event.data
    if not preview and "previews" in data:
        data = {k: v for k, v in data.items() if k != "previews"}
    return ServerSentEvent(_data(data), event=event.kind.value, id=event_id(job_id, event.entry_id))


async def _events(
    state: AppState,
    request: Request,
    caller: CallerDep,
    first: JobSnapshot,
    cursor: str,
    preview: bool,
) -> AsyncIterator[ServerSentEvent]:
    """The job's events until its terminal one (see the module docstring). The listener is
    registered here, when the response starts, so that its `finally` always removes it (a
    generator that never starts never runs its `finally`); `first` was read before, and the
    stream is read after: nothing appended in between is missed."""
    job_id = first.id
    queued = first.status == JobStatus.QUEUED
    position = first.queue_position if queued else None
    listener: Listener = state.events.listen(job_id, cursor, position)
    try:
        if queued:
            yield _queued(first.queue_position)
        while True:
            item = await listener.queue.get()
            if isinstance(item, QueuePosition):
                yield _queued(item.position)
                continue
            if item is not FINISHED:
                for event in item:
                    yield _stream_event(job_id, event, preview)
                continue
            try:
                snap = await to_thread.run_sync(_read, state, caller, job_id)
            except ApiError:  # the record is gone (expired, deleted): nothing more to say
                return
            kind = _TERMINAL_EVENT.get(snap.status)
            if kind is not None:
                view = job_view(snap, state.storage, base_url(request, state.settings))
                yield ServerSentEvent(_data(view), event=kind.value)
            return
    finally:
        state.events.close(listener)


@router.get(
    "/jobs/{job_id}/events",
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "the job's events (queued, started, progress…, then one of succeeded, "
            "failed, canceled) as Server-Sent Events",
        },
        **{k: v for k, v in ERROR_RESPONSES.items() if k in (400, 401, 404, 503)},
    },
    response_class=EventSourceResponse,
    summary="A job's live progress (Server-Sent Events)",
    description="Resume with the `Last-Event-ID` header (or `last_event_id`) of the last event "
    "received: every later event comes, none twice. `preview=1` adds the x̂_0 previews of a job "
    "submitted with `output.preview_every` to its progress events.",
)
async def job_events(
    job_id: JobId,
    request: Request,
    state: State,
    caller: CallerDep,
    preview: Annotated[
        bool, Query(description="include x̂_0 previews (jobs with output.preview_every)")
    ] = False,
    last_event_id: Annotated[
        str | None, Query(max_length=200, description="resume after this event id")
    ] = None,
    last_event_id_header: Annotated[
        str | None, Header(alias="Last-Event-ID", max_length=200, include_in_schema=False)
    ] = None,
) -> EventSourceResponse:
    resume = last_event_id_header or last_event_id
    cursor = "0-0"
    if resume:
        try:
            cursor = parse_event_id(resume, job_id)
        except BadEventId as error:
            if error.code == "event_id_of_another_job":
                raise ApiError(
                    400, "event_id_of_another_job", str(error), "Last-Event-ID"
                ) from None
            raise ApiError(400, "invalid_event_id", str(error), "Last-Event-ID") from None
    first = await to_thread.run_sync(_read, state, caller, job_id)  # 404: not the caller's
    return EventSourceResponse(
        _events(state, request, caller, first, cursor, preview),
        ping=state.settings.sse_heartbeat_s,
    )
