"""Why a job failed, as the worker reports it in `job.meta["error"]` (see `ddserve.jobs.META_ERROR`).

The gateway turns `{"type", "code", "message"}` into the job's public `error`; the type says whose
fault it was: `invalid_request_error` (the request cannot be run as given — normally caught by the
gateway, re-checked here), `timeout_error` (the per-job deadline passed, or the job expired in its
queue) or `server_error` (codes `non_finite_output`, `out_of_memory`, `model_error` when the model
failed on this job's rows alone; `worker_stopped`, `internal_error`).
"""

from __future__ import annotations

from typing import Any

from ddserve.recovery import expired_error


class InvalidJobRequest(ValueError):
    """The normalized request cannot be run (unknown model, bad image, prompt outside vocabulary)."""


class JobDeadlineExceeded(TimeoutError):
    """The job ran past its deadline; only this job fails, the batch it shared goes on."""


class WorkerStopped(RuntimeError):
    """The worker was stopped with the job still unfinished: it is handed back to its queue."""


class JobExpired(TimeoutError):
    """The job waited in its queue longer than `job_ttl_s`; it fails without running."""

    def __init__(self, waited_s: float, ttl_s: float) -> None:
        super().__init__(expired_error(waited_s, ttl_s)["message"])
        self.waited_s = waited_s
        self.ttl_s = ttl_s


class NonFiniteOutput(ArithmeticError):
    """The model produced NaN or ±inf in this job's samples; only this job fails."""


class ModelOutOfMemory(MemoryError):
    """The network ran out of memory even on this job's rows alone (its batch was split first)."""


class ModelCallFailed(RuntimeError):
    """The network raised on this job's rows alone; the rest of its batch went on without it."""


def error_meta(exc: BaseException) -> dict[str, Any]:
    """`{"type", "code", "message"}` for `job.meta["error"]`."""
    if isinstance(exc, JobDeadlineExceeded):
        return {"type": "timeout_error", "code": "deadline_exceeded", "message": str(exc)}
    if isinstance(exc, JobExpired):
        return expired_error(exc.waited_s, exc.ttl_s)
    if isinstance(exc, NonFiniteOutput):
        return {"type": "server_error", "code": "non_finite_output", "message": str(exc)}
    if isinstance(exc, ModelOutOfMemory):
        return {"type": "server_error", "code": "out_of_memory", "message": str(exc)}
    if isinstance(exc, ModelCallFailed):
        return {"type": "server_error", "code": "model_error", "message": str(exc)}
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
    """Whether RQ may retry the job (if it has retries left): not for a request that cannot run, a
    job that ran out of time, nor a job the model failed on alone (NaN, out of memory, an error on
    its own rows) — running it again would fail the same way."""
    return not isinstance(
        exc,
        InvalidJobRequest
        | ValueError
        | KeyError
        | JobDeadlineExceeded
        | JobExpired
        | NonFiniteOutput
        | ModelOutOfMemory
        | ModelCallFailed,
    )
