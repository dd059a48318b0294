"""Chaos run: sustained load on the whole stack while a worker is killed and Redis is restarted.

The stack, all real processes on this machine: a private `redis-server` with AOF persistence
(`--appendonly yes --appendfsync everysec`, as the compose file runs it), one gateway
(`ddserve serve`) and two workers (`ddserve worker`, continuous batching) on a tiny random
diffusion model (what is measured is the bookkeeping, not the images).

A client submits `--jobs` generation jobs at `--rate` per second, each with its own
`Idempotency-Key`; a submission that gets no answer, a 503 or a 429 is retried with the same key
(at most every 0.25 s, or after Retry-After) until the gateway accepts it. Meanwhile:

1. at `--kill-at` s one worker gets SIGKILL in the middle of its batch; it is started again (under a
   new name) `--restart-after` s later. Its jobs are retried by the other worker once their
   started-registry entry expires (`abandoned_after_s`, set to `--abandoned-after` here);
2. at `--redis-at` s Redis is restarted: SIGTERM (a clean stop, as `docker compose restart` does;
   `--redis-crash` sends SIGKILL instead: a process crash, after which the AOF still holds every
   acknowledged write, since Redis writes the AOF before it answers — everysec's last second is at
   risk only if the machine itself goes down), down for `--redis-down` s, then started again on the
   same AOF. `--long-outage` keeps it down 2 × `abandoned_after_s` instead (issue #18 item 5):
   every running job's started-registry entry has expired when Redis returns although every
   worker is alive, and the recovery grace (`--recovery-grace`, the setting
   `recovery_grace_s`; 0 = sweep as soon as Redis answers) must keep the sweepers from running
   those jobs a second time or failing them. The natural race (a sweep before the workers'
   heartbeats) is lost only now and then; `--sweep-on-return` makes this process a sweeper that
   tries every 0.1 s from the moment Redis is back — as a janitor round landing then would —
   under the same rule (`RecoveryGrace` with the stack's grace), so that `--recovery-grace 0`
   shows what the grace prevents.

After the load the run waits for every accepted job to end (`--drain` s at most) and prints:
- accepted (distinct job ids the gateway answered with), succeeded, failed, canceled, and lost
  (accepted but not ended: still queued/running after the drain, or unknown to Redis) — lost must be
  0 — plus duplicates: jobs with more than one successful result (finished twice), and jobs in Redis
  no accepted submission answered with (a client retry that created a second job);
- the jobs running when Redis went down: how many were handed out again (more than one attempt:
  run twice) or failed (`worker_lost`) — both must be 0;
- recovery times: after the worker kill, until none of the dead worker's jobs is still `started` by
  it (they were retried or failed); after Redis is back, until the gateway accepts a job again and
  until a worker completes a job again; and how long clients saw errors around the restart.

    .venv/bin/python -m benchmarks.chaos [--jobs 400] [--rate 10] [--json results.json]

(run from the repository root: it reuses the tests' Redis-server and tiny-model helpers).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job
from rq.queue import Queue
from rq.results import Result

from ddserve.jobs import queue_name
from ddserve.recovery import ATTEMPT_FIELD, RecoveryGrace, maintenance_lock, recover_abandoned
from tests.redis_server import RedisServer, free_port
from tests.tiny_zoo import write_diffusion_model

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-ddpm"
TERMINAL = {"finished", "failed", "canceled", "stopped"}
RETRY_PAUSE_S = 0.25  # a rejected or unanswered submission is retried this often at most


@dataclass
class Submission:
    """One logical job of the load: its key, every attempt's outcome, the id it was accepted as."""

    index: int
    key: str
    attempts: list[tuple[float, str]] = field(default_factory=list)  # (time, status or error)
    job_id: str | None = None
    accepted_at: float | None = None
    other_ids: set[str] = field(default_factory=set)  # ids of other answers (must stay empty)


