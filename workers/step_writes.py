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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from redis.client import Pipeline
from rq.job import Job
from rq.utils import now

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

    def __bool__(self) -> bool:
        return bool(self.metas or self.successes or self.outcomes)


class StepWrites:
    """The current round's pending writes (used by the worker's loop thread only)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._round = Round()

    def save_meta(self, held: WorkerJob) -> None:
        """`held.job.meta` is to be saved (its state when the round is sent), if `held` is still
        the job's current attempt then."""
        self._round.metas[held.key] = held

    def succeed(self, success: Success) -> None:
        self._round.successes[success.held.key] = success

    def count(self, outcome: JobOutcome) -> None:
        self._round.outcomes.append(outcome)

    def discard(self, key: str) -> None:
        """An execution (`WorkerJob.key`) that ended another way (failed, canceled, lost): nothing
        of it is written."""
        self._round.metas.pop(key, None)
        self._round.successes.pop(key, None)

    def take(self) -> Round:
        taken, self._round = self._round, Round()
        return taken

    def give_back(self, taken: Round) -> None:
        """A round whose write failed: its meta and outcome writes go with the next round (its
        successes, meta included, are retried by the worker, one by one)."""
        for key, held in taken.metas.items():
            self._round.metas.setdefault(key, held)
        self._round.outcomes[:0] = taken.outcomes

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
