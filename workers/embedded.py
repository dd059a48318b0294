"""The worker inside another process (the embedded mode of `ddserve serve`): a thread on a given
Redis connection — fakeredis's shared server in embedded mode.

In a thread the worker installs no signal handlers, uses RQ's timer death penalty and forks
nothing (RQ's scheduler would fork a process that does not share a FakeServer). `stop()` asks for
a warm shutdown: no new jobs, the held ones finish, then the thread ends.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from redis import Redis

from ddserve.settings import Settings
from ddserve.storage import Storage
from workers.model_pool import ModelPool
from workers.worker import BatchingWorker

log = logging.getLogger(__name__)


@dataclass
class WorkerHandle:
    """A worker running in a thread. `ready` is set once its models are loaded (or it failed:
    then `error` holds why)."""

    thread: threading.Thread
    ready: threading.Event = field(default_factory=threading.Event)
    worker: BatchingWorker | None = None
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Warm shutdown; waits up to `timeout` s for the thread. True if it ended."""
        self._stop.set()
        if self.worker is not None:
            self.worker.request_shutdown()
        self.thread.join(timeout)
        return not self.thread.is_alive()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()


def start_worker_thread(
    settings: Settings,
    connection: Redis,
    *,
    pool: ModelPool | None = None,
    storage: Storage | None = None,
    name: str | None = None,
) -> WorkerHandle:
    """Start a batching worker for `settings.models` (all zoo models when empty) in a daemon
    thread; models load in that thread, so this returns at once."""
    handle: WorkerHandle

    def run() -> None:
        try:
            worker = BatchingWorker(settings, connection, pool=pool, storage=storage, name=name)
        except BaseException as exc:
            handle.error = exc
            handle.ready.set()
            log.exception("embedded worker could not start")
            return
        handle.worker = worker
        if handle._stop.is_set():
            worker.request_shutdown()
        handle.ready.set()
        try:
            worker.work()
        except BaseException as exc:
            handle.error = exc
            log.exception("embedded worker stopped on an error")

    thread = threading.Thread(target=run, name="ddserve-worker", daemon=True)
    handle = WorkerHandle(thread=thread)
    thread.start()
    return handle
