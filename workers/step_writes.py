"""What a batching worker's jobs write to Redis during one scheduling round, held until the round
ends and then sent together (`workers.exchange.RedisExchange`).

A round steps every model once; dozens of jobs may report progress in it and several may finish.
Written one by one, that is a round trip per progress write (`job.meta`) and about four per
finished job (RQ's success path); held here, the whole round costs one pipeline — or, when jobs
succeeded, one ownership check and one transaction (`workers.rq_bridge.finish_successes`: WATCH,
EXISTS, MULTI/EXEC) that also carries the progress writes and every job outcome of the round
(`ddserve.job_metrics`: the metrics the gateway renders). Failures and cancellations still finish
at once, through RQ's own paths; only their outcome counts wait for the round's write.

The writes wait for the worker's next exchange with Redis, which runs beside a round's network calls
at most every `redis_interval_ms` (`BatchingWorker.run_round`), or at once when no round follows:
a success is recorded at most about that interval and one step after its last image is stored, and
the rounds between merge (a job's meta is written once, with its latest progress).

The round also carries the entries of the jobs' event streams (`ddserve.job_events`: `started`,
`progress` with its previews), appended in the same pipeline or transaction as the meta writes, so
an SSE reader that sees a job ended has every entry before its end. Merged like the meta: a
progress entry without previews replaces the job's previous one of the round, when that one had
none either (a preview is never dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.client import Pipeline
from rq.job import Job
from rq.utils import now

from ddserve.job_events import EventKind, append, publish_updated
from ddserve.job_metrics import JobOutcome, Outcome, record_outcome
from ddserve.jobs import META_PROGRESS, JobOutput
from ddserve.recovery import fenced_meta_write
from workers import rq_bridge

if TYPE_CHECKING:
    from workers.rq_adaptor import WorkerJob


def job_outcome(
    job: Job,
    model: str,
    outcome: Outcome,
    queue_s: float | None,
    *,
    images: int = 0,
    batch_rows: int | None = None,
) -> JobOutcome:
    """The metrics of one ended attempt; its run time ends at `job.ended_at` (or now, if RQ has not
    set it yet), its step count is the job's last progress total (generate and inpaint only)."""
    run_s = None
    if job.started_at is not None:
        run_s = max(0.0, ((job.ended_at or now()) - job.started_at).total_seconds())
    total = (job.meta.get(META_PROGRESS) or {}).get("total")
    return JobOutcome(
        model=model,
        outcome=outcome,
        queue_s=queue_s,
        run_s=run_s,
        images=images,
        batch_rows=batch_rows,
        steps=int(total) if total else None,
    )


@dataclass
class Success:
    """A job that succeeded during the round, waiting for the round's transaction."""

    held: WorkerJob
    output: JobOutput
    batch_rows: int

    @property
    def job(self) -> Job:
        return self.held.job

    @property
    def item(self) -> rq_bridge.Succeeded:
        """What `rq_bridge.finish_successes` finishes."""
        held = self.held
        return rq_bridge.Succeeded(held.job, held.queue, held.execution, self.output, held.attempt)

    def outcome(self) -> JobOutcome:
        return job_outcome(
            self.job,
            self.held.model,
            "succeeded",
            self.held.queue_s,
            images=len(self.output.get("images") or []),
            batch_rows=self.batch_rows,
        )


@dataclass
class Round:
    """The writes of one round, taken out of `StepWrites` to be sent."""

    metas: dict[str, WorkerJob] = field(default_factory=dict)  # key → whose meta to save
    successes: dict[str, Success] = field(default_factory=dict)  # WorkerJob.key → its success
    outcomes: list[JobOutcome] = field(default_factory=list)  # failed, canceled, retried
    # job id → its event-stream entries of the round, in order
    events: dict[str, list[tuple[EventKind, dict[str, Any]]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.metas or self.successes or self.outcomes or self.events)


class StepWrites:
    """The current round's pending writes (used by the worker's loop thread only)."""

    def __init__(self, prefix: str, events_ttl_s: int = 86400, events: bool = True) -> None:
        self.prefix = prefix
        self.events_ttl_s = events_ttl_s  # how long a job's event stream outlives its last entry
        self.events = events  # False: no event streams (`DDSERVE_JOB_EVENTS=false`)
        self._round = Round()

    def save_meta(self, held: WorkerJob) -> None:
        """`held.job.meta` is to be saved (its state when the round is sent), if `held` is still
        the job's current attempt then."""
        self._round.metas[held.key] = held

    def succeed(self, success: Success) -> None:
        self._round.successes[success.held.key] = success

    def event(self, job_id: str, kind: EventKind, data: dict[str, Any]) -> None:
        """An entry for the job's event stream (see the module docstring for the merging)."""
        if not self.events:
            return
        entries = self._round.events.setdefault(job_id, [])
        merges = kind == EventKind.PROGRESS and "previews" not in data
        if merges and entries and entries[-1][0] == kind and "previews" not in entries[-1][1]:
            entries[-1] = (kind, data)
        else:
            entries.append((kind, data))

    def count(self, outcome: JobOutcome) -> None:
        self._round.outcomes.append(outcome)

    def discard(self, key: str, job_id: str | None = None) -> None:
        """An execution (`WorkerJob.key`) that ended another way (failed, canceled, lost): nothing
        of it is written — nor its job's event entries of the round, given `job_id`."""
        self._round.metas.pop(key, None)
        self._round.successes.pop(key, None)
        if job_id is not None:
            self._round.events.pop(job_id, None)

    def take(self) -> Round:
        taken, self._round = self._round, Round()
        return taken

    def give_back(self, taken: Round) -> None:
        """A round whose write failed: its meta and outcome writes go with the next round (its
        successes, meta included, are retried by the worker, one by one)."""
        for key, held in taken.metas.items():
            self._round.metas.setdefault(key, held)
        self._round.outcomes[:0] = taken.outcomes
        for job_id, entries in taken.events.items():  # before this round's own, in order
            self._round.events[job_id] = entries + self._round.events.get(job_id, [])

    def queue_writes(self, pipe: Pipeline, taken: Round, successes: list[Success]) -> None:
        """Queue the round's meta saves (each fenced by its attempt: a stale execution's is dropped
        by Redis) and outcome counts, and the meta saves and outcome counts of `successes` (fenced
        by the transaction they finish in), on `pipe` (RQ's success path saves a job without its
        meta)."""
        for held in taken.metas.values():
            fenced_meta_write(pipe, held.job, held.attempt)
        for outcome in taken.outcomes:
            record_outcome(pipe, self.prefix, outcome)
        for success in successes:
            rq_bridge.save_meta(success.job, pipe)
            record_outcome(pipe, self.prefix, success.outcome())
        for job_id, entries in taken.events.items():
            for kind, data in entries:
                append(pipe, self.prefix, job_id, kind, data, self.events_ttl_s, wake=False)
        publish_updated(pipe, self.prefix, list(taken.events))  # one wake-up for the round
