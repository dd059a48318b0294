"""Job events on Redis pub/sub: whoever ends a job says so, and the gateways waiting on it wake.

Every path that writes a job's terminal state — a worker's success, failure or stop
(`workers.rq_bridge`), the gateway's cancel of a queued job (`service.jobstore`), the recovery
sweeps that fail `worker_lost` / `job_expired` jobs (`ddserve.recovery`) — also queues
`publish_finished(pipe, prefix, job_id)` on the pipeline (or transaction) that carries that write,
so the notification costs no extra round trip and is sent only if the write is. Each gateway process
subscribes once to `channel(prefix, JobEvent.FINISHED)` (`service.waiter.JobWaiter`) and wakes the
requests held on that job (`Prefer: wait`, cancel).

Why pub/sub and not a Redis stream: pub/sub is at-most-once — a subscriber that is disconnected
when a job ends never hears of it — while a stream (XADD, XREAD from the last id seen) would replay
what a reconnecting gateway missed. But a waiter needs only the job's *current* state, which is
always in the job's hash: a gateway that reconnects (or suspects it missed something) reads the
status of every job it holds in one pipeline, and a slow safety poll does the same every few
seconds. With that, a replay buys nothing, and a stream would cost memory and a trimming policy
(MAXLEN) for every ended job, plus a per-reader cursor, while PUBLISH stores nothing and costs the
server one write per subscribed connection. The same holds for the per-job progress events a later
SSE route will need: only the latest progress matters, and it is in `job.meta`, so a missed event
is superseded by the next one or by the snapshot a (re)connecting client reads first.

Channels are per key prefix *and* per event type (`{prefix}:events:{event}`), so a subscriber to
"finished" never receives the far more frequent progress traffic of another event type. A message
is the job id, optionally followed by one space and a JSON object (`encode_message`): "finished"
needs no data; a progress event would carry `{"step", "total"}`.

Publishing is a hint, never the record: a reader must treat the job's hash as the truth and be
correct (if slower) without any message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol


class JobEvent(StrEnum):
    """What happened to a job. FINISHED: it reached a terminal status (succeeded, failed, canceled)
    — or its record was deleted on the way (an RQ result TTL of 0). UPDATED: a worker appended to
    the job's event stream (started, progress): a hint for the SSE readers."""

    FINISHED = "finished"
    UPDATED = "updated"  # new entries on the job's event stream (`ddserve.job_events`)


class Publisher(Protocol):
    """A Redis client or pipeline: anything with redis-py's `publish`."""

    def publish(self, channel: Any, message: Any, **kwargs: Any) -> Any: ...


def channel(prefix: str, event: JobEvent) -> str:
    """The pub/sub channel of `event` for the deployment with key prefix `prefix`."""
    return f"{prefix}:events:{event.value}"


def prefix_of_queue(queue: str) -> str:
    """The key prefix of a job from its RQ queue name (`ddserve.jobs.queue_name`: `{prefix}:{model}`).

    Model names are zoo folder names without ':'; the prefix may contain ':'. Used where only the
    job is at hand (RQ's worker internals, the recovery sweeps): the job's origin names its queue."""
    return queue.rpartition(":")[0]


def encode_message(job_id: str, data: dict[str, Any] | None = None) -> str:
    """A message: the job id, then (when there is data) one space and the data as JSON. Job ids
    contain no spaces (the gateway's are UUIDs)."""
    return job_id if data is None else f"{job_id} {json.dumps(data, separators=(',', ':'))}"


@dataclass(frozen=True)
class JobMessage:
    job_id: str
    data: dict[str, Any] | None = None


def decode_message(raw: bytes | str) -> JobMessage:
    """The inverse of `encode_message` (bytes as redis-py delivers them without decoding)."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    job_id, _, data = text.partition(" ")
    return JobMessage(job_id, json.loads(data) if data else None)


def publish(
    pipe: Publisher,
    prefix: str,
    event: JobEvent,
    job_id: str,
    data: dict[str, Any] | None = None,
) -> None:
    """Queue (on a pipeline) or send (on a client) one job event."""
    pipe.publish(channel(prefix, event), encode_message(job_id, data))


def publish_finished(pipe: Publisher, prefix: str, job_id: str) -> None:
    """Say that the job ended. Put it on the pipeline that writes the job's terminal state, so that
    a subscriber that hears it reads that state (a MULTI/EXEC delivers it after the writes)."""
    publish(pipe, prefix, JobEvent.FINISHED, job_id)
