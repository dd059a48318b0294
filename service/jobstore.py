"""The gateway's side of the job queue: every Redis/RQ call the routes make, synchronous.

RQ's client is synchronous; routes call these methods through `anyio.to_thread.run_sync`, so the
event loop only ever awaits. Each method makes a handful of round trips (pipelined where RQ lets
us). A job belongs to this deployment when its queue starts with `{key_prefix}:` and it runs the
contract's job function; anything else reads as "no such job".
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, Retry
from rq.job import JobStatus as RQJobStatus
from rq.queue import Queue
from rq.registry import (
    CanceledJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    StartedJobRegistry,
)
from rq.results import Result
from rq.utils import now as rq_now
from rq.utils import utcformat
from rq.worker_registration import get_keys

from ddserve.jobs import (
    JOB_FUNCTION,
    META_BATCH_SIZE,
    META_ERROR,
    META_KIND,
    META_MODEL,
    META_OWNER,
    META_PROGRESS,
    META_WEBHOOK,
    TERMINAL,
    JobStatus,
    cancel_set_key,
    public_status,
    queue_name,
)
from ddserve.notifications import publish_finished
from ddserve.settings import Settings
from service.webhooks.keys import watched_key

# HGET status of every key; a missing job's `false` becomes a nil reply (no hole in the array).
_STATUSES_LUA = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGET', key, 'status') end
return out
"""
STATUS_CHUNK = 1000  # job statuses per script call


@dataclass
class JobSnapshot:
    """Everything the gateway shows about a job, read in one go."""

    id: str
    status: JobStatus
    kind: str
    model: str
    owner: str | None
    created_at: datetime | None
    enqueued_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    queue_position: int | None
    progress: dict[str, Any] | None
    batch_size: int | None
    error: dict[str, Any] | None
    input: dict[str, Any]
    output: dict[str, Any] | None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass
class Enqueued:
    """What `JobStore.enqueue` did: the job (None if refused for the queue limit), the jobs queued
    ahead of it, and the queued + running count it found."""

    job: Job | None
    ahead: int
    load: int


def _rq_status(job: Job) -> str:
    """RQ's status as its plain value ("queued", …): str() of RQ's enum gives "JobStatus.QUEUED"."""
    status = job.get_status(refresh=False)
    return str(getattr(status, "value", status))


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


