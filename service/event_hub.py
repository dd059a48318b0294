"""The gateway's one reader of job event streams, shared by every open `GET /jobs/{id}/events`.

An open SSE stream is a `Listener`: a job id, the id of the last stream entry it was given, and an
asyncio queue. Nothing runs per listener while its job is quiet; one `EventHub` per gateway process
does the Redis work for all of them:

- **the subscription** (`_listen`): one pub/sub connection subscribed to the job-updated channel
  (a worker appended to a job's stream, `ddserve.job_events`) and the job-finished channel (every
  path that ends a job, `ddserve.notifications`). A message for a job with listeners marks it
  dirty; any other job costs one dict lookup. It is held only while some stream is open (and
  `UNSUBSCRIBE_AFTER_S` after the last one closes): a gateway whose clients do not follow their
  jobs receives none of these messages, so job events nobody reads cost the gateway nothing
  (measured at c = 64: +5.3 % gateway CPU per job while always subscribed, one message per worker
  round and one per finished job). A (re)subscription marks every listened job dirty, so nothing
  published while unsubscribed is missed (the streams keep the entries).
- **the reader** (`_read`): takes the dirty jobs together and, in one pipeline on one connection,
  reads the new entries of all their streams (one non-blocking XREAD over every stream, each from
  the oldest cursor of its listeners) and their statuses; it hands each listener the entries past
  its own cursor, and, when the job has ended, a `FINISHED` marker after them (the worker's last
  entries go in the same transaction as its terminal write, so none is behind the marker).
- **the safety pass**: pub/sub is at-most-once, so every `safety_s` (and after each
  (re)subscription) every listened job is marked dirty; a lost hint delays an event until then,
  never loses it (the stream keeps it).
- **the position pass** (`_positions`): every `position_s`, the jobs followed while still queued
  have their status and queue read together — two pipelined round trips for all of them — and
  each listener whose job moved up its queue gets a `QueuePosition`. Queues move without any
  event of the job itself (others' jobs are taken), so this is polled, not hinted; it stops for
  a listener at its job's first stream entry (`started`).

Why not one blocking XREAD per open stream: 1,000 streams would hold 1,000 Redis connections (or
threads); why not a blocking XREAD over all of them: the set of streams changes at every connect,
and a blocking call cannot take a new stream without being interrupted. The hints are free for the
workers (queued on their round's pipeline) and for Redis (one PUBLISH per job and round).
A new listener is marked dirty at once, so its backlog (a resume from `Last-Event-ID`, or the whole
stream for a first connect) comes through the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio
from rq.job import Job
from rq.queue import Queue

from ddserve.job_events import StreamEvent, decode_entry, stream_key, updated_ids
from ddserve.jobs import TERMINAL, JobStatus, public_status
from ddserve.notifications import JobEvent, channel, decode_message
from service.waiter import (
    LISTEN_TIMEOUT_S,
    RECONNECT_MAX_S,
    RECONNECT_MIN_S,
    STOP_TIMEOUT_S,
    async_client,
)

log = logging.getLogger("ddserve.events")

# Streams per XREAD. Each chunk's entries wake its streams' senders, which run while the next
# chunk is read: small chunks keep any one stretch of the event loop short (1,000 streams woken
# at once, in chunks of 200, held /healthz up to ~0.3 s on a 2-vCPU VM; in chunks of 50, see
# benchmarks/bench_sse.py).
READ_CHUNK = 50
YIELD_EVERY = 50  # pub/sub messages handled before letting other tasks run (a burst is buffered)
FINISHED = object()  # put on a listener's queue after its job's last entries: the job ended
POSITION_CHUNK = 500  # queued jobs per position pipeline
UNSUBSCRIBE_AFTER_S = 10.0  # the subscription outlives the last open stream this long


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class QueuePosition:
    """Put on a listener's queue: its job, still queued, is now `position` jobs from the head."""

    position: int


@dataclass(eq=False)
class Listener:
    """One open event stream: its job, the last entry id it was given, and what waits for it
    (lists of `StreamEvent`, then `FINISHED`)."""

    job_id: str
    cursor: str = "0-0"
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    # The queue position last given to it; None: its job is not (or no longer) followed in its
    # queue (it was not queued at connect, or its first stream entry came).
    position: int | None = None
    finished: bool = False


