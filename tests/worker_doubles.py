"""In-memory stand-ins for the engine's surroundings: a job feed (queues + cancel set), tickets that
record how each job ended, and an image store. They let engine tests drive scheduling round by round
without Redis; the worker tests run the same engine against real Redis and RQ."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ddserve.spec import parse_job_spec


@dataclass
class MemoryTicket:
    id: str
    request: dict[str, Any]  # the JSON form, as Redis carries it
    arrived_at: float = 0.0
    deadline: float = float("inf")
    progress_log: list[tuple[int, int, int]] = field(default_factory=list)
    previews_log: list[tuple[int, list[dict[str, Any]]]] = field(default_factory=list)  # step → …
    output: dict[str, Any] | None = None
    batch_rows: int | None = None
    error: BaseException | None = None
    canceled: bool = False
    ends: int = 0  # how many times the engine ended this ticket (must be exactly 1)
    attempt: int = 1  # which delivery of the job this is (a redelivery is a second ticket)

    def __post_init__(self) -> None:
        self.spec = parse_job_spec(self.request)  # as WorkerJob: parsed once, when taken

    @property
    def key(self) -> str:
        return f"{self.id}#{self.attempt}"

    def progress(
        self, step: int, total: int, batch_rows: int, previews: list[Any] | None = None
    ) -> None:
        self.progress_log.append((step, total, batch_rows))
        if previews is not None:
            self.previews_log.append((step, previews))

    def succeed(self, output: dict[str, Any], batch_rows: int) -> None:
        self.output, self.batch_rows = output, batch_rows
        self.ends += 1

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.ends += 1

    def cancel(self) -> None:
        self.canceled = True
        self.ends += 1

    @property
    def finished(self) -> bool:
        return self.ends > 0


class MemoryFeed:
    """Queues per model (FIFO) and a cancel set; `arrived_at` comes from a counter (older = smaller)."""

    def __init__(self) -> None:
        self.queues: dict[str, deque[MemoryTicket]] = {}
        self.cancel_set: set[str] = set()
        self._ids = itertools.count()
        self.taken: list[str] = []  # job ids in the order the engine took them

    def submit(self, request: dict[str, Any], **fields: Any) -> MemoryTicket:
        number = next(self._ids)
        fields.setdefault("arrived_at", float(number))
        ticket = MemoryTicket(id=f"job{number}", request=request, **fields)
        self.queues.setdefault(request["model"], deque()).append(ticket)
        return ticket

    def take(self, model: str) -> MemoryTicket | None:
        queue = self.queues.get(model)
        if not queue:
            return None
        ticket = queue.popleft()
        self.taken.append(ticket.id)
        return ticket

    def canceled(self, tickets: list[MemoryTicket]) -> set[str]:
        return {t.key for t in tickets if t.id in self.cancel_set}


class MemoryStorage:
    serves_links = True

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, str]] = {}

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.objects[key] = (data, content_type)

    def get(self, key: str) -> bytes:
        return self.objects[key][0]
