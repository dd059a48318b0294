"""ASGI middleware: request ids, the access log, request metrics and the body-size limit.

Pure ASGI (no BaseHTTPMiddleware) so that it adds no task or copy per request. The body limit: a
`Content-Length` over `max_body_bytes` is refused before anything is read; a body without one
(chunked) is read here up to the limit, then handed on; either way the answer is the contract's 413.
(The server holds a request to its Content-Length, so a declared length cannot be exceeded.)
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ddserve.logs import REQUEST_ID, request_id_from
from service.errors import ApiError
from service.telemetry import Telemetry

access_log = logging.getLogger("ddserve.access")
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"the request body is over {limit} bytes")


async def _send_error(send: Send, error: ApiError, request_id: str) -> None:
    body = json.dumps(
        {
            "error": {
                "type": error.type,
                "code": error.code,
                "message": error.message,
                "param": error.param,
            }
        }
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestContextMiddleware:
    """Per request: id (X-Request-ID in, echoed out), size limit, access log line, metrics, and a
    `Server-Timing: gateway;dur=<ms>` header."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry, max_body_bytes: int) -> None:
        self.app = app
        self.telemetry = telemetry
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(_header(scope, b"x-request-id"))
        scope.setdefault("state", {})["request_id"] = request_id
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500
        limit = self.max_body_bytes

        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            status = 413
            await _send_error(send, _too_large(limit), request_id)
            self._finish(scope, status, started)
            REQUEST_ID.reset(token)
            return

        if length is None and scope.get("method") in {"POST", "PUT", "PATCH"}:
            # No Content-Length (chunked): read the body here, at most limit bytes, then replay it.
            chunks: list[bytes] = []
            size = 0
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    status = 413
                    await _send_error(send, _too_large(limit), request_id)
                    self._finish(scope, status, started)
                    REQUEST_ID.reset(token)
                    return
                chunks.append(chunk)
                more = message.get("more_body", False)
            body = b"".join(chunks)
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: wait for the disconnect

            receive = replay

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                # The gateway's own time up to its answer (Prefer: wait included), for clients and
                # benchmarks: RFC Server-Timing, in milliseconds.
                elapsed_ms = (time.perf_counter() - started) * 1000
                headers.append((b"server-timing", f"gateway;dur={elapsed_ms:.3f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._finish(scope, status, started)
            REQUEST_ID.reset(token)

    def _finish(self, scope: Scope, status: int, started: float) -> None:
        seconds = time.perf_counter() - started
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope.get("method", "")
        self.telemetry.observe_request(route, method, status, seconds)
        extra: dict[str, Any] = {
            "method": method,
            "path": scope.get("path", ""),  # never the query: signed links carry their signature
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
        }
        level = logging.DEBUG if route in QUIET_ROUTES and status < 400 else logging.INFO
        access_log.log(
            level, "%s %s %d %.1fms", method, extra["path"], status, seconds * 1000, extra=extra
        )