class EventHub:
    """See the module docstring. One per app (`AppState.events`); `start()` binds it to the
    running loop (the lifespan, or the first listener), `stop()` ends its tasks."""

    def __init__(
        self,
        connection: redis.Redis,
        prefix: str,
        safety_s: float = 15.0,
        position_s: float = 2.0,
    ) -> None:
        """`position_s`: how often queued jobs' positions are read (0: never, after connect)."""
        self.connection = connection
        self.prefix = prefix
        self.safety_s = safety_s
        self.position_s = position_s
        self._queued: set[str] = set()  # jobs with a listener following its queue position
        self.channels = [channel(prefix, JobEvent.UPDATED), channel(prefix, JobEvent.FINISHED)]
        self._listeners: dict[str, set[Listener]] = {}
        self._dirty: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._wanted: asyncio.Event | None = None  # set: some stream is open (subscribe)
        self._client: redis.asyncio.Redis | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.subscribed = False
        self.reads = 0  # XREAD passes made (tests, benchmarks)

    @property
    def listening(self) -> int:
        """Open listeners."""
        return sum(len(group) for group in self._listeners.values())

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._tasks and not any(t.done() for t in self._tasks):
            return
        self._loop = loop
        self._wake = asyncio.Event()
        self._wanted = asyncio.Event()
        if self._listeners:
            self._wanted.set()
        self._client = async_client(self.connection, f"{self.prefix}:events")
        self._tasks = [
            loop.create_task(self._listen(), name="ddserve-events-subscription"),
            loop.create_task(self._read(), name="ddserve-events-reader"),
        ]
        if self.position_s > 0:
            self._tasks.append(loop.create_task(self._positions(), name="ddserve-events-queue"))

    async def stop(self) -> None:
        """End the tasks; open listeners get FINISHED (their streams end with the job as it is)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT_S)
        self._tasks = []
        if self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.aclose(), STOP_TIMEOUT_S)
            self._client = None
        self.subscribed = False
        for group in self._listeners.values():
            for listener in group:
                self._finish(listener)

    # --- listeners ------------------------------------------------------------------------------
    def listen(self, job_id: str, cursor: str = "0-0", position: int | None = None) -> Listener:
        """A listener for the job's entries after `cursor` (its backlog comes first); with the
        `position` of a queued job (already sent to the client), also its later positions."""
        self.start()
        listener = Listener(job_id, cursor, position=position)
        self._listeners.setdefault(job_id, set()).add(listener)
        if position is not None:
            self._queued.add(job_id)
        self._mark(job_id)
        assert self._wanted is not None
        self._wanted.set()
        return listener

    def close(self, listener: Listener) -> None:
        group = self._listeners.get(listener.job_id)
        if group is not None:
            group.discard(listener)
            if not group:
                del self._listeners[listener.job_id]
                self._queued.discard(listener.job_id)
        if not self._listeners and self._wanted is not None:
            self._wanted.clear()  # the subscription ends UNSUBSCRIBE_AFTER_S from now

    def _mark(self, job_id: str) -> None:
        if job_id in self._listeners:
            self._dirty.add(job_id)
            if self._wake is not None:
                self._wake.set()

    def _mark_all(self) -> None:
        for job_id in self._listeners:
            self._mark(job_id)

    @staticmethod
    def _finish(listener: Listener) -> None:
        if not listener.finished:
            listener.finished = True
            listener.queue.put_nowait(FINISHED)

    # --- the subscription -----------------------------------------------------------------------
    async def _listen(self) -> None:
        backoff = RECONNECT_MIN_S
        loop = asyncio.get_running_loop()
        while True:
            assert self._client is not None and self._wanted is not None
            await self._wanted.wait()  # nobody listening: no subscription, no messages
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(*self.channels)
                handled = 0
                idle_since: float | None = None
                while True:
                    if self._listeners:
                        idle_since = None
                    elif idle_since is None:
                        idle_since = loop.time()
                    elif loop.time() - idle_since >= UNSUBSCRIBE_AFTER_S:
                        break  # the last stream closed a while ago: unsubscribe
                    wait_s = LISTEN_TIMEOUT_S if idle_since is None else UNSUBSCRIBE_AFTER_S / 4
                    message = await pubsub.get_message(timeout=wait_s)
                    if message is None:
                        continue
                    handled += 1
                    if handled % YIELD_EVERY == 0:  # buffered messages never suspend the loop
                        await asyncio.sleep(0)
                    if message["type"] == "message":
                        if _text(message["channel"]) == self.channels[0]:  # updated: many ids
                            for job_id in updated_ids(message["data"]):
                                self._mark(job_id)
                        else:
                            self._mark(decode_message(message["data"]).job_id)
                    elif message["type"] == "subscribe":
                        self.subscribed = True
                        backoff = RECONNECT_MIN_S
                        self._mark_all()  # what was appended while unsubscribed
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event subscription lost (%s); resubscribing", type(exc).__name__)
            finally:
                self.subscribed = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_S)

    # --- the reader -----------------------------------------------------------------------------
    async def _read(self) -> None:
        wake = self._wake
        assert wake is not None
        loop = asyncio.get_running_loop()
        next_safety = loop.time() + self.safety_s
        while True:
            delay = next_safety - loop.time()
            if delay > 0 and not wake.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), delay)
            wake.clear()
            if loop.time() >= next_safety:
                next_safety = loop.time() + self.safety_s
                self._mark_all()
            dirty, self._dirty = list(self._dirty), set()
            for start in range(0, len(dirty), READ_CHUNK):
                chunk = dirty[start : start + READ_CHUNK]
                try:
                    await self._read_jobs(chunk)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis down: read them again at the next pass
                    log.warning("event read failed (%s)", type(exc).__name__)
                    self._dirty.update(chunk)
                    await asyncio.sleep(RECONNECT_MIN_S)

    async def _read_jobs(self, job_ids: list[str]) -> None:
        """One pipeline: the new entries of every stream, then every status; fan out."""
        cursors: dict[str, str] = {}
        for job_id in job_ids:
            group = self._listeners.get(job_id)
            if group:
                cursors[job_id] = min((li.cursor for li in group), key=_entry_key)
        if not cursors:
            return
        assert self._client is not None
        ids = list(cursors)
        # MULTI/EXEC: the entries and the statuses of one moment (a job that ends between the
        # two reads would otherwise get its marker before its last entries)
        pipe = self._client.pipeline(transaction=True)
        pipe.xread({stream_key(self.prefix, job_id): cursors[job_id] for job_id in ids})
        for job_id in ids:
            pipe.hget(Job.key_for(job_id), "status")
        replies = await pipe.execute()
        self.reads += 1
        entries: dict[str, list[StreamEvent]] = {}
        for key, rows in _stream_rows(replies[0]):
            job_id = key.rpartition(":")[2]
            entries[job_id] = [decode_entry(entry_id, fields) for entry_id, fields in rows]
        for job_id, raw in zip(ids, replies[1:], strict=True):
            ended = raw is None or public_status(_text(raw)) in TERMINAL
            events = entries.get(job_id, [])
            for listener in list(self._listeners.get(job_id, ())):
                mine = [e for e in events if _entry_key(e.entry_id) > _entry_key(listener.cursor)]
                if mine:
                    listener.cursor = mine[-1].entry_id
                    listener.position = None  # it started: no position after its first entry
                    listener.queue.put_nowait(mine)
                if ended:
                    self._finish(listener)

    # --- the position pass ----------------------------------------------------------------------
    async def _positions(self) -> None:
        while True:
            await asyncio.sleep(self.position_s)
            queued = list(self._queued)
            for start in range(0, len(queued), POSITION_CHUNK):
                try:
                    await self._read_positions(queued[start : start + POSITION_CHUNK])
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis down: the next pass reads them again
                    log.warning("queue position read failed (%s)", type(exc).__name__)
                    break

    async def _read_positions(self, job_ids: list[str]) -> None:
        """Two round trips: every job's status and queue, then the position of those queued;
        a job no longer queued (or no longer followed) leaves the set."""
        assert self._client is not None
        pipe = self._client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(Job.key_for(job_id), "status", "origin")
        rows = await pipe.execute()
        asked: list[str] = []
        pipe = self._client.pipeline(transaction=False)
        for job_id, (status, origin) in zip(job_ids, rows, strict=True):
            followed = any(li.position is not None for li in self._listeners.get(job_id, ()))
            if not followed or status is None or origin is None:
                self._queued.discard(job_id)
            elif public_status(_text(status)) != JobStatus.QUEUED:
                self._queued.discard(job_id)  # started or ended: its stream says the rest
            else:
                asked.append(job_id)
                pipe.lpos(Queue.redis_queue_namespace_prefix + _text(origin), job_id)
        if not asked:
            return
        for job_id, position in zip(asked, await pipe.execute(), strict=True):
            if position is None:
                continue  # being taken by a worker this moment (or scheduled for a retry)
            for listener in self._listeners.get(job_id, ()):
                if listener.position is not None and listener.position != position:
                    listener.position = position
                    listener.queue.put_nowait(QueuePosition(position))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _stream_rows(reply: Any) -> list[tuple[str, list[Any]]]:
    """XREAD's reply as (stream key, entries): RESP2 gives a list of pairs, RESP3 a dict."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    return [(_text(key), rows) for key, rows in pairs]
