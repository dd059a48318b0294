"""What the sync and async clients share about `GET /jobs/{id}/events` (Server-Sent Events, parsed
by httpx-sse): the request, the events, and reconnecting with `Last-Event-ID`.

`Client.stream(job)` / `AsyncClient.stream(job)` yield `JobEvent`s until the terminal one. A
stream that breaks before it (a dropped connection, a gateway restart) is reopened with the id of
the last event received, so the gateway sends every later event and none twice; at most
`MAX_RECONNECTS` reopenings in a row that bring nothing new, `RECONNECT_DELAY_S` apart.
"""

from __future__ import annotations

from typing import Any

import httpx
from httpx_sse import ServerSentEvent

from ddserve.client.base import ClientConfig
from ddserve.client.types import JobEvent

MAX_RECONNECTS = 5
RECONNECT_DELAY_S = 1.0
READ_TIMEOUT_S = 60.0  # > the gateway's heartbeat (15 s by default): a silent stream is dead
_RESUMABLE = {"started", "progress"}  # the events that carry their own id


def events_url(config: ClientConfig, job_id: str, preview: bool) -> str:
    return f"{config.base_url}/jobs/{job_id}/events" + ("?preview=1" if preview else "")


def events_headers(config: ClientConfig, last_event_id: str | None) -> dict[str, str]:
    extra = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
    if last_event_id:
        extra["Last-Event-ID"] = last_event_id
    return config.headers(extra)


def events_timeout(config: ClientConfig) -> httpx.Timeout:
    return httpx.Timeout(config.timeout, read=max(config.timeout, READ_TIMEOUT_S))


def to_event(sse: ServerSentEvent) -> JobEvent:
    """httpx-sse's event as a JobEvent. httpx-sse, like EventSource, repeats the last id on events
    that have none (queued, the terminal ones): only started and progress keep theirs."""
    data: Any = sse.json() if sse.data else {}
    return JobEvent(
        event=sse.event,
        data=data if isinstance(data, dict) else {"value": data},
        id=sse.id or None if sse.event in _RESUMABLE else None,
    )
