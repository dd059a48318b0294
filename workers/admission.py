"""Admission at a step boundary: which waiting samples join a model's running set.

A pure policy — no I/O, no threads, no torch: the lane describes its waiting jobs and the rows its
running set already holds, and `AdmissionPolicy.admit` says how many of each job's waiting samples
join (always from the head of the job's list, so its images keep their order). The lane then moves
those samples and reads the queue again only while the decision says there is room.

The rules, in every batching mode:
- rows are network rows: a sample under classifier-free guidance takes two (its unconditional
  copy shares the call), and one call holds at most `max_batch` rows;
- jobs are served by age (FIFO: oldest arrival first, then the order this worker took them);
- a job holds at most `max_job_share` of a call (at least one guided sample, two rows), so a
  large job cannot keep a small one waiting for its whole run; the rows it cannot place wait for
  its own samples to finish, while younger jobs use the rest of the call;
- a sample that does not fit in the free rows blocks every younger job (head of line), so a
  two-row sample is never overtaken forever by one-row ones: no job starves.

Modes: `continuous` admits at every step boundary; `request` and `none` admit only into an empty
running set (the set then runs to its end), `none` one job at a time (and no share cap, since
that job is alone).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

BatchingMode = Literal["continuous", "request", "none"]


@dataclass(frozen=True)
class WaitingJob:
    """A job held by a lane with samples not yet in the running set."""

    key: Hashable  # what the decision names it by (the lane uses the job id)
    arrived_at: float  # when it was queued (seconds since the epoch): older is served first
    seq: int  # order in which this worker took it (ties of `arrived_at`)
    pending_rows: tuple[int, ...]  # rows of each waiting sample, in the order they must join
    running_rows: int = 0  # rows its samples already hold in the running set


@dataclass(frozen=True)
class Admission:
    """What joins: `counts[key]` samples from the head of that job's waiting list."""

    counts: dict[Hashable, int] = field(default_factory=dict)
    rows: int = 0  # rows admitted in all
    blocked: bool = False  # a waiting sample found no room (the call is as full as it can be)

    @property
    def samples(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class AdmissionPolicy:
    """The limits of one model's network calls; see the module docstring."""

    mode: BatchingMode = "continuous"
    max_batch: int = 64  # network rows of one call (classifier-free guidance: 2 per sample)
    max_job_share: float = 1.0  # largest fraction of max_batch one job may hold

    def __post_init__(self) -> None:
        if self.max_batch < 2:
            raise ValueError("max_batch must be ≥ 2 (a guided sample takes two rows)")
        if not 0.0 < self.max_job_share <= 1.0:
            raise ValueError("max_job_share must be in (0, 1]")

    @property
    def job_cap_rows(self) -> int:
        """Rows one job may hold in a call: its share of max_batch, at least one guided sample."""
        if self.mode == "none":
            return self.max_batch
        return max(2, math.floor(self.max_job_share * self.max_batch))

    def admits_into(self, running_rows: int) -> bool:
        """Whether this mode admits anything into a running set holding `running_rows` rows."""
        return self.mode == "continuous" or running_rows == 0

    def is_full(self, running_rows: int, admission: Admission) -> bool:
        """After `admission`, whether the lane should stop reading its queue this round: the call
        is full, or a waiting sample could not get in (more jobs would only wait behind it)."""
        return admission.blocked or running_rows + admission.rows >= self.max_batch

    def admit(self, waiting: Sequence[WaitingJob], running_rows: int) -> Admission:
        """The samples that join a running set holding `running_rows` rows (see the module
        docstring for the rules)."""
        if not self.admits_into(running_rows):
            return Admission()
        free = self.max_batch - running_rows
        cap = self.job_cap_rows
        counts: dict[Hashable, int] = {}
        admitted_rows = 0
        blocked = False
        for job in sorted(waiting, key=lambda j: (j.arrived_at, j.seq)):
            held = job.running_rows
            taken = 0
            for rows in job.pending_rows:
                if rows > free:
                    blocked = True
                    break
                if held + rows > cap:
                    break
                held += rows
                free -= rows
                admitted_rows += rows
                taken += 1
            if taken:
                counts[job.key] = taken
            if blocked or (self.mode == "none" and job.pending_rows):
                break
        return Admission(counts, admitted_rows, blocked)
