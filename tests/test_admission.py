"""The admission policy on its own (`workers.admission`): plain data in, a decision out — no
model, no Redis, no engine. The engine's tests check that a lane carries the decisions out."""

from __future__ import annotations

import pytest

from workers.admission import Admission, AdmissionPolicy, WaitingJob


def job(
    key: str, arrived_at: float, rows: tuple[int, ...], running: int = 0, seq: int = 0
) -> WaitingJob:
    return WaitingJob(key, arrived_at, seq, rows, running)


def run_until_done(
    policy: AdmissionPolicy, jobs: list[WaitingJob], steps: dict[str, int], rounds: int = 100
) -> list[str]:
    """Drive the policy like a lane with one-step samples whose jobs take `steps[key]` rounds per
    sample: each round admits, then every admitted sample finishes. Returns the order in which the
    jobs' last samples were admitted."""
    waiting = {j.key: j for j in jobs}
    running: list[tuple[str, int, int]] = []  # (key, rows, rounds left)
    done: list[str] = []
    for _ in range(rounds):
        if not waiting and not running:
            return done
        held = {k: sum(r for key, r, _ in running if key == k) for k in waiting}
        current = [
            WaitingJob(j.key, j.arrived_at, j.seq, j.pending_rows, held[j.key])
            for j in waiting.values()
        ]
        decision = policy.admit(current, sum(r for _, r, _ in running))
        for key, count in decision.counts.items():
            j = waiting[key]
            running += [(key, r, steps[key]) for r in j.pending_rows[:count]]
            rest = j.pending_rows[count:]
            if rest:
                waiting[key] = WaitingJob(j.key, j.arrived_at, j.seq, rest)
            else:
                del waiting[key]
                done.append(key)  # type: ignore[arg-type]
        running = [(k, r, left - 1) for k, r, left in running if left > 1]
    raise AssertionError(f"jobs never admitted: {sorted(waiting)}")  # type: ignore[type-var]


def test_fifo_by_arrival_then_take_order() -> None:
    policy = AdmissionPolicy(max_batch=4)
    decision = policy.admit(
        [
            job("young", 3.0, (1, 1)),
            job("old", 1.0, (1, 1)),
            job("tie-later", 2.0, (1, 1), seq=2),
            job("tie-first", 2.0, (1, 1), seq=1),
        ],
        running_rows=0,
    )
    assert decision.counts == {"old": 2, "tie-first": 2}
    assert list(decision.counts) == ["old", "tie-first"]  # in the order they were served
    assert decision.rows == 4 and decision.blocked  # "young" found the call full


def test_batch_limit_counts_network_rows_and_the_running_set() -> None:
    policy = AdmissionPolicy(max_batch=8)
    # 5 rows already run: 3 free rows take three one-row samples of a 10-sample job.
    decision = policy.admit([job("a", 0.0, (1,) * 10)], running_rows=5)
    assert decision == Admission({"a": 3}, rows=3, blocked=True)
    assert policy.is_full(5, decision)
    # A full running set admits nothing.
    full = policy.admit([job("a", 0.0, (1,))], running_rows=8)
    assert full.counts == {} and full.blocked and policy.is_full(8, full)
    # Room left and nothing waiting: the lane may read its queue.
    empty = policy.admit([], running_rows=5)
    assert empty == Admission() and not policy.is_full(5, empty)


def test_guided_samples_count_two_rows() -> None:
    policy = AdmissionPolicy(max_batch=8)
    decision = policy.admit([job("guided", 0.0, (2,) * 6)], running_rows=0)
    assert decision.counts == {"guided": 4} and decision.rows == 8
    # One free row: a guided sample does not fit, even though a one-row sample would.
    decision = policy.admit([job("guided", 0.0, (2,))], running_rows=7)
    assert decision.counts == {} and decision.blocked


def test_a_sample_that_does_not_fit_blocks_younger_jobs() -> None:
    """Head of line: the guided job is older, so the one-row job behind it waits too."""
    policy = AdmissionPolicy(max_batch=4)
    decision = policy.admit([job("guided", 0.0, (2, 2)), job("plain", 1.0, (1,))], running_rows=1)
    assert decision.counts == {"guided": 1} and decision.blocked  # 1 + 2 rows; 1 row left


