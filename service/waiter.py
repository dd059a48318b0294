"""Waiting for jobs to finish (`Prefer: wait=N`, cancel): one shared waiter per gateway process,
woken by job-finished notifications, with a slow safety poll.

Every held request registers a future for its job id and awaits it (with its timeout); nothing runs
per request while it is held. The waiter's two tasks, started in the app's lifespan, wake them:

- **the subscription** (`_listen`): one redis asyncio pub/sub connection per process, subscribed to
  `ddserve.notifications.channel(prefix, FINISHED)`, on which every path that ends a job publishes
  its id in the same pipeline as the terminal write (a worker's success, failure or stop, the
  gateway's cancel of a queued job, the recovery sweeps). A message resolves that job's futures at
  once: 3,000 held requests cost nothing until their jobs end, then one dict lookup each.
- **the reader** (`_read`): a woken job's snapshot — what its held requests answer with — is read
  together with those of every other job woken meanwhile (and a wait that timed out reads its job
  the same way, with the others timing out in the same instant): one thread hop and two Redis round trips
  (`JobStore.snapshots`) per burst of up to `READ_CHUNK` jobs, instead of one hop and two round
  trips per request. When 3,000 jobs finish within a second or two, the per-request hops were what
  kept answers seconds late (p99 3-6 s after the finish on this 2-core machine).
- **the safety poll** (`_poll`): pub/sub is at-most-once — a message published while the
  subscription is down (a Redis restart, a dropped connection, `CLIENT KILL`) is lost — so the
  status of every held job is read in one pipeline every `wait_poll_s` (2 s), and right after each
  (re)subscription. Newly registered ids are also read once, batched, just after they register: a
  job that ended between its submission and its registration sent its message before anyone
  listened.

On a Redis error the subscription reconnects with backoff (0.1 s doubling to 5 s) while the poll
carries on; held requests then wake at the next poll that Redis answers, or time out. Why pub/sub
rather than a stream is argued in `ddserve.notifications`.

The old waiter read every held id every 10 ms: 3,000 held waits kept the event loop and a thread
busy (56 CPU-seconds a minute, `/healthz` stalled 8.6 s, waits answered 60-70 s late).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any

import redis
import redis.asyncio
from anyio import to_thread
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ddserve.jobs import TERMINAL
from ddserve.notifications import JobEvent, channel, decode_message
from service.jobstore import JobSnapshot, JobStore

log = logging.getLogger("ddserve.waiter")

RECONNECT_MIN_S = 0.1  # first backoff after the subscription failed; doubles up to the max
RECONNECT_MAX_S = 5.0
STOP_TIMEOUT_S = 2.0  # the longest the app's shutdown waits for the waiter's tasks
LISTEN_TIMEOUT_S = 5.0  # a quiet subscription wakes this often (its health-check PING)
HEALTH_CHECK_S = 30.0  # redis-py pings a subscription idle this long, to find a dead connection
# Snapshots read per thread hop: big enough that a burst costs few hops, small enough that the
# first answers of a 3,000-job burst leave while the rest are read (~20 ms of work per chunk here).
READ_CHUNK = 256
LATE_READ_S = 5.0  # the longest a timed-out wait waits for the reader before reading on its own

# Connection settings copied from the gateway's synchronous client to its pub/sub client.
_COPIED = (
    "host",
    "port",
    "path",
    "db",
    "username",
    "password",
    "credential_provider",
    "socket_connect_timeout",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_data",
    "ssl_ca_path",
    "ssl_check_hostname",
    "ssl_password",
    "ssl_min_version",
    "ssl_ciphers",
)


def async_client(connection: redis.Redis, client_name: str) -> redis.asyncio.Redis:
    """An asyncio client to the same Redis as the gateway's synchronous `connection` (a real server,
    by TCP, TLS or Unix socket, or the in-process fakeredis server of the embedded mode), named
    `client_name` (in CLIENT LIST). redis-py's own retries are off: a dropped subscription must
    reach `_listen`, which resubscribes and then re-reads every held job."""
    pool = connection.connection_pool
    kwargs = pool.connection_kwargs
    options: dict[str, Any] = {"client_name": client_name, "retry": Retry(NoBackoff(), 0)}
    server = kwargs.get("server")
    if server is not None:  # fakeredis (embedded mode, tests): in process, no connection to check
        import fakeredis

        return fakeredis.FakeAsyncRedis(server=server, **options)
    options["health_check_interval"] = HEALTH_CHECK_S
    classes: dict[type, type] = {
        redis.UnixDomainSocketConnection: redis.asyncio.UnixDomainSocketConnection,
        redis.SSLConnection: redis.asyncio.SSLConnection,
    }
    connection_class = classes.get(pool.connection_class, redis.asyncio.Connection)
    copied = {k: v for k, v in kwargs.items() if k in _COPIED}
    if connection_class is redis.asyncio.UnixDomainSocketConnection:
        copied.pop("host", None)
        copied.pop("port", None)
    return redis.asyncio.Redis(
        connection_pool=redis.asyncio.ConnectionPool(
            connection_class=connection_class, **copied, **options
        )
    )


class JobWaiter:
    """See the module docstring. One per app (`AppState.waiter`); `start()` (the lifespan) binds it
    to the running event loop, `stop()` ends its tasks."""

    def __init__(self, store: JobStore, connection: redis.Redis, poll_s: float = 2.0) -> None:
        self.store = store
        self.connection = connection
        self.channel = channel(store.prefix, JobEvent.FINISHED)
        self.client_name = f"{store.prefix}:waiter"
        self.poll_s = poll_s
        # Futures resolve with the job's snapshot once it is terminal (None: no snapshot read —
        # the waiter stopped, or the read failed — the caller reads the job itself).
        self._waiters: dict[str, list[asyncio.Future[JobSnapshot | None]]] = {}
        self._fresh: set[str] = set()  # registered since the last poll: read once, soon
        self._check: asyncio.Event | None = None  # set: the poll has fresh ids to read
        self._woken: dict[str, None] = {}  # ended jobs whose snapshots are to read (ordered set)
        self._late: dict[str, list[asyncio.Future[JobSnapshot | None]]] = {}  # timed-out waits
        self._wake: asyncio.Event | None = None  # set: the reader has woken jobs to read
        self._subscribed = False
        self._client: redis.asyncio.Redis | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def subscribed(self) -> bool:
        """Whether the subscription is live (Redis confirmed it and it has not failed since)."""
        return self._subscribed

    @property
    def held(self) -> int:
        """How many job ids have requests waiting on them."""
        return len(self._waiters)

    def start(self) -> None:
        """Start the subscription and the poll on the running event loop (the app's lifespan calls
        it; a wait outside a lifespan starts them too). Idempotent."""
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._tasks and not any(t.done() for t in self._tasks):
            return
        self._loop = loop
        self._check = asyncio.Event()
        self._wake = asyncio.Event()
        self._client = async_client(self.connection, self.client_name)
        self._tasks = [
            loop.create_task(self._listen(), name="ddserve-waiter-subscription"),
            loop.create_task(self._poll(), name="ddserve-waiter-poll"),
            loop.create_task(self._read(), name="ddserve-waiter-reader"),
        ]

    async def stop(self) -> None:
        """End the tasks and close the subscription; requests still held wake (and answer with
        their job as it is)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a subscription whose close never completes (seen with fakeredis's asyncio
            # pub/sub under load) must not hold the app's shutdown for ever.
            _, stuck = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT_S)
            if stuck:
                log.warning("waiter: %d task(s) did not stop in time; left behind", len(stuck))
        self._tasks = []
        if self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.aclose(), STOP_TIMEOUT_S)
            self._client = None
        self._subscribed = False
        self._woken.clear()
        for job_id in [*self._waiters, *self._late]:
            self._resolve(job_id, None)

    async def wait(self, job_id: str, timeout_s: float) -> bool:
        """True once the job is terminal (or gone), False after timeout_s."""
        woken, _ = await self.wait_snapshot(job_id, timeout_s, late_read=False)
        return woken

    async def wait_snapshot(
        self, job_id: str, timeout_s: float, *, late_read: bool = True
    ) -> tuple[bool, JobSnapshot | None]:
        """(True, its snapshot) once the job is terminal — read with the rest of its burst; the
        snapshot is None when the job vanished or could not be read — and after timeout_s
        (False, the job as it is then), also read with the other waits that timed out meanwhile
        (`late_read`; None without it, or when that read failed)."""
        self.start()
        future: asyncio.Future[JobSnapshot | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(future)
        self._fresh.add(job_id)
        assert self._check is not None
        self._check.set()
        try:
            return True, await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            pass
        finally:
            futures = self._waiters.get(job_id)
            if futures is not None:
                if future in futures:
                    futures.remove(future)
                if not futures:
                    del self._waiters[job_id]
        return False, (await self._read_late(job_id) if late_read else None)

    async def _read_late(self, job_id: str) -> JobSnapshot | None:
        """The job of a wait that timed out, read by the reader with the others of its second:
        requests held with the same wait time out together (3,000 sent in a burst time out in a
        burst), and a thread hop each was what stalled the event loop then. Bounded by
        `LATE_READ_S` (a reader stuck on a dead Redis): None, and the caller reads it itself."""
        future: asyncio.Future[JobSnapshot | None] = asyncio.get_running_loop().create_future()
        self._late.setdefault(job_id, []).append(future)
        self._woken[job_id] = None
        assert self._wake is not None
        self._wake.set()
        try:
            return await asyncio.wait_for(future, LATE_READ_S)
        except TimeoutError:
            return None
        finally:
            futures = self._late.get(job_id)
            if futures is not None:
                if future in futures:
                    futures.remove(future)
                if not futures:
                    del self._late[job_id]

    def _finished(self, job_id: str) -> None:
        """The job ended: have the reader read its snapshot (with the rest of its burst)."""
        if job_id in self._waiters and self._wake is not None:
            self._woken[job_id] = None
            self._wake.set()

    def _resolve(self, job_id: str, snapshot: JobSnapshot | None) -> None:
        for future in (*self._waiters.pop(job_id, ()), *self._late.pop(job_id, ())):
            if not future.done():
                future.set_result(snapshot)

    async def _read(self) -> None:
        """Read the snapshots of woken jobs, `READ_CHUNK` per thread hop, and answer their waits."""
        wake = self._wake
        assert wake is not None
        while True:
            await wake.wait()
            wake.clear()
            while self._woken:
                ids = [job_id for job_id in itertools.islice(self._woken, READ_CHUNK)]
                for job_id in ids:
                    del self._woken[job_id]
                ids = [job_id for job_id in ids if job_id in self._waiters or job_id in self._late]
                if not ids:
                    continue
                try:
                    snapshots = await to_thread.run_sync(self.store.snapshots, ids)
                except Exception as exc:  # each request then reads its own job (or times out)
                    log.warning("reading %d finished jobs failed: %s", len(ids), type(exc).__name__)
                    snapshots = [None] * len(ids)
                for job_id, snapshot in zip(ids, snapshots, strict=True):
                    self._resolve(job_id, snapshot)

    def recheck(self) -> None:
        """Have the poll read every held job now, in one pipeline (after a (re)subscription)."""
        self._fresh.update(self._waiters)
        if self._check is not None:
            self._check.set()

    async def _listen(self) -> None:
        backoff = RECONNECT_MIN_S
        while True:
            assert self._client is not None
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    message = await pubsub.get_message(timeout=LISTEN_TIMEOUT_S)
                    if message is None:
                        continue
                    kind = message["type"]
                    if kind == "message":
                        self._finished(decode_message(message["data"]).job_id)
                    elif kind == "subscribe":  # live from now on; what came before, the poll reads
                        self._subscribed = True
                        backoff = RECONNECT_MIN_S
                        self.recheck()
                        log.info("waiter subscribed to %s", self.channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or the connection dropped: resubscribe
                log.warning(
                    "waiter subscription to %s lost (%s: %s); resubscribing in %.1f s",
                    self.channel,
                    type(exc).__name__,
                    exc,
                    backoff,
                )
            finally:
                self._subscribed = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_S)

    async def _poll(self) -> None:
        """Every `poll_s`, read the status of every held job; between, read the fresh ones."""
        loop = asyncio.get_running_loop()
        check = self._check
        assert check is not None
        next_full = loop.time() + self.poll_s
        while True:
            delay = next_full - loop.time()
            if delay > 0 and not check.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(check.wait(), delay)
            check.clear()
            if loop.time() >= next_full:
                ids = list(self._waiters)
                next_full = loop.time() + self.poll_s
            else:
                ids = [job_id for job_id in self._fresh if job_id in self._waiters]
            self._fresh.clear()
            if not ids:
                continue
            try:
                statuses = await to_thread.run_sync(self.store.statuses, ids)
            except Exception as exc:  # Redis down: held requests time out, then get a 503
                log.warning("job status poll failed: %s", type(exc).__name__)
                continue
            for job_id, status in zip(ids, statuses, strict=True):
                if status is None or status in TERMINAL:
                    self._finished(job_id)