class JobStore:
    """Enqueue, read and cancel jobs, and count queues and workers, for the served models."""

    def __init__(self, connection: redis.Redis, settings: Settings, models: list[str]) -> None:
        self.connection = connection
        self.settings = settings
        self.prefix = settings.key_prefix
        self.queues = {m: Queue(queue_name(self.prefix, m), connection=connection) for m in models}
        self.cancel_key = cancel_set_key(self.prefix)

    # --- submit ---

    def enqueue(
        self,
        model: str,
        request: dict[str, Any],
        job_id: str,
        meta: dict[str, Any],
        max_load: int | None = None,
    ) -> Enqueued:
        """One RQ job for `request` on the model's queue (TTLs, deadline and retries from settings),
        in one round trip: a MULTI/EXEC that first counts the queued and running jobs, then saves
        and pushes the job. If the counts say the queue was already at `max_load`, the job is taken
        back out (LREM decides against a worker that dequeued it meanwhile: then it stays admitted)
        and `Enqueued.job` is None."""
        s = self.settings
        queue = self.queues[model]
        pipe = self.connection.pipeline(transaction=True)
        pipe.multi()  # explicit, as RQ expects of a caller's pipeline
        pipe.llen(queue.key)
        pipe.zcard(StartedJobRegistry(queue=queue).key)
        self._index(pipe, meta.get(META_OWNER), job_id)
        if meta.get(META_WEBHOOK):  # its events are dispatched from here on (service.webhooks)
            pipe.zadd(watched_key(self.prefix), {job_id: int(rq_now().timestamp() * 1000)})
        job = queue.enqueue_call(
            JOB_FUNCTION,
            kwargs={"request": request},
            job_id=job_id,
            meta=meta,
            # No RQ `ttl`: it would delete a job still queued after job_ttl_s, which would then
            # answer 404; such a job ends `failed` instead (ddserve.recovery.fail_expired).
            result_ttl=s.result_ttl_s,
            failure_ttl=s.failure_ttl_s,
            timeout=max(1, int(s.job_deadline_s)),
            retry=Retry(max=s.max_retries) if s.max_retries > 0 else None,
            description=f"{request.get('kind')} {model}",
            pipeline=pipe,
        )
        queued, started = (int(v) for v in pipe.execute()[:2])
        over = max_load is not None and queued + started >= max_load
        if over and self.connection.lrem(queue.key, 0, job.id):
            job.delete(remove_from_queue=False)
            self.connection.zrem(self.index_key(meta.get(META_OWNER)), job.id)
            self.connection.zrem(watched_key(self.prefix), job.id)
            return Enqueued(None, queued, queued + started)
        return Enqueued(job, queued, queued + started)

    def fresh_snapshot(self, job: Job, position: int) -> JobSnapshot:
        """The snapshot of a job just enqueued, from memory (no Redis round trip)."""
        meta = job.meta or {}
        request = dict(job.kwargs.get("request") or {})
        return JobSnapshot(
            id=job.id,
            status=JobStatus.QUEUED,
            kind=str(meta.get(META_KIND) or request.get("kind") or ""),
            model=str(meta.get(META_MODEL) or request.get("model") or ""),
            owner=meta.get(META_OWNER),
            created_at=_utc(job.created_at),
            enqueued_at=_utc(job.enqueued_at),
            started_at=None,
            ended_at=None,
            queue_position=position,
            progress=None,
            batch_size=None,
            error=None,
            input=request,
            output=None,
        )

    # --- each caller's jobs (GET /jobs) ---

    def index_key(self, owner: str | None) -> str:
        """The sorted set of an owner's job ids, scored by creation time (ms); auth off: one."""
        return f"{self.prefix}:jobs-of:{owner or '-'}"

    def _retention_ms(self) -> int:
        s = self.settings
        return int(1000 * max(s.result_ttl_s, s.failure_ttl_s, s.job_ttl_s + s.job_deadline_s))

    def _index(self, pipe: Any, owner: str | None, job_id: str) -> None:
        """Add a new job to its owner's index (in the enqueue's transaction); entries older than
        any job record can be are trimmed here, and the key expires with its newest job."""
        now_ms = int(rq_now().timestamp() * 1000)
        key = self.index_key(owner)
        pipe.zadd(key, {job_id: now_ms})
        pipe.zremrangebyscore(key, "-inf", now_ms - self._retention_ms())
        pipe.pexpire(key, self._retention_ms())

    def list_ids(
        self,
        owner: str | None,
        *,
        before: tuple[int, str] | None,
        limit: int,
        status: JobStatus | None,
        model: str | None,
        scan_budget: int,
    ) -> tuple[list[str], tuple[int, str] | None]:
        """An owner's job ids, newest first, strictly after the cursor `before` (score, id), that
        match `status` and `model`: at most `limit` of them, reading at most `scan_budget` index
        entries. Returns them and the cursor to continue from (None when the index is done).
        Ids whose job has expired are dropped from the index as they are met."""
        key = self.index_key(owner)
        found: list[str] = []
        cursor = before
        scanned = 0
        page = max(limit, 32)
        while len(found) < limit and scanned < scan_budget:
            entries = self._entries_after(key, cursor, page)
            if not entries:
                return found, None
            pipe = self.connection.pipeline(transaction=False)
            for member, _ in entries:
                pipe.hmget(Job.key_for(member.decode()), "status", "origin")
            gone = []
            for (member, score), (raw_status, origin) in zip(entries, pipe.execute(), strict=True):
                job_id = member.decode()
                cursor = (int(score), job_id)
                scanned += 1
                if raw_status is None:
                    gone.append(job_id)
                    continue
                if status is not None and public_status(raw_status.decode()) != status:
                    continue
                if model is not None and origin != queue_name(self.prefix, model).encode():
                    continue
                found.append(job_id)
                if len(found) == limit or scanned >= scan_budget:
                    break
            if gone:
                self.connection.zrem(key, *gone)
        return found, cursor

    def _entries_after(
        self, key: str, cursor: tuple[int, str] | None, page: int
    ) -> list[tuple[bytes, float]]:
        """Up to `page` index entries strictly after `cursor` in (score desc, id desc) order: the
        order ZREVRANGEBYSCORE gives. Entries sharing the cursor's score are skipped by id."""
        top: float | str = "+inf" if cursor is None else cursor[0]
        offset = 0
        while True:
            entries = self.connection.zrevrangebyscore(
                key, top, "-inf", start=offset, num=page, withscores=True
            )
            if not entries or cursor is None:
                return entries
            fresh = [
                (member, score)
                for member, score in entries
                if int(score) < cursor[0] or member.decode() < cursor[1]
            ]
            if fresh:
                return fresh
            offset += len(entries)  # all at the cursor's score, already returned

    # --- read ---

    def fetch(self, job_id: str) -> Job | None:
        """The job if it exists and is one of ours."""
        try:
            job = Job.fetch(job_id, connection=self.connection)
        except NoSuchJobError:
            return None
        return job if self._is_ours(job) else None

    def status(self, job_id: str) -> JobStatus | None:
        """Only the public status (one HGET): what `Prefer: wait` polls."""
        raw = self.connection.hget(Job.key_for(job_id), "status")
        return None if raw is None else public_status(raw.decode())

    def statuses(self, job_ids: list[str]) -> list[JobStatus | None]:
        """The public status of many jobs in one round trip (None: no such job): what the waiter's
        safety poll reads for every held request. A Lua script reads `STATUS_CHUNK` statuses per
        call (pipelined when there are more): for this process that costs about a sixth of as
        many pipelined HGETs (3,000 ids: ~8 ms of CPU against ~47 ms), and Redis about a
        millisecond per chunk."""
        if not job_ids:
            return []
        pipe = self.connection.pipeline(transaction=False)
        for start in range(0, len(job_ids), STATUS_CHUNK):
            keys = [Job.key_for(job_id) for job_id in job_ids[start : start + STATUS_CHUNK]]
            pipe.eval(_STATUSES_LUA, len(keys), *keys)
        return [
            None if raw is None else public_status(raw.decode())
            for chunk in pipe.execute()
            for raw in chunk
        ]

    def _is_ours(self, job: Job) -> bool:
        return (job.origin or "").startswith(f"{self.prefix}:") and job.func_name == JOB_FUNCTION

    def snapshot(self, job: Job) -> JobSnapshot:
        """The job's public state; reads the latest result only once it succeeded."""
        status = public_status(_rq_status(job))
        position = None
        if status == JobStatus.QUEUED:
            position = self.connection.lpos(Queue.redis_queue_namespace_prefix + job.origin, job.id)
        output = None
        if status == JobStatus.SUCCEEDED:
            value = job.return_value(refresh=True)
            output = value if isinstance(value, dict) else None
        return _snapshot(job, status, position, output)

    def snapshots(self, job_ids: list[str]) -> list[JobSnapshot | None]:
        """The snapshots of many jobs (None: no such job, or not ours) in two round trips whatever
        their number: every job hash in one pipeline, then the latest result of the succeeded ones
        and the queue position of the queued ones in another. What the waiter reads when a burst
        of held requests wakes together (3,000 jobs finishing in a few seconds): one thread hop
        and two round trips for the burst instead of a hop and two round trips per request."""
        if not job_ids:
            return []
        jobs = [
            job if job is not None and self._is_ours(job) else None
            for job in Job.fetch_many(job_ids, connection=self.connection)
        ]
        statuses = [None if job is None else public_status(_rq_status(job)) for job in jobs]
        pipe = self.connection.pipeline(transaction=False)
        asked: list[int] = []
        for i, (job, status) in enumerate(zip(jobs, statuses, strict=True)):
            if job is None:
                continue
            if status == JobStatus.SUCCEEDED:
                pipe.xrevrange(Result.get_key(job.id), "+", "-", count=1)
                asked.append(i)
            elif status == JobStatus.QUEUED:
                pipe.lpos(Queue.redis_queue_namespace_prefix + job.origin, job.id)
                asked.append(i)
        replies = dict(zip(asked, pipe.execute() if asked else [], strict=True))
        snaps: list[JobSnapshot | None] = []
        for i, (job, status) in enumerate(zip(jobs, statuses, strict=True)):
            if job is None or status is None:
                snaps.append(None)
                continue
            position = replies.get(i) if status == JobStatus.QUEUED else None
            output = None
            if status == JobStatus.SUCCEEDED and replies.get(i):
                result_id, payload = replies[i][0]
                result = Result.restore(
                    job.id, result_id.decode(), payload, connection=self.connection
                )
                if result.type == Result.Type.SUCCESSFUL and isinstance(result.return_value, dict):
                    output = result.return_value
            snaps.append(_snapshot(job, status, position, output))
        return snaps

    # --- cancel ---

    def cancel(self, job: Job) -> None:
        """Ask for the job to stop. A job still in its queue is taken out and marked canceled here
        (LREM decides the race with a worker's dequeue: whoever removes it owns it); a running one
        is flagged in the cancel set, which workers check between denoising steps."""
        job.get_status(refresh=True)
        if public_status(_rq_status(job)) in TERMINAL:
            return
        self.connection.sadd(self.cancel_key, job.id)
        removed = self.connection.lrem(Queue.redis_queue_namespace_prefix + job.origin, 0, job.id)
        if removed:
            with contextlib.suppress(InvalidJobOperation):  # canceled concurrently
                job.cancel()
                # RQ's cancel leaves ended_at empty; the job's completed_at is the cancel time.
                # Held requests on the job (Prefer: wait) wake on the notification sent with it.
                pipe = self.connection.pipeline(transaction=False)
                pipe.hset(job.key, "ended_at", utcformat(rq_now()))
                publish_finished(pipe, self.prefix, job.id)
                pipe.execute()

    # --- counts ---

    def workers_alive(self) -> dict[str, int]:
        """Live RQ workers (their heartbeat key exists) listening on each model's queue."""
        alive: dict[str, int] = {}
        for model, queue in self.queues.items():
            keys = sorted(get_keys(queue=queue, connection=self.connection))
            if not keys:
                alive[model] = 0
                continue
            pipe = self.connection.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            alive[model] = sum(1 for exists in pipe.execute() if exists)
        return alive

    def counts(self) -> dict[str, dict[str, int]]:
        """Per model: jobs queued, running, and those finished/failed/canceled still on record.

        A job canceled while it ran ends as RQ's stop-job command ends it: status `stopped`, in
        the failed-job registry (`workers.rq_bridge.finish_stopped`). It was canceled, not failed,
        so the failed registry's jobs are told apart by their status (one HGET each, in a second
        pipelined round trip; the registry holds the failures of `failure_ttl_s` only)."""
        pipe = self.connection.pipeline(transaction=False)
        for queue in self.queues.values():
            pipe.llen(queue.key)
            pipe.zcard(StartedJobRegistry(queue=queue).key)
            pipe.zcard(FinishedJobRegistry(queue=queue).key)
            pipe.zrange(FailedJobRegistry(queue=queue).key, 0, -1)
            pipe.zcard(CanceledJobRegistry(queue=queue).key)
        values = pipe.execute()
        failed_ids = [values[i * 5 + 3] for i in range(len(self.queues))]
        pipe = self.connection.pipeline(transaction=False)
        for ids in failed_ids:
            for job_id in ids:
                pipe.hget(Job.key_for(job_id.decode()), "status")
        statuses = iter(pipe.execute())
        out = {}
        for i, model in enumerate(self.queues):
            queued, running, succeeded, _, canceled = values[i * 5 : i * 5 + 5]
            stopped = sum(
                next(statuses) == RQJobStatus.STOPPED.value.encode() for _ in failed_ids[i]
            )
            out[model] = {
                "queued": int(queued),
                "running": int(running),
                "succeeded": int(succeeded),
                "failed": len(failed_ids[i]) - stopped,
                "canceled": int(canceled) + stopped,
            }
        return out

    def ping(self) -> bool:
        try:
            return bool(self.connection.ping())
        except (redis.ConnectionError, redis.TimeoutError):
            return False


def _snapshot(
    job: Job, status: JobStatus, position: int | None, output: dict[str, Any] | None
) -> JobSnapshot:
    """A job's public state from its hash (`job`), its queue position and its result's value."""
    meta = job.meta or {}
    try:
        request = dict(job.kwargs.get("request") or {})
    except Exception:  # an unreadable payload must not hide the job's status
        request = {}
    error = meta.get(META_ERROR)
    if status == JobStatus.FAILED and not error:
        error = {
            "type": "server_error",
            "code": "job_failed",
            "message": "the job failed (or expired before a worker took it)",
        }
    return JobSnapshot(
        id=job.id,
        status=status,
        kind=str(meta.get(META_KIND) or request.get("kind") or ""),
        model=str(meta.get(META_MODEL) or request.get("model") or ""),
        owner=meta.get(META_OWNER),
        created_at=_utc(job.created_at),
        enqueued_at=_utc(job.enqueued_at),
        started_at=_utc(job.started_at),
        ended_at=_utc(job.ended_at),
        queue_position=position,
        progress=meta.get(META_PROGRESS),
        batch_size=meta.get(META_BATCH_SIZE),
        error=error if status == JobStatus.FAILED else None,
        input=request,
        output=output,
    )
