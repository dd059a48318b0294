"""Webhook events: a job's state changes become delivery jobs on the webhook queue.

Who notices a job's events. The job's hash in Redis is the truth about it (status, `started_at`,
`meta.progress`, the result); the GPU worker writes it in its rounds, and every path that ends a
job — worker success or failure, the gateway's cancel of a queued job, the recovery sweeps of
lost and expired jobs — writes it too and publishes `finished` (`ddserve.notifications`). Rather
than add an enqueue to each of those paths (and a Python RQ-job build to the GPU worker's round),
the webhook worker's dispatcher *derives* events from that truth for the jobs that asked for a
webhook, and only for them:

- the gateway adds such a job to the sorted set `watched_key(prefix)` in the transaction that
  enqueues it (`service.jobstore.JobStore.enqueue`), so a job never runs unwatched;
- every `webhook_poll_s`, or at once when a `finished` message arrives, `sweep()` reads the
  status, `started_at` and meta of every watched job in one pipeline (not their images) and emits
  what changed since its last look: `start` (the job has a `started_at`), `progress` (a new step,
  at most one per job every `webhook_poll_s`: the throttle), `completed` (a terminal status), each
  only if the job's `webhook_events_filter` has it. A completed job leaves the set.
- Each event is one RQ job on the delivery queue, queued in a WATCH/MULTI transaction with the
  mark of it in `sent_key(prefix, job)`: a (job, event) is queued exactly once even with several
  webhook workers sweeping, and since the mark and the delivery job are written together, a
  dispatcher that dies between the two loses nothing. A lost pub/sub message only delays an event
  to the next sweep. So: at-least-once delivery (`service.webhooks.delivery` retries), one
  stable `webhook-id` per (job, event) — `msg_<job>_start`, `msg_<job>_progress_<step>`,
  `msg_<job>_completed` — which receivers use to drop duplicates.

The cost falls only where webhooks are used: jobs without one add nothing to the gateway's
enqueue or to any worker, and the sweep is one pipelined read per watched job per interval.
The GPU worker's loop never waits on a webhook; the gateway's request path only adds one ZADD to
the enqueue's existing transaction (plus the URL's DNS check at submit).

The message body follows Standard Webhooks' recommended shape: `{"type": "job.<event>",
"timestamp": <ISO 8601>, "data": <the job as GET /jobs/{id} shows it>}`, built once when the event
is queued, so every retry sends the same bytes under the same id (image links are signed for
`link_ttl_s`: keep it above `webhook_max_age_s`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from redis.exceptions import RedisError, WatchError
from rq.job import Job, Retry
from rq.queue import Queue
from rq.serializers import resolve_serializer

from ddserve.jobs import META_OWNER, META_PROGRESS, META_WEBHOOK, TERMINAL, JobStatus, public_status
from ddserve.notifications import JobEvent, channel
from ddserve.params import WEBHOOK_EVENTS
from ddserve.settings import Settings
from ddserve.storage import Storage
from service.jobstore import JobStore
from service.presenter import job_view
from service.webhooks.keys import DELIVERY_FUNCTION, delivery_queue, sent_key, watched_key

log = logging.getLogger(__name__)
SWEEP_BATCH = 1000  # watched jobs read per pipeline


def retry_intervals(
    base_s: int, cap_s: int, max_age_s: int, rng: random.Random | None = None
) -> list[int]:
    """The delays between a delivery's attempts: exponential backoff with "equal jitter"
    (AWS Architecture Blog, "Exponential Backoff and Jitter", 2015): attempt k waits
    d_k/2 + U(0, d_k/2) with d_k = min(cap, base·2^k), so receivers coming back up are not hit
    by every delivery at the same instant. The list stops once the delays add up to `max_age_s`:
    the last attempt starts within it. Whole seconds (RQ's `Retry` takes ints), at least 1."""
    rng = rng or random.Random()
    intervals: list[int] = []
    total = 0
    k = 0
    while True:
        d = min(cap_s, base_s * 2**k)
        delay = max(1, round(d / 2 + rng.uniform(0, d / 2)))
        if total + delay > max_age_s:
            return intervals
        intervals.append(delay)
        total += delay
        k += 1


def message_id(job_id: str, event: str, step: int | None = None) -> str:
    """The stable `webhook-id` of one (job, event): the same for every retry of it."""
    return f"msg_{job_id}_{event}" if step is None else f"msg_{job_id}_{event}_{step}"


def base_url_of(settings: Settings) -> str:
    """The base URL of image links in webhook bodies: `public_url`, else the gateway's address."""
    return (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/")


@dataclass(frozen=True)
class Watched:
    """What one sweep read of a watched job."""

    job_id: str
    status: JobStatus | None  # None: the job no longer exists
    started: bool
    webhook: dict[str, Any] | None
    owner: str | None  # the API key whose secret signs the deliveries
    progress_step: int | None
    sent: dict[str, str]


class EventDispatcher:
    """Turns the watched jobs' state changes into delivery jobs (see the module docstring)."""

    def __init__(
        self,
        connection: redis.Redis,
        settings: Settings,
        storage: Storage,
        *,
        base_url: str | None = None,
    ) -> None:
        self.connection = connection
        self.settings = settings
        self.storage = storage
        self.base_url = (base_url or base_url_of(settings)).rstrip("/")
        self.prefix = settings.key_prefix
        self.store = JobStore(connection, settings, [])
        self.queue = Queue(delivery_queue(self.prefix), connection=connection)
        self._serializer = resolve_serializer(None)  # RQ's default: how job.meta is stored
        self._retention_s = max(settings.result_ttl_s, settings.failure_ttl_s) + int(
            settings.job_ttl_s + settings.job_deadline_s
        )

    # --- reading ---

    def _read(self, job_ids: list[str]) -> list[Watched]:
        pipe = self.connection.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(Job.key_for(job_id), "status", "started_at", "meta")
            pipe.hgetall(sent_key(self.prefix, job_id))
        replies = pipe.execute()
        found = []
        for i, job_id in enumerate(job_ids):
            (raw_status, started_at, raw_meta), sent = replies[2 * i], replies[2 * i + 1]
            meta: dict[str, Any] = {}
            if raw_meta:
                try:
                    meta = self._serializer.loads(raw_meta)
                except Exception:  # an unreadable meta: no webhook to send to
                    meta = {}
            progress = meta.get(META_PROGRESS) or {}
            step = progress.get("step") if isinstance(progress, dict) else None
            found.append(
                Watched(
                    job_id=job_id,
                    status=None if raw_status is None else public_status(raw_status.decode()),
                    started=bool(started_at),
                    webhook=meta.get(META_WEBHOOK),
                    owner=meta.get(META_OWNER),
                    progress_step=step if isinstance(step, int) else None,
                    sent={k.decode(): v.decode() for k, v in sent.items()},
                )
            )
        return found

    def due(self, job: Watched, now: float) -> list[tuple[str, int | None]]:
        """The events of `job` to queue now: (event, progress step or None)."""
        events = set((job.webhook or {}).get("events") or WEBHOOK_EVENTS)
        due: list[tuple[str, int | None]] = []
        if job.status is None:
            return due
        if "start" in events and job.started and "start" not in job.sent:
            due.append(("start", None))
        if (
            "progress" in events
            and job.status == JobStatus.RUNNING
            and job.progress_step is not None
            and job.progress_step > int(job.sent.get("progress", -1))
            and now - float(job.sent.get("progress_at", 0.0)) >= self.settings.webhook_poll_s
        ):
            due.append(("progress", job.progress_step))
        if "completed" in events and job.status in TERMINAL and "completed" not in job.sent:
            due.append(("completed", None))
        return due

    # --- the sweep ---

    def sweep(self) -> int:
        """One look at every watched job; returns the number of events queued."""
        key = watched_key(self.prefix)
        queued = 0
        start = 0
        while True:
            ids = [m.decode() for m in self.connection.zrange(key, start, start + SWEEP_BATCH - 1)]
            if not ids:
                return queued
            now = time.time()
            done: list[str] = []
            for job in self._read(ids):
                if job.status is None or not job.webhook:
                    log.warning("webhook of job %s not sent: the job no longer exists", job.job_id)
                    done.append(job.job_id)
                    continue
                for event, step in self.due(job, now):
                    queued += self.dispatch(job, event, step)
                if job.status in TERMINAL and (
                    "completed" not in set(job.webhook.get("events") or WEBHOOK_EVENTS)
                ):
                    done.append(job.job_id)  # nothing more to send for it
            if done:
                self.connection.zrem(key, *done)
            if len(ids) < SWEEP_BATCH:
                return queued
            start += SWEEP_BATCH - len(done)

    def body(self, job_id: str, event: str) -> str | None:
        """The message body of an event: the job's current view (None if it vanished)."""
        rq_job = self.store.fetch(job_id)
        if rq_job is None:
            return None
        view = job_view(self.store.snapshot(rq_job), self.storage, self.base_url)
        message = {
            "type": f"job.{event}",
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "data": view,
        }
        return json.dumps(message, separators=(",", ":"))

    def dispatch(self, job: Watched, event: str, step: int | None) -> int:
        """Queue one event's delivery with its mark, once (1), or nothing if another dispatcher
        did it first or the job vanished (0)."""
        assert job.webhook is not None
        body = self.body(job.job_id, event)
        if body is None:
            return 0
        s = self.settings
        mark_key = sent_key(self.prefix, job.job_id)
        intervals = retry_intervals(
            s.webhook_retry_base_s, s.webhook_retry_cap_s, s.webhook_max_age_s
        )
        with self.connection.pipeline() as pipe:
            try:
                pipe.watch(mark_key)
                if event == "progress":
                    if int(pipe.hget(mark_key, "progress") or -1) >= (step or 0):
                        return 0
                    marks = {"progress": str(step), "progress_at": str(time.time())}
                else:
                    if pipe.hexists(mark_key, event):
                        return 0
                    marks = {event: "1"}
                pipe.multi()
                pipe.hset(mark_key, mapping=marks)
                pipe.expire(mark_key, self._retention_s)
                self.queue.enqueue_call(
                    DELIVERY_FUNCTION,
                    kwargs={
                        "url": job.webhook["url"],
                        "msg_id": message_id(job.job_id, event, step),
                        "body": body,
                        "owner": job.owner,
                        "created_at": time.time(),
                    },
                    description=f"webhook {event} of job {job.job_id}",
                    retry=Retry(max=len(intervals), interval=intervals) if intervals else None,
                    timeout=int(s.webhook_timeout_s) + 30,
                    result_ttl=600,
                    failure_ttl=max(s.webhook_max_age_s, 3600),
                    pipeline=pipe,
                )
                if event == "completed":
                    pipe.zrem(watched_key(self.prefix), job.job_id)
                pipe.execute()
            except WatchError:
                return 0
        return 1

    # --- the loop ---

    def run(self, stop: threading.Event) -> None:
        """Sweep every `webhook_poll_s`, and at once when a job finishes, until `stop` is set."""
        pubsub = self.connection.pubsub(ignore_subscribe_messages=True)
        backoff = 0.5
        try:
            pubsub.subscribe(channel(self.prefix, JobEvent.FINISHED))
            while not stop.is_set():
                try:
                    self.sweep()
                    backoff = 0.5
                    deadline = time.monotonic() + self.settings.webhook_poll_s
                    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
                        if pubsub.get_message(timeout=min(left, 0.25)) is not None:
                            break  # a job finished: its completed event goes now
                except RedisError as exc:
                    log.warning("webhook dispatcher: Redis error (%s); retrying", exc)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
        finally:
            with contextlib.suppress(RedisError):
                pubsub.close()
