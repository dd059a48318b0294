"""Exceptions of the ddserve client: one class per error of the HTTP contract, plus job outcomes.

Every error answer of the gateway has the body `{"error": {"type", "code", "message", "param"}}`
(`/work/shared/api-contract.md`, "Errors"); `error_for(status, body, headers)` maps it to the class of
its status so callers can `except NotFound` or `except RateLimited as e: time.sleep(e.retry_after)`.

    ApiError                 any HTTP error answer
    ├── BadRequest           400 (malformed JSON, bad PNG, wrong task)
    │   └── ValidationError  422 (a field out of range; `param` names it)
    ├── Unauthorized         401 (missing or wrong API key)
    ├── NotFound             404 (unknown model or job, another key's job, bad image link)
    ├── PayloadTooLarge      413 (body or image over the limit)
    ├── RateLimited          429 (queue full or rate limit; `retry_after` seconds)
    ├── Unavailable          503 (Redis or workers down; `retry_after` seconds)
    └── ServerError          500 and other 5xx (a bug of the server)
    JobFailed                the job ended `failed` (`job.error` says why)
    └── JobCanceled          the job ended `canceled`
    WaitTimeout              the job was not finished within the timeout (`job`: its last state)
    ConnectionFailed         the server could not be reached
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ddserve.client.types import Job


class DdserveError(Exception):
    """Base class of every exception this client raises."""


class ApiError(DdserveError):
    """An error answer of the gateway: its status and the contract's error fields."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "",
        code: str = "",
        param: str | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.request_id = request_id
        self.body = body

    def __str__(self) -> str:
        where = f" [{self.param}]" if self.param else ""
        code = f" {self.code}" if self.code else ""
        return f"{self.status_code}{code}{where}: {self.message}"


class BadRequest(ApiError):
    """400: the request is malformed (JSON, base64, PNG) or asks a model for a task it lacks."""


class ValidationError(BadRequest):
    """422: a field is invalid; `param` names it (e.g. `class_label`, `images[0]`)."""


class Unauthorized(ApiError):
    """401: the API key is missing or wrong."""


class NotFound(ApiError):
    """404: unknown model or job (another key's job too), or a bad or expired image link."""


class PayloadTooLarge(ApiError):
    """413: the body or an image is over the gateway's limit."""


class RateLimited(ApiError):
    """429: the model's queue is full or the key's rate limit is reached; retry after `retry_after` s."""


class Unavailable(ApiError):
    """503: Redis or the workers are unavailable; retry after `retry_after` s."""


class ServerError(ApiError):
    """500 or another 5xx: a bug or an outage on the server's side."""


class ConnectionFailed(DdserveError):
    """The server could not be reached (refused, reset, DNS, transport timeout)."""


class JobFailed(DdserveError):
    """The job ended `failed`; `job.error` holds the worker's type, code and message."""

    def __init__(self, job: Job) -> None:
        error = job.error
        detail = f"{error.code}: {error.message}" if error else "no error detail"
        super().__init__(f"job {job.id} {job.status}: {detail}")
        self.job = job


class JobCanceled(JobFailed):
    """The job ended `canceled`."""


class WaitTimeout(DdserveError, TimeoutError):
    """The job did not finish within the timeout; `job` is its last observed state (the job goes
    on running on the server: cancel it if it is no longer wanted)."""

    def __init__(self, job: Job, timeout: float) -> None:
        progress = f", step {job.progress.step}/{job.progress.total}" if job.progress else ""
        super().__init__(f"job {job.id} still {job.status} after {timeout:g} s{progress}")
        self.job = job
        self.timeout = timeout


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    413: PayloadTooLarge,
    422: ValidationError,
    429: RateLimited,
    503: Unavailable,
}


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after") or headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:  # an HTTP date: not sent by ddserve; treat as "soon"
        return None


def error_for(status_code: int, body: Any, headers: Mapping[str, str], text: str = "") -> ApiError:
    """The exception for an error answer: the class of its status, the contract's fields from its
    body (or the raw text when the body is not the contract's, e.g. a proxy's HTML page)."""
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        detail = {"message": (text or f"HTTP {status_code}").strip()[:500]}
    cls = _BY_STATUS.get(status_code)
    if cls is None:
        cls = ServerError if status_code >= 500 else BadRequest
    return cls(
        status_code,
        str(detail.get("message") or f"HTTP {status_code}"),
        type=str(detail.get("type") or ""),
        code=str(detail.get("code") or ""),
        param=detail.get("param"),
        retry_after=_retry_after(headers),
        request_id=headers.get("x-request-id") or headers.get("X-Request-ID"),
        body=body,
    )
