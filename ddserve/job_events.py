"""A job's event log for live progress (`GET /jobs/{id}/events`): one Redis Stream per job.

Workers append what happens while a job runs — `started`, then `progress` (step, of, and the x̂₀
previews of jobs that asked for them with `output.preview_every`) — to the stream
`{prefix}:job-events:{id}` (`append`), in the pipeline of the round's other writes
(`workers.step_writes`), so the log costs no round trip of its own. The gateway's SSE route reads
it (`service.event_hub`) and adds what the job's hash already holds: `queued` (with the queue
position) on connecting, and the terminal event (`succeeded` with its outputs, `failed`,
`canceled`) read from the job's record once the job ended.

Why a stream and not pub/sub alone (`ddserve.notifications` argues the opposite for the waiter): an
SSE client that reconnects sends `Last-Event-ID` and must lose nothing in between. With a stream
the entry id *is* the SSE id (`event_id`), so a resume is one XRANGE from that id — also on another
gateway process, or after a gateway restart — while pub/sub would have dropped whatever was
published during the reconnect. The waiter only needs the job's current state (in its hash); a
progress bar with previews needs the history. Each batch of appends (a worker's round) also
PUBLISHes the ids of the jobs it appended to, in one message, on
`notifications.channel(prefix, JobEvent.UPDATED)` (`publish_updated`), a wake-up hint: each
gateway process holds one subscription that tells its shared reader which streams to read (no
per-stream blocking XREAD, no polling of every job); a lost hint is made good by the next one, the
terminal notification or the reader's slow safety read. One message per round rather than per job:
a gateway parses each message it receives, and a round of 64 jobs would otherwise be 64.

Bounds: each stream is trimmed to about `MAX_ENTRIES` entries (XADD MAXLEN ~) and expires with the
job's record (`retention_s`, refreshed at every append), so an abandoned stream never outlives its
job. The terminal events are not in the stream: the job's hash is the record of how it ended (every
path that ends a job writes it), and reading it is what keeps the outcome in one place.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, TypedDict

from ddserve.notifications import JobEvent, channel

MAX_ENTRIES = 1000  # per job: ~200 progress reports of 1,000 steps with previews, every k ≥ 2
PREVIEW_MAX_SIDE = 64  # px: the longest side of a preview image (downsampled from x̂₀)

_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_JOB_ID = re.compile(r"[A-Za-z0-9\-]{1,64}")


class Preview(TypedDict):
    """One image's x̂_0 preview in a `progress` event: the image's index in the job, and a base64
    PNG whose longest side is at most PREVIEW_MAX_SIDE."""

    index: int
    png: str


class EventKind(StrEnum):
    """The SSE `event:` names, in the order a job meets them. QUEUED and the terminal three come
    from the job's record; STARTED and PROGRESS from its stream."""

    QUEUED = "queued"
    STARTED = "started"
    PROGRESS = "progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL_KINDS = frozenset({EventKind.SUCCEEDED, EventKind.FAILED, EventKind.CANCELED})


class Pipe(Protocol):
    """A redis-py client or pipeline (what `append` queues its commands on)."""

    def xadd(self, name: Any, fields: Any, *args: Any, **kwargs: Any) -> Any: ...

    def expire(self, name: Any, time: Any, *args: Any, **kwargs: Any) -> Any: ...

    def publish(self, channel: Any, message: Any, **kwargs: Any) -> Any: ...


def stream_key(prefix: str, job_id: str) -> str:
    return f"{prefix}:job-events:{job_id}"


def retention_s(result_ttl_s: int, failure_ttl_s: int, job_ttl_s: float, deadline_s: float) -> int:
    """How long a job's stream is kept after its last append: as long as its record can live (a
    job queued up to job_ttl_s, run up to its deadline, then kept result/failure TTL)."""
    return int(max(result_ttl_s, failure_ttl_s, job_ttl_s + deadline_s)) + 1


def append(
    pipe: Pipe,
    prefix: str,
    job_id: str,
    kind: EventKind,
    data: dict[str, Any],
    ttl_s: int,
    *,
    wake: bool = True,
) -> None:
    """Queue one entry on the job's stream (trimmed to about MAX_ENTRIES, expiring after ttl_s)
    and, with `wake`, its own wake-up hint (a batch of appends sends one: `publish_updated`)."""
    key = stream_key(prefix, job_id)
    fields = {"event": kind.value, "data": json.dumps(data, separators=(",", ":"))}
    pipe.xadd(key, fields, maxlen=MAX_ENTRIES, approximate=True)
    pipe.expire(key, ttl_s)
    if wake:
        publish_updated(pipe, prefix, [job_id])


def publish_updated(pipe: Pipe, prefix: str, job_ids: list[str]) -> None:
    """One wake-up hint for the streams of `job_ids` (job ids hold no spaces: one message)."""
    if job_ids:
        pipe.publish(channel(prefix, JobEvent.UPDATED), " ".join(job_ids))


def updated_ids(message: bytes | str) -> list[str]:
    """The job ids of a `publish_updated` message."""
    return (message.decode() if isinstance(message, bytes) else message).split()


@dataclass(frozen=True)
class StreamEvent:
    """One entry of a job's stream: its id (the Redis entry id), kind and data."""

    entry_id: str
    kind: EventKind
    data: dict[str, Any]


def decode_entry(entry_id: bytes | str, fields: dict[Any, Any]) -> StreamEvent:
    """An XRANGE/XREAD entry (bytes as redis-py gives them without decoding) as a StreamEvent."""

    def text(value: bytes | str) -> str:
        return value.decode() if isinstance(value, bytes) else value

    plain = {text(k): text(v) for k, v in fields.items()}
    return StreamEvent(text(entry_id), EventKind(plain["event"]), json.loads(plain["data"]))


def event_id(job_id: str, entry_id: str) -> str:
    """The SSE id of a stream entry: `{job id}/{entry id}`, so that a `Last-Event-ID` names its
    job and a resume against another job is refused rather than silently misread."""
    return f"{job_id}/{entry_id}"


class BadEventId(ValueError):
    """A `Last-Event-ID` that is not an id this route sent (`code`: the API error code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_event_id(value: str, job_id: str) -> str:
    """The stream entry id in a `Last-Event-ID` sent for `job_id`; BadEventId when it is not one
    of this route's ids (`invalid_event_id`) or names another job (`event_id_of_another_job`)."""
    owner, sep, entry = value.strip().rpartition("/")
    if not sep or not _JOB_ID.fullmatch(owner) or not _ENTRY_ID.fullmatch(entry):
        raise BadEventId(
            "invalid_event_id",
            f"Last-Event-ID {value[:100]!r} is not an event id of GET /jobs/{{id}}/events "
            "('<job id>/<ms>-<seq>')",
        )
    if owner != job_id:
        raise BadEventId(
            "event_id_of_another_job",
            f"Last-Event-ID names job {owner!r}, not {job_id!r}: resume a stream with the id of "
            "its own last event",
        )
    return entry
