"""Why a job failed, as the worker reports it in `job.meta["error"]` (see `ddserve.jobs.META_ERROR`).

The gateway turns `{"type", "code", "message"}` into the job's public `error`; the type says whose
fault it was: `invalid_request_error` (the request cannot be run as given — normally caught by the
gateway, re-checked here), `timeout_error` (the per-job deadline passed) or `server_error`.
"""

from __future__ import annotations

from typing import Any


class InvalidJobRequest(ValueError):
    """The normalized request cannot be run (unknown model, bad image, prompt outside vocabulary)."""


class JobDeadlineExceeded(TimeoutError):
    """The job ran past its deadline; only this job fails, the batch it shared goes on."""


class WorkerStopped(RuntimeError):
    """The worker was stopped with the job still unfinished (RQ retries it if it has retries)."""


def error_meta(exc: BaseException) -> dict[str, Any]:
    """`{"type", "code", "message"}` for `job.meta["error"]`."""
    if isinstance(exc, JobDeadlineExceeded):
        return {"type": "timeout_error", "code": "deadline_exceeded", "message": str(exc)}
    if isinstance(exc, InvalidJobRequest | ValueError | KeyError):
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        return {"type": "invalid_request_error", "code": "invalid_request", "message": str(message)}
    if isinstance(exc, WorkerStopped):
        return {"type": "server_error", "code": "worker_stopped", "message": str(exc)}
    return {
        "type": "server_error",
        "code": "internal_error",
        "message": f"{type(exc).__name__}: {exc}",
    }


def is_retryable(exc: BaseException) -> bool:
    """Whether RQ may retry the job (if it has retries left): not for a request that cannot run nor
    for a job that ran out of time — running it again would fail the same way."""
    return not isinstance(exc, InvalidJobRequest | ValueError | KeyError | JobDeadlineExceeded)
