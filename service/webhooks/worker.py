"""The webhook worker: the event dispatcher and the delivery loop, apart from the gateway's request
path and from the GPU workers' loop.

`WebhookService` runs two threads on one Redis connection pool:
- the dispatcher (`dispatch.EventDispatcher.run`): watched jobs' state changes → delivery jobs;
- the delivery loop: an RQ `SimpleWorker` on the webhook queue, registered and heart-beating like
  any RQ worker (`rq info` lists it), driven by this loop rather than by `Worker.work()`, which
  would install signal handlers (main thread only) and fork RQ's scheduler (a process that cannot
  share the embedded mode's in-process fakeredis). The loop moves due retries itself
  (`move_due_retries`: RQ's `Retry` puts a failed delivery in the queue's scheduled registry
  with its backoff), then takes the next delivery (a blocking dequeue of at most `POLL_S`) and runs
  it with RQ's own execution path (registries, result, retry), under a timer death penalty.

Deliveries of one worker run one at a time, each bounded by `webhook_timeout_s`; more throughput
is more webhook workers (replicas), which share the queue and never send an event twice at once
(RQ hands each delivery job to one worker; the dispatcher queues each (job, event) once).

It runs as `ddserve webhook-worker` (`service.webhooks.cli`; a service in docker-compose and in
deploy/k8s) and inside `ddserve serve`'s embedded mode (a thread pair of the same process).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import redis
from redis.exceptions import RedisError
from rq.job import Job
from rq.queue import Queue
from rq.registry import ScheduledJobRegistry
from rq.timeouts import TimerDeathPenalty
from rq.worker import SimpleWorker

from ddserve.settings import Settings
from ddserve.storage import Storage, create_storage
from service.webhooks.delivery import Sender, current_sender
from service.webhooks.dispatch import EventDispatcher
from service.webhooks.keys import delivery_queue

log = logging.getLogger(__name__)
POLL_S = 1  # longest blocking dequeue: due retries are moved at least this often


class WebhookService:
    """The dispatcher and the delivery loop of one webhook worker (threads; `stop()` ends both
    after the delivery in progress)."""

    def __init__(
        self,
        settings: Settings,
        connection: redis.Redis,
        *,
        storage: Storage | None = None,
        sender: Sender | None = None,
        name: str | None = None,
        base_url: str | None = None,
    ) -> None:
        self.settings = settings
        self.connection = connection
        self.queue = Queue(delivery_queue(settings.key_prefix), connection=connection)
        self.dispatcher = EventDispatcher(
            connection,
            settings,
            storage if storage is not None else create_storage(settings),
            base_url=base_url,
        )
        self.sender = sender or Sender(settings, connection)
        self.worker = SimpleWorker([self.queue], connection=connection, name=name)
        self.worker.death_penalty_class = TimerDeathPenalty  # SIGALRM works in the main thread only
        self.worker.log_job_description = False  # the description names the job, not the body
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def move_due_retries(self) -> int:
        """Queue the deliveries whose retry time has come; the worker whose ZREM removes one
        queues it (several workers never queue it twice)."""
        registry = ScheduledJobRegistry(queue=self.queue)
        moved = 0
        for job_id in registry.get_jobs_to_schedule(int(time.time())):
            if not self.connection.zrem(registry.key, job_id):
                continue  # another worker took it
            try:
                job = Job.fetch(job_id, connection=self.connection)
            except Exception:  # expired meanwhile: nothing to send
                continue
            self.queue.enqueue_job(job)
            moved += 1
        return moved

    def deliver_once(self, timeout: int | None = POLL_S) -> bool:
        """Move due retries, then run at most one delivery (waiting up to `timeout` s for one).
        True if one ran."""
        self.move_due_retries()
        # RQ's dequeue retries its blocking pop until a job comes unless given an idle limit
        got = self.worker.dequeue_job_and_maintain_ttl(timeout, max_idle_time=timeout)
        if got is None:
            return False
        job, queue = got
        self.worker.execute_job(job, queue)
        return True

    def _deliveries(self) -> None:
        current_sender.set(self.sender)  # this thread's context only (see delivery.py)
        self.worker.register_birth()
        backoff = 0.5
        try:
            while not self._stop.is_set():
                try:
                    self.deliver_once()
                    backoff = 0.5
                except RedisError as exc:
                    log.warning("webhook deliveries: Redis error (%s); retrying", exc)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
        finally:
            with contextlib.suppress(RedisError):
                self.worker.register_death()

    def start(self) -> WebhookService:
        if not self.sender.secrets.enabled:
            log.warning("webhook worker: no DDSERVE_WEBHOOK_SECRET; the gateway refuses webhooks")
        for target, label in ((self.dispatcher.run, "dispatch"), (self._deliveries, "deliver")):
            args = (self._stop,) if label == "dispatch" else ()
            thread = threading.Thread(
                target=target, args=args, name=f"webhooks-{label}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        log.info("webhook worker %s: listening on %s", self.worker.name, self.queue.name)
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)