class Stack:
    """Redis, a gateway and named workers, as subprocesses of this run."""

    def __init__(self, scratch: Path, args: argparse.Namespace) -> None:
        self.scratch = scratch
        self.redis = RedisServer(scratch / "redis")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = f"chaos-{uuid.uuid4().hex[:6]}"
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.gateway: subprocess.Popen[bytes] | None = None
        self.args = args

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DDSERVE_REDIS_URL": self.redis.url,
            "DDSERVE_KEY_PREFIX": self.prefix,
            "DDSERVE_ZOO_DIR": str(self.scratch / "zoo"),
            "DDSERVE_MODELS": MODEL,
            "DDSERVE_STORAGE_DIR": str(self.scratch / "images"),
            "DDSERVE_AUTH_ENABLED": "false",
            "DDSERVE_RATE_LIMIT_PER_MINUTE": "0",
            "DDSERVE_MAX_QUEUE_LENGTH": "100000",
            "DDSERVE_DEVICE": "cpu",
            "DDSERVE_ABANDONED_AFTER_S": str(self.args.abandoned_after),
            "DDSERVE_HEARTBEAT_S": str(max(0.5, self.args.abandoned_after / 5)),
            "DDSERVE_LOG_LEVEL": "WARNING",
            "DDSERVE_PORT": str(self.port),
            "OMP_NUM_THREADS": "1",
            **(
                {"DDSERVE_RECOVERY_GRACE_S": str(self.args.recovery_grace)}
                if self.args.recovery_grace is not None
                else {}
            ),
        }

    def _log(self, name: str) -> Any:
        return (self.scratch / f"{name}.log").open("ab")

    def start_gateway(self) -> None:
        command = [sys.executable, "-m", "ddserve.cli", "serve", "--host", "127.0.0.1"]
        self.gateway = subprocess.Popen(
            command, env=self.env(), cwd=ROOT, stdout=self._log("gateway"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the gateway did not come up")

    def start_worker(self, name: str) -> None:
        command = [sys.executable, "-m", "ddserve.cli", "worker", "--models", MODEL]
        self.workers[name] = subprocess.Popen(
            [*command, "--name", self.worker_name(name)],
            env=self.env(),
            cwd=ROOT,
            stdout=self._log(name),
            stderr=subprocess.STDOUT,
        )

    def worker_name(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def wait_workers_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                answer = httpx.get(f"{self.url}/readyz", timeout=2).json()
                if answer.get("workers", {}).get(MODEL, 0) >= len(self.workers):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError("the workers did not register")

    def stop(self) -> None:
        for process in [*self.workers.values(), self.gateway]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(30)
        self.redis.kill()


class Load:
    """The client: `jobs` submissions at `rate` per second, each retried until accepted."""

    def __init__(self, url: str, jobs: int, rate: float, steps: int) -> None:
        self.url = url
        self.rate = rate
        self.steps = steps
        run = uuid.uuid4().hex[:8]
        self.submissions = [Submission(i, f"chaos-{run}-{i}") for i in range(jobs)]
        self.local = threading.local()
        self.started_at = 0.0

    def body(self, index: int) -> dict[str, Any]:
        return {
            "model": MODEL,
            "n": 2,
            "sampler": "ddpm",
            "num_inference_steps": self.steps,
            "class_label": index % 10,
            "seed": index,
        }

    def client(self) -> httpx.Client:
        if not hasattr(self.local, "client"):
            self.local.client = httpx.Client(base_url=self.url, timeout=5.0)
        return self.local.client

    def submit(self, submission: Submission, give_up_s: float = 120.0) -> None:
        deadline = time.time() + give_up_s
        while time.time() < deadline:
            pause = RETRY_PAUSE_S
            try:
                response = self.client().post(
                    "/generate",
                    json=self.body(submission.index),
                    headers={"Idempotency-Key": submission.key},
                )
                submission.attempts.append((time.time(), str(response.status_code)))
                if response.status_code in (200, 202):
                    job_id = response.json()["id"]
                    if submission.job_id is None:
                        submission.job_id, submission.accepted_at = job_id, time.time()
                    elif job_id != submission.job_id:
                        submission.other_ids.add(job_id)
                    return
                pause = min(float(response.headers.get("retry-after", pause)), RETRY_PAUSE_S)
            except httpx.HTTPError as exc:
                submission.attempts.append((time.time(), type(exc).__name__))
            time.sleep(pause)

    def run(self) -> None:
        """Submit on schedule (job i at i / rate seconds), retries in the pool's threads."""
        self.started_at = time.time()
        with ThreadPoolExecutor(max_workers=32) as pool:
            for submission in self.submissions:
                due = self.started_at + submission.index / self.rate
                time.sleep(max(0.0, due - time.time()))
                pool.submit(self.submit, submission)


def job_states(connection: Redis, ids: list[str]) -> dict[str, tuple[str | None, str | None]]:
    """{job id: (RQ status, worker name)} in one round trip (None where the job is unknown)."""
    pipe = connection.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(Job.key_for(job_id), "status", "worker_name")
    out = {}
    for job_id, (status, worker) in zip(ids, pipe.execute(), strict=True):
        out[job_id] = (
            status.decode() if status else None,
            worker.decode() if worker else None,
        )
    return out


def wait_dead_workers_jobs_recovered(
    connection: Redis, held: list[str], dead_worker: str, timeout_s: float
) -> float | None:
    """Seconds until none of `held` is still `started` by the dead worker (None: not in time)."""
    started = time.time()
    while time.time() - started < timeout_s:
        try:
            states = job_states(connection, held)
            if not any(s == "started" and w == dead_worker for s, w in states.values()):
                return time.time() - started
        except RedisError:
            pass
        time.sleep(0.05)
    return None


def sweep_from_return(
    url: str, prefix: str, grace_s: float, until: float, stop: threading.Event
) -> int:
    """A sweeper started when Redis is back: every 0.1 s, once its grace is over (Redis answered
    for `grace_s` without a break), retry or fail the abandoned jobs as a janitor round does.
    Returns the sweeps it made."""
    connection = Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    queue = Queue(queue_name(prefix, MODEL), connection=connection)
    grace = RecoveryGrace(grace_s)
    sweeps = 0
    while time.time() < until and not stop.is_set():
        try:
            connection.ping()
            grace.reachable()
            if grace.open():
                with maintenance_lock(queue, 1.0) as got:
                    if got:
                        recover_abandoned(queue)
                        sweeps += 1
        except RedisError:
            grace.unreachable()
        time.sleep(0.1)
    return sweeps


def attempts_of(connection: Redis, ids: list[str]) -> dict[str, int]:
    """{job id: how many times a worker took it} (`ddserve.recovery.ATTEMPT_FIELD`)."""
    pipe = connection.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(Job.key_for(job_id), ATTEMPT_FIELD)
    return {job_id: int(raw or 0) for job_id, raw in zip(ids, pipe.execute(), strict=True)}


def ended_at(connection: Redis, job_id: str) -> float | None:
    raw = connection.hget(Job.key_for(job_id), "ended_at")
    if not raw:
        return None
    return datetime.fromisoformat(raw.decode().replace("Z", "+00:00")).timestamp()


def run(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="chaos-"))
    write_diffusion_model(scratch / "zoo", MODEL)
    stack = Stack(scratch, args)
    figures: dict[str, Any] = {"settings": vars(args).copy()}
    try:
        stack.redis.start()
        connection = Redis.from_url(stack.redis.url, socket_timeout=2, socket_connect_timeout=2)
        stack.start_gateway()
        stack.start_worker("w1")
        stack.start_worker("w2")
        stack.wait_workers_ready()
        load = Load(stack.url, args.jobs, args.rate, args.steps)
        loader = threading.Thread(target=load.run, daemon=True)
        loader.start()
        t0 = time.time()
        print(f"load: {args.jobs} jobs at {args.rate}/s; scratch {scratch}", flush=True)

        # 1. SIGKILL a worker in the middle of its batch; start a replacement a little later.
        time.sleep(max(0.0, t0 + args.kill_at - time.time()))
        dead = stack.worker_name("w1")
        accepted_now = [s.job_id for s in load.submissions if s.job_id]
        held = [
            job_id
            for job_id, (status, worker) in job_states(connection, accepted_now).items()
            if status == "started" and worker == dead
        ]
        stack.workers["w1"].send_signal(signal.SIGKILL)
        stack.workers["w1"].wait(10)
        print(f"t={time.time() - t0:.1f}s SIGKILL {dead}, holding {len(held)} jobs", flush=True)
        restarter = threading.Timer(args.restart_after, stack.start_worker, args=("w1b",))
        restarter.start()
        worker_recovery = wait_dead_workers_jobs_recovered(
            connection, held, dead, timeout_s=args.abandoned_after * 4 + 60
        )
        print(f"  the dead worker's jobs retried/failed after {worker_recovery} s", flush=True)

        # 2. Restart Redis under load.
        time.sleep(max(0.0, t0 + args.redis_at - time.time()))
        accepted_now = [s.job_id for s in load.submissions if s.job_id]
        running_at_outage = [
            job_id
            for job_id, (status, _) in job_states(connection, accepted_now).items()
            if status == "started"
        ]
        attempts_before = attempts_of(connection, running_at_outage)
        redis_stop = time.time()
        stack.redis.kill(signal.SIGKILL if args.redis_crash else signal.SIGTERM)
        print(
            f"t={redis_stop - t0:.1f}s Redis {'killed' if args.redis_crash else 'stopped'}",
            flush=True,
        )
        time.sleep(args.redis_down)
        stack.redis.start()
        redis_up = time.time()
        sweeper_sweeps: list[int] = []
        sweeper_stop = threading.Event()
        if args.sweep_on_return:
            heartbeat_s = max(0.5, args.abandoned_after / 5)  # as `Stack.env`
            grace_s = args.recovery_grace if args.recovery_grace is not None else 3 * heartbeat_s
            sweeper = threading.Thread(
                target=lambda: sweeper_sweeps.append(
                    sweep_from_return(
                        stack.redis.url,
                        stack.prefix,
                        grace_s,
                        redis_up + 2 * args.abandoned_after + grace_s,
                        sweeper_stop,
                    )
                ),
                daemon=True,
            )
            sweeper.start()
        print(f"t={redis_up - t0:.1f}s Redis back ({redis_up - redis_stop:.1f} s down)", flush=True)

        loader.join()
        if args.sweep_on_return:
            sweeper.join()
        print(f"t={time.time() - t0:.1f}s load submitted; draining", flush=True)
        accepted = [s for s in load.submissions if s.job_id]
        ids = [s.job_id for s in accepted if s.job_id]
        deadline = time.time() + args.drain
        states: dict[str, tuple[str | None, str | None]] = {}
        while time.time() < deadline:
            try:
                states = job_states(connection, ids)
                if all(status in TERMINAL for status, _ in states.values()):
                    break
            except RedisError:
                pass
            time.sleep(0.5)
        drained_at = time.time()

        counts = {"succeeded": 0, "failed": 0, "canceled": 0, "lost": 0}
        lost_ids = []
        for job_id in ids:
            status = states.get(job_id, (None, None))[0]
            if status == "finished":
                counts["succeeded"] += 1
            elif status == "failed":
                counts["failed"] += 1
            elif status in ("canceled", "stopped"):
                counts["canceled"] += 1
            else:
                counts["lost"] += 1
                lost_ids.append((job_id, status))
        finished_twice = 0
        for job_id in ids:
            results = Job.fetch(job_id, connection=connection).results()
            if sum(r.type == Result.Type.SUCCESSFUL for r in results) > 1:
                finished_twice += 1
        known = {
            parts[2]
            for raw in connection.scan_iter("rq:job:*")
            if len(parts := raw.decode().split(":")) == 3
        }
        unanswered = len(known - set(ids))
        attempts_after = attempts_of(connection, running_at_outage)
        run_again = [j for j in running_at_outage if attempts_after[j] > attempts_before[j]]
        failed_after = [j for j in running_at_outage if states.get(j, (None,))[0] == "failed"]
        never_accepted = len(load.submissions) - len(accepted)

        # Recovery after Redis: first acceptance and first completion after it came back.
        accept_times = sorted(
            t for s in load.submissions for t, a in s.attempts if a in {"200", "202"}
        )
        first_accept = next((t for t in accept_times if t >= redis_up), None)
        completions = sorted(t for job_id in ids if (t := ended_at(connection, job_id)) is not None)
        first_done = next((t for t in completions if t >= redis_up), None)
        errors = sorted(
            t
            for s in load.submissions
            for t, a in s.attempts
            if a not in {"200", "202"} and t >= redis_stop - 1
        )
        figures.update(
            {
                "submitted": len(load.submissions),
                "accepted": len(ids),
                "never_accepted": never_accepted,
                **counts,
                "lost_ids": lost_ids[:20],
                "finished_twice": finished_twice,
                "jobs_no_client_was_answered_with": unanswered,
                "duplicate_answers": sum(len(s.other_ids) for s in load.submissions),
                "attempts": sum(len(s.attempts) for s in load.submissions),
                "outage_running_jobs": {
                    "sweeps_from_return": sweeper_sweeps[0] if sweeper_sweeps else None,
                    "running": len(running_at_outage),
                    "handed_out_again": len(run_again),
                    "failed": len(failed_after),
                },
                "worker_kill": {
                    "held_jobs": len(held),
                    "recovered_s": worker_recovery,
                },
                "redis_restart": {
                    "down_s": redis_up - redis_stop,
                    "gateway_accepts_again_s": None
                    if first_accept is None
                    else first_accept - redis_up,
                    "worker_completes_again_s": None
                    if first_done is None
                    else first_done - redis_up,
                    "client_error_window_s": (errors[-1] - errors[0]) if errors else 0.0,
                    "client_errors": len(errors),
                },
                "drain_s": drained_at - t0,
            }
        )
        return figures
    finally:
        stack.stop()


def report(figures: dict[str, Any]) -> str:
    kill, restart = figures["worker_kill"], figures["redis_restart"]

    def secs(value: float | None) -> str:
        return "not within the run" if value is None else f"{value:.1f} s"

    return "\n".join(
        [
            f"submitted {figures['submitted']}  accepted {figures['accepted']}  "
            f"succeeded {figures['succeeded']}  failed {figures['failed']}  "
            f"canceled {figures['canceled']}  lost {figures['lost']}",
            f"finished twice {figures['finished_twice']}  jobs no client got "
            f"{figures['jobs_no_client_was_answered_with']}  never accepted "
            f"{figures['never_accepted']}  ({figures['attempts']} submit attempts)",
            f"worker SIGKILL holding {kill['held_jobs']} jobs: all retried/failed after "
            f"{secs(kill['recovered_s'])} (abandoned_after_s = "
            f"{figures['settings']['abandoned_after']:g})",
            f"Redis restart ({restart['down_s']:.1f} s down): gateway accepts again "
            f"{secs(restart['gateway_accepts_again_s'])} after Redis is back, a worker completes "
            f"a job again {secs(restart['worker_completes_again_s'])} after; clients saw "
            f"{restart['client_errors']} error answers over {restart['client_error_window_s']:.1f} s",
            f"of the {figures['outage_running_jobs']['running']} jobs running when Redis went "
            f"down: {figures['outage_running_jobs']['handed_out_again']} handed out again (run "
            f"twice), {figures['outage_running_jobs']['failed']} failed",
            f"all accepted jobs ended {figures['drain_s']:.1f} s after the load began",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--rate", type=float, default=10.0, help="submissions per second")
    parser.add_argument("--steps", type=int, default=100, help="DDPM steps per job")
    parser.add_argument("--kill-at", type=float, default=8.0)
    parser.add_argument("--restart-after", type=float, default=3.0)
    parser.add_argument("--abandoned-after", type=float, default=5.0)
    parser.add_argument("--redis-at", type=float, default=25.0)
    parser.add_argument("--redis-down", type=float, default=3.0)
    parser.add_argument("--redis-crash", action="store_true", help="SIGKILL instead of SIGTERM")
    parser.add_argument(
        "--long-outage",
        action="store_true",
        help="Redis down 2 x --abandoned-after (overrides --redis-down)",
    )
    parser.add_argument(
        "--sweep-on-return",
        action="store_true",
        help="sweep from the moment Redis is back (under the recovery grace), as a janitor would",
    )
    parser.add_argument(
        "--recovery-grace",
        type=float,
        default=None,
        help="DDSERVE_RECOVERY_GRACE_S of the stack (unset: the default, 3 heartbeats)",
    )
    parser.add_argument("--drain", type=float, default=180.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.long_outage:
        args.redis_down = 2 * args.abandoned_after
    figures = run(args)
    print(report(figures))
    if args.json is not None:
        figures["settings"] = {k: str(v) for k, v in figures["settings"].items()}
        args.json.write_text(json.dumps(figures, indent=2))
    outage = figures["outage_running_jobs"]
    clean = outage["handed_out_again"] == 0 and outage["failed"] == 0
    return 0 if figures["lost"] == 0 and figures["finished_twice"] == 0 and clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