def test_guided_job_is_not_starved_by_one_row_arrivals() -> None:
    """One free row at a time never lets one-row jobs overtake a waiting two-row sample forever:
    everything arrives in order and every job is admitted in its arrival order."""
    policy = AdmissionPolicy(max_batch=3)
    jobs = [job("first", 0.0, (1,)), job("guided", 1.0, (2,))]
    jobs += [job(f"plain{i}", 2.0 + i, (1,)) for i in range(6)]
    steps = {j.key: 3 for j in jobs}
    order = run_until_done(policy, jobs, steps)  # type: ignore[arg-type]
    assert order == [j.key for j in jobs]


def test_per_job_share_cap_lets_a_younger_job_in() -> None:
    policy = AdmissionPolicy(max_batch=8, max_job_share=0.5)
    assert policy.job_cap_rows == 4
    decision = policy.admit([job("big", 0.0, (1,) * 8), job("small", 1.0, (1, 1))], 0)
    assert decision.counts == {"big": 4, "small": 2}
    assert not decision.blocked  # the cap is not a lack of room: the queue may be read
    # Rows a job already holds count against its cap.
    held = policy.admit([job("big", 0.0, (1,) * 4, running=3)], 3)
    assert held.counts == {"big": 1}
    # Without a share cap the big job takes the whole call and the small one waits.
    uncapped = AdmissionPolicy(max_batch=8).admit(
        [job("big", 0.0, (1,) * 8), job("small", 1.0, (1, 1))], 0
    )
    assert uncapped.counts == {"big": 8} and uncapped.blocked


def test_share_cap_is_at_least_one_guided_sample() -> None:
    policy = AdmissionPolicy(max_batch=4, max_job_share=0.1)
    assert policy.job_cap_rows == 2
    assert policy.admit([job("guided", 0.0, (2, 2))], 0).counts == {"guided": 1}


def test_fairness_under_the_share_cap() -> None:
    """Two large jobs and a small one arriving last: with a share cap, the small job gets in at
    once instead of after both large jobs; without one, strictly first come, first served."""
    jobs = [job("big1", 0.0, (1,) * 16), job("big2", 1.0, (1,) * 16), job("small", 2.0, (1,))]
    steps = {"big1": 4, "big2": 4, "small": 4}
    capped = run_until_done(AdmissionPolicy(max_batch=8, max_job_share=0.25), jobs, steps)
    uncapped = run_until_done(AdmissionPolicy(max_batch=8), jobs, steps)
    assert uncapped == ["big1", "big2", "small"]
    assert capped == ["small", "big1", "big2"]


def test_request_mode_admits_only_into_an_empty_running_set() -> None:
    policy = AdmissionPolicy(mode="request", max_batch=4)
    waiting = [job("a", 0.0, (1, 1)), job("b", 1.0, (1, 1, 1))]
    assert policy.admit(waiting, running_rows=1) == Admission()
    assert not policy.admits_into(1) and policy.admits_into(0)
    decision = policy.admit(waiting, running_rows=0)
    assert decision.counts == {"a": 2, "b": 2} and decision.blocked


def test_continuous_mode_admits_into_a_running_set() -> None:
    policy = AdmissionPolicy(mode="continuous", max_batch=4)
    assert policy.admits_into(3)
    assert policy.admit([job("a", 0.0, (1, 1))], running_rows=3).counts == {"a": 1}


def test_none_mode_admits_one_job_without_share_cap() -> None:
    policy = AdmissionPolicy(mode="none", max_batch=4, max_job_share=0.25)
    assert policy.job_cap_rows == 4
    decision = policy.admit([job("b", 1.0, (1,)), job("a", 0.0, (1, 1, 1))], running_rows=0)
    assert decision.counts == {"a": 3}  # the oldest, whole, alone
    assert policy.admit([job("b", 1.0, (1,))], running_rows=3) == Admission()


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"max_batch": 1}, "max_batch"), ({"max_job_share": 0.0}, "max_job_share")],
)
def test_invalid_limits_are_refused(fields: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdmissionPolicy(**fields)  # type: ignore[arg-type]
