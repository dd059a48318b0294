"""Waiting for jobs to finish (`Prefer: wait=N`, cancel) without a thread or a poll per request.

Every waiting request registers a future for its job id; one loop per app checks *all* waited-for
jobs with a single pipelined HGET of their statuses every `interval_s` (10 ms) while anyone waits,
and sleeps otherwise. A finished job's waiters wake within one interval, and the cost is one Redis
round trip per interval however many requests wait — 64 held requests cost what one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from anyio import to_thread

from ddserve.jobs import TERMINAL
from service.jobstore import JobStore

log = logging.getLogger("ddserve.waiter")


class JobWaiter:
    def __init__(self, store: JobStore, interval_s: float = 0.01) -> None:
        self.store = store
        self.interval_s = interval_s
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the loop on the running event loop (the app's lifespan calls it)."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="ddserve-job-waiter")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait(self, job_id: str, timeout_s: float) -> bool:
        """True once the job is terminal (or gone), False after timeout_s."""
        self.start()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(future)
        assert self._wake is not None
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            futures = self._waiters.get(job_id, [])
            if future in futures:
                futures.remove(future)
            if not futures:
                self._waiters.pop(job_id, None)

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            if not self._waiters:
                wake.clear()
                await wake.wait()
            ids = list(self._waiters)
            try:
                statuses = await to_thread.run_sync(self.store.statuses, ids)
            except Exception as e:  # Redis down: waiters time out and get a 503 on their read
                log.warning("job status poll failed: %s", type(e).__name__)
                await asyncio.sleep(0.5)
                continue
            for job_id, status in zip(ids, statuses, strict=True):
                if status is None or status in TERMINAL:
                    for future in self._waiters.pop(job_id, []):
                        if not future.done():
                            future.set_result(None)
            await asyncio.sleep(self.interval_s)
