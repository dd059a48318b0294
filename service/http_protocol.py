"""uvicorn's httptools protocol with the two limits it lacks: a deadline for a request's headers and
a bound on their size.

uvicorn arms no timer while it reads a request's headers (its keep-alive timer runs only between
requests, and any byte received cancels it), and httptools buffers a header of any length: a
client sending one byte a second (slowloris), or one that connects and sends nothing, holds its
connection for ever, and a 20 MB header is read into memory (`h11_max_incomplete_event_size`
bounds only the h11 protocol). `GuardedHttpToolsProtocol` closes a connection whose request has not
finished its headers within `header_timeout_s` of its first byte (or of the connection, for the
first request) with `408`, and answers `431` once the headers of one request exceed
`max_header_bytes` (measured per received chunk, so the bound is that plus one read).

Past uvicorn's `limit_concurrency` (open connections or running requests of the process) its own
503 is plain text without `Retry-After`; here it is the contract's error body (`overloaded`) with
`Retry-After: 1`, which clients (ours included) honour.

`guarded_protocol(settings)` is what `service.cli` passes as uvicorn's `http=`: a `functools.partial`
of the class (picklable, for `uvicorn.run(..., workers=N)`).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from ddserve.settings import Settings
from service.errors import error_response

OVERLOADED_RETRY_AFTER_S = 1


async def overloaded(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """uvicorn's over-the-limit answer in the contract's shape, closing the connection."""
    response = error_response(
        503,
        "overloaded",
        "this gateway process has too many open connections or running requests; retry shortly",
        headers={"Retry-After": str(OVERLOADED_RETRY_AFTER_S), "Connection": "close"},
    )
    await response(scope, receive, send)  # type: ignore[arg-type]


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """One connection: uvicorn's httptools protocol plus a header deadline and a header size cap."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        header_timeout_s: float,
        max_header_bytes: int,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        self._header_timer: asyncio.TimerHandle | None = None
        # True from the end of one request's body until the next request's headers are complete:
        # the bytes received meanwhile are header bytes.
        self._awaiting_headers = True
        self._header_bytes = 0

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()  # a client that connects and sends nothing is dropped too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        counting = self._awaiting_headers
        super().data_received(data)
        if not counting or not self._awaiting_headers or self.transport.is_closing():
            return
        self._header_bytes += len(data)
        if self._header_bytes > self.max_header_bytes:
            self.logger.warning("request headers over %d bytes: 431", self.max_header_bytes)
            self._reject(431, "Request headers too large.")

    # --- httptools callbacks ---
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_headers = True
        self._header_bytes = 0
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_headers = True  # what comes next is the next request's start line

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # uvicorn picked its plain-text 503 (limit_concurrency reached): answer ours instead.
        super()._start_asgi_task(cycle, overloaded if app is service_unavailable else app)

    # --- the deadline ---
    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self.header_timeout_s, self._on_header_timeout
            )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request stalls behind one being answered: close after that answer.
            self.cycle.keep_alive = False
            return
        self.logger.info("request headers not complete within %.1f s: 408", self.header_timeout_s)
        self._reject(408, "Request headers not received in time.")

    def _reject(self, status: int, message: str) -> None:
        """Answer `status` with a plain-text `message`, then close the connection."""
        body = message.encode("ascii")
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()


def guarded_protocol(settings: Settings) -> Any:
    """uvicorn's `http=` argument: the guarded protocol with the limits of `settings`."""
    return functools.partial(
        GuardedHttpToolsProtocol,
        header_timeout_s=settings.header_timeout_s,
        max_header_bytes=settings.max_header_bytes,
    )
