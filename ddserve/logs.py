"""Logging: plain or JSON lines (`log_json`), each carrying the id of the request being served.

The request id comes from the client's `X-Request-ID` (when it is a short, safe token) or is
generated; it is echoed in the answer, written into `job.meta["request_id"]` and added to every log
record emitted while the request is served (a ContextVar, so concurrent requests never mix).
Nothing secret is ever logged: no Authorization header, API key or signing secret reaches a record.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("ddserve_request_id", default=None)
_SAFE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # fullmatch: `$` allows a final "\n"


def request_id_from(header: str | None) -> str:
    """The client's X-Request-ID if it is a safe token, else a fresh one (never echo junk)."""
    if header and _SAFE_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (or None) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class PlainFormatter(logging.Formatter):
    """`time level logger [request id or -] message`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(rid)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.rid = getattr(record, "request_id", None) or "-"
        return super().format(record)


def configure_logging(level: str, json_lines: bool) -> None:
    """Route the `ddserve`, `service`, `workers`, `rq` and `uvicorn` loggers to stderr in the chosen
    format. Idempotent: calling it again replaces our handler rather than adding another."""
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name("ddserve")
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if json_lines else PlainFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == "ddserve":
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()  # uvicorn's own handlers would print a second, unstructured copy
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our access log carries the request id
